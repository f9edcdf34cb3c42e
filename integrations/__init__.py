"""Framework integrations, installed as ``zeroadam.integrations``; each module imports its framework on import.

* ``accelerate``: ``ZeroAccelerator`` (ZeRO-2 memory under Accelerate) and the DDP detection of the plain loop.
* ``transformers``: ``ZeroAdamCallback`` for the Hugging Face Trainer's rank-0 checkpoints.
* ``deepspeed``: ``initialize`` for DeepSpeed configs, and the ``"type": "ZeroAdam"`` registration.
* ``fsdp2``: ``DTensorEngine``, ZeroAdam's stage-0 update over ``fully_shard`` DTensor parameters.

See README.md in this folder for copy-paste examples.
"""
