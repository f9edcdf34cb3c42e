"""Framework integrations, installed as ``zeroadam.integrations``; each module imports its framework on import.

* ``accelerate``: ``ZeroAccelerator`` (ZeRO-2 / ZeRO-3 memory and fp16 under Accelerate) and the DDP detection of
  the plain loop.
* ``transformers``: ``ZeroAdamCallback`` for the Hugging Face Trainer's rank-0 checkpoints.
* ``deepspeed``: ``initialize`` for DeepSpeed configs (ZeRO stages 1-3), and the ``"type": "ZeroAdam"`` registration.
* ``fsdp2``: ``DTensorEngine``, ZeroAdam's stage-0 update over ``fully_shard`` DTensor parameters.

See the Integrations section of the top-level README.md for copy-paste examples.
"""
