"""The Hugging Face Trainer: ``ZeroAdamCallback`` makes its checkpoints hold ZeroAdam's whole sharded state.

The Trainer writes ``optimizer.pt`` from rank 0 alone: ``torch.save(optimizer.state_dict(), ...)`` runs only where
``args.should_save``. With a sharded ZeroAdam (stage 1-3) no rank holds the whole state, and gathering it needs
every rank. The callback runs on every rank just before the Trainer saves (``on_step_end`` / ``on_epoch_end``, after
``DefaultFlowCallback`` has decided to save) and calls ``optimizer.consolidate_state_dict(to=0)``: rank 0 then holds
the whole state until the next step, and its lone ``state_dict()`` needs no communication. Resuming needs nothing:
the Trainer loads ``optimizer.pt`` on every rank and each keeps its shard.

Without the callback, rank 0's lone ``state_dict()`` does not hang: it raises ``RuntimeError`` naming the fix after
``ZEROADAM_CHECK_IN_TIMEOUT`` seconds (see [Note: check-in] in ``zeroadam/state_dict.py``).

The Trainer wraps the model in DistributedDataParallel when several processes train; ZeroAdam then leaves the
gradient averaging to DDP (``gradient_sync="auto"``, see ``zeroadam/grad_sync.py``), and the Trainer's
``max_grad_norm`` clipping of ``p.grad`` is exact.
"""
from __future__ import annotations

from typing import Any

from zeroadam._compat import require

transformers = require("transformers", "zeroadam.integrations.transformers")

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from zeroadam.optimizer import ZeroAdam  # noqa: E402

__all__ = ["ZeroAdamCallback"]


def _inner(optimizer: Any) -> Any:
    """The optimizer inside wrappers (Accelerate's AcceleratedOptimizer, and any other with ``.optimizer``)."""
    while not isinstance(optimizer, ZeroAdam) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class ZeroAdamCallback(TrainerCallback):
    """Gathers a sharded ZeroAdam's state to rank 0 right before each Trainer checkpoint (on every rank).

    ``Trainer(..., optimizer_cls_and_kwargs=(ZeroAdam, {...}), callbacks=[ZeroAdamCallback()])``. A no-op for an
    unsharded ZeroAdam (stage 0 or one process) and for any other optimizer.
    """

    def _about_to_save(self, args: TrainingArguments, control: TrainerControl) -> bool:
        if args.save_only_model:
            return False
        # save_strategy="best" decides after evaluating, inside the Trainer: gather whenever it evaluates.
        best = str(getattr(args.save_strategy, "value", args.save_strategy)) == "best"
        return bool(control.should_save or (best and control.should_evaluate))

    def _consolidate(self, args: TrainingArguments, control: TrainerControl, optimizer: Any) -> None:
        opt = _inner(optimizer)
        if not isinstance(opt, ZeroAdam) or not opt.engine.gathers_state_dict or not self._about_to_save(args, control):
            return
        opt.consolidate_state_dict(to=0)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kwargs: Any
    ) -> None:
        self._consolidate(args, control, optimizer)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kwargs: Any
    ) -> None:
        self._consolidate(args, control, optimizer)
