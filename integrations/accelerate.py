"""Accelerate: ZeroAdam in an ordinary Accelerate loop, and ``ZeroAccelerator`` for ZeRO-2's memory savings.

Two ways in:

* Swap the optimizer, nothing else. ``accelerator.prepare`` wraps the model in ``DistributedDataParallel``, whose
  backward averages every gradient; ``ZeroAdam(stage=1 or 2)`` notices (``gradient_sync="auto"``, see [Note:
  gradients averaged by a wrapper] in ``zeroadam/grad_sync.py``) and communicates no gradient itself. Its state
  stays sharded; ``p.grad`` holds the full averaged gradients, so ``accelerator.clip_grad_norm_`` (torch's
  clipping of ``p.grad``) clips by the true global norm, and an fp16 ``GradScaler`` skips steps the way it does
  for ``torch.optim.AdamW``, which is what ``accelerator.optimizer_step_was_skipped`` reports.
* ``ZeroAccelerator``, a drop-in ``Accelerator``: ``prepare`` leaves a model whose trainable parameters a sharded
  ZeroAdam optimizes unwrapped (no DDP). ZeroAdam then averages the gradients itself, and stage 2 frees each
  ``p.grad`` during backward (ZeRO-2's gradient memory). ``clip_grad_norm_`` asks ZeroAdam for the global norm
  (``torch.nn.utils.clip_grad_norm_`` would see no gradients, or this rank's only); ``accumulate`` and
  ``no_sync`` defer ZeroAdam's gradient communication to the last micro-batch, as DDP's ``no_sync`` does.

Checkpoints need nothing special: Accelerate calls ``optimizer.state_dict()`` on every rank and writes rank 0's,
which holds the whole state; ``load_state`` gives every rank that file, and each keeps its shard.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from zeroadam._compat import require

accelerate = require("accelerate", "zeroadam.integrations.accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import PartialState  # noqa: E402

from zeroadam.optimizer import ZeroAdam  # noqa: E402

__all__ = ["ZeroAccelerator", "wraps_models_in_ddp", "unwrap_optimizer"]

# Accelerate's data-parallel distributed types: prepare() wraps a trainable model in DistributedDataParallel.
_DDP_TYPES = frozenset(
    {"MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"}
)


def wraps_models_in_ddp() -> bool:
    """Whether an initialized Accelerate state wraps the models it prepares in DistributedDataParallel.

    Reads the shared state without creating it (a script that never made an Accelerator has none)."""
    dist_type = PartialState._shared_state.get("distributed_type")
    return dist_type is not None and str(getattr(dist_type, "value", dist_type)) in _DDP_TYPES


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's (possibly nested) ``AcceleratedOptimizer`` wrappers."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _is_sharded(opt: Any) -> bool:
    return isinstance(opt, ZeroAdam) and opt._zero is not None and opt.options.stage in (1, 2)


def _params_of(opt: ZeroAdam) -> set[torch.Tensor]:
    return {p for g in opt.param_groups for p in g["params"]}


class ZeroAccelerator(Accelerator):
    """An ``Accelerator`` that lets a sharded ZeroAdam (stage 1 or 2) average the gradients of its model itself.

    Use it exactly like ``Accelerator`` and pass the model and its ZeroAdam to the same ``prepare`` call (or the
    optimizer first). Models trained by no sharded ZeroAdam are prepared as usual.

    Not supported (a ``ValueError`` says so at ``prepare``): ``mixed_precision="fp16"`` — ``GradScaler`` looks for
    non-finite values in ``p.grad``, which stage 2 frees and stage 1 holds unreduced; use bf16, or the plain
    ``Accelerator`` (DDP) loop — and DeepSpeed / FSDP plugins, which shard the model themselves.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._zero_optimizers: list[ZeroAdam] = []

    # ---------------------------------------------------------------- preparation
    def _claim(self, opt: ZeroAdam) -> None:
        if any(opt is o for o in self._zero_optimizers):
            return
        if self.scaler is not None:
            raise ValueError(
                "ZeroAccelerator: mixed_precision='fp16' is not supported with a sharded ZeroAdam: torch's GradScaler "
                "checks p.grad for infs, and ZeroAdam(stage=2) frees it (stage 1 holds this rank's unreduced part). "
                "Use mixed_precision='bf16', or the plain Accelerator, where DDP averages p.grad and GradScaler works"
            )
        if opt.options.gradient_sync == "wrapper":
            raise ValueError(
                "ZeroAccelerator: the ZeroAdam was built with gradient_sync='wrapper', but ZeroAccelerator does not "
                "wrap the model in DDP; pass gradient_sync='auto' or 'optimizer', or use the plain Accelerator"
            )
        if self.distributed_type.value not in _DDP_TYPES and self.num_processes > 1:
            raise ValueError(
                f"ZeroAccelerator: distributed_type={self.distributed_type.value} shards or wraps the model itself; "
                "a sharded ZeroAdam needs plain data parallelism (launch without a DeepSpeed or FSDP plugin)"
            )
        opt._zero.set_gradient_sync("optimizer")
        self._zero_optimizers.append(opt)

    def prepare(self, *args: Any, device_placement: Optional[list[bool]] = None) -> Any:
        # Optimizers first: prepare_model, which runs before them in Accelerate's pass, must know who owns what.
        for obj in args:
            opt = unwrap_optimizer(obj)
            if isinstance(opt, ZeroAdam) and opt.options.stage == 3:
                raise ValueError(
                    "ZeroAccelerator: ZeroAdam(stage=3) is not supported yet: Accelerate's device placement and "
                    "save_state would touch the parameters that zeroadam.shard_model releases; use stage=2 here, or "
                    "shard_model + ZeroAdam(stage=3) with zeroadam.checkpoint in a plain torch loop"
                )
            if _is_sharded(opt):
                self._claim(opt)
        return super().prepare(*args, device_placement=device_placement)

    def _owner_of(self, model: torch.nn.Module) -> Optional[ZeroAdam]:
        """The sharded ZeroAdam that optimizes every trainable parameter of ``model``, or None if none does."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        for opt in self._zero_optimizers:
            mine = _params_of(opt)
            owned = [p in mine for p in trainable]
            if all(owned) and trainable:
                return opt
            if any(owned):
                raise ValueError(
                    "ZeroAccelerator: the model has trainable parameters that its sharded ZeroAdam does not "
                    f"optimize ({owned.count(False)} of {len(trainable)}); DDP cannot average only the others. Give "
                    "every trainable parameter to the ZeroAdam, or freeze the rest (requires_grad=False)"
                )
        return None

    def prepare_model(
        self, model: torch.nn.Module, device_placement: Optional[bool] = None, evaluation_mode: bool = False
    ) -> torch.nn.Module:
        owner = None if evaluation_mode else self._owner_of(model)
        if owner is None:
            return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        # evaluation_mode=True is Accelerate's "everything but the DDP wrapper": device placement and autocast.
        model = super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        owner._zero.rebind_moved_params()  # device placement gave the parameters new storage (even on CPU)
        return model

    # ---------------------------------------------------------------- training loop
    def _owner_of_params(self, parameters: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], Optional[ZeroAdam]]:
        params = [p for p in parameters if p.requires_grad]
        for opt in self._zero_optimizers:
            mine = _params_of(opt)
            inside = sum(p in mine for p in params)
            if inside == len(params) == len(mine):
                return params, opt
            if inside:
                raise ValueError(
                    f"ZeroAccelerator.clip_grad_norm_: {inside} of the {len(params)} parameters belong to a sharded "
                    f"ZeroAdam of {len(mine)} parameters; ZeroAdam clips all of its parameters by their global norm "
                    "together: pass exactly those (model.parameters()), and clip other optimizers' separately"
                )
        return params, None

    def clip_grad_norm_(
        self, parameters: Union[Iterable[torch.Tensor], torch.Tensor], max_norm: float, norm_type: float = 2
    ) -> torch.Tensor:
        """Global-norm clipping; for a sharded ZeroAdam's parameters, ZeroAdam's own (applied inside its next
        step, over the averaged gradients of all ranks). Returns the total norm."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        params, opt = self._owner_of_params(parameters)
        if opt is None:
            return super().clip_grad_norm_(params, max_norm, norm_type=norm_type)
        return opt.clip_grad_norm_(max_norm, norm_type=float(norm_type))

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
        """Like ``Accelerator.no_sync``; for a model that a sharded ZeroAdam averages itself, its ``no_sync()``."""
        owner = next((o for o in self._zero_optimizers if any(p in _params_of(o) for p in model.parameters())), None)
        if owner is None:
            with super().no_sync(model):
                yield
            return
        with owner.no_sync():
            yield
