"""DeepSpeed configs: ``initialize`` runs an ordinary DeepSpeed JSON config with ZeroAdam doing the sharding, and
importing this module lets ``deepspeed.initialize`` build ``"optimizer": {"type": "ZeroAdam"}`` itself.

Two ways in:

* ``zeroadam.integrations.deepspeed.initialize(model=..., model_parameters=..., config=...)`` reads the config's
  optimizer and ZeRO sections into a ``ZeroAdam`` (see ``translate``), hands DeepSpeed the rest with ZeRO off, and
  returns DeepSpeed's ``(engine, optimizer, dataloader, lr_scheduler)``. ZeroAdam shards state and gradients (stage
  1-2, ``offload_optimizer``) and, at stage 3, the parameters (``zeroadam.shard_model``); it clips by the global
  norm and averages gradients itself: the engine's own all-reduce is switched off
  (``engine.enable_backward_allreduce``). With gradient accumulation stage 2 communicates on the boundary
  micro-batch only; stage 3 reduce-scatters every micro-batch into the gradient shards, as DeepSpeed's ZeRO-3
  does, so that no rank holds whole gradients.
* ``import zeroadam.integrations.deepspeed`` registers ``ZeroAdam`` where DeepSpeed looks up optimizer types it
  does not know (``torch.optim``) and among the optimizers its ZeRO accepts without
  ``zero_allow_untested_optimizer``. A plain ``deepspeed.initialize`` then builds it from the config; under
  DeepSpeed's own ZeRO 1/2 (with or without ``offload_optimizer``) it is DeepSpeed's inner optimizer: DeepSpeed
  shards, reduces and clips, and ZeroAdam updates each flat fp32 partition with compact state and the fused kernel.
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Optional, Union

import torch

from zeroadam._compat import require
from zeroadam.optimizer import ParamState, ZeroAdam
from zeroadam.sharded_model import ShardedModel, shard_model

deepspeed = require("deepspeed", "zeroadam.integrations.deepspeed")

__all__ = ["initialize", "translate", "Translation", "DeepSpeedZeroAdam"]

# Optimizer types whose update ZeroAdam is: AdamW, and DeepSpeed's "Adam", which is AdamW unless adam_w_mode=false.
_TYPES = {"zeroadam", "adamw", "adam"}
_OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "state_dtype", "master_weights"}
# Optimizer params that choose DeepSpeed's implementation, not the math: nothing to honour.
_IMPLEMENTATION_PARAMS = {"torch_adam", "foreach", "fused"}
# zero_optimization keys that tune DeepSpeed's own partitioning; ZeroAdam has its own schedule.
_ZERO_TUNING = {
    "allgather_partitions",
    "allgather_bucket_size",
    "overlap_comm",
    "reduce_scatter",
    "contiguous_gradients",
    "round_robin_gradients",
    "load_from_fp32_weights",
    "elastic_checkpoint",
    "sub_group_size",
    "ignore_unused_parameters",
}


@dataclass
class Translation:
    """A DeepSpeed config split into ZeroAdam's options and what DeepSpeed still runs."""

    zeroadam: dict[str, Any]  # ZeroAdam keyword arguments
    deepspeed: dict[str, Any]  # the config handed to deepspeed.initialize (no optimizer, ZeRO or clipping)
    dtype: Optional[torch.dtype] = None  # bf16: the model's parameters are cast before ZeroAdam is built
    ignored: list[str] = field(default_factory=list)  # keys that have no effect, warned about


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"zeroadam.integrations.deepspeed: config key {key}={value!r} {why}")


def _load(config: Union[str, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)


def translate(config: Union[str, dict[str, Any]]) -> Translation:
    """Map a DeepSpeed config (dict or JSON path) onto ZeroAdam; raise ``ValueError`` naming any key that cannot
    be honoured, and list the keys that have no effect."""
    cfg = _load(config)
    out = Translation(zeroadam={}, deepspeed=cfg)
    zo = out.zeroadam

    opt = cfg.pop("optimizer", None) or {"type": "ZeroAdam"}
    kind = str(opt.get("type", "ZeroAdam"))
    if kind.lower() not in _TYPES:
        raise _bad("optimizer.type", kind, "is not AdamW; expected 'ZeroAdam', 'AdamW' or 'Adam'")
    for key, value in (opt.get("params") or {}).items():
        where = f"optimizer.params.{key}"
        if key in _OPTIMIZER_PARAMS:
            zo[key] = tuple(value) if key == "betas" else value
        elif key in _IMPLEMENTATION_PARAMS:
            continue
        elif key == "adam_w_mode":
            if not value:
                raise _bad(where, value, "asks for Adam with L2 regularization; ZeroAdam is AdamW (decoupled decay)")
        elif key == "bias_correction":
            if not value:
                raise _bad(where, value, "is not supported; ZeroAdam always corrects the moments' bias")
        elif key == "amsgrad":
            if value:
                raise _bad(where, value, "is not supported by ZeroAdam")
        elif key == "fp32_optimizer_states":
            zo.setdefault("state_dtype", "fp32" if value else "bf16")
        else:
            raise _bad(where, value, "is not an AdamW parameter that ZeroAdam knows")

    zero = cfg.pop("zero_optimization", None) or {}
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise _bad("zero_optimization.stage", stage, "is not a ZeRO stage (0, 1, 2, 3)")
    zo["stage"] = stage
    for key, value in zero.items():
        where = f"zero_optimization.{key}"
        if key == "stage":
            continue
        if key == "reduce_bucket_size":
            if stage == 3:
                out.ignored.append(where)  # stage 3 reduce-scatters each unit of shard_model whole
            else:
                zo["bucket_size"] = int(value)
        elif key == "offload_optimizer":
            device = (value or {}).get("device", "none")
            if device == "cpu":
                zo["offload"] = "cpu"
            elif device not in ("none", None):
                raise _bad(f"{where}.device", device, "is not supported; ZeroAdam offloads to 'cpu' only")
            out.ignored += [f"{where}.{k}" for k in (value or {}) if k not in ("device", "pin_memory")]
        elif key == "offload_param":
            if (value or {}).get("device", "none") not in ("none", None):
                raise _bad(
                    where, value, "is not supported; ZeroAdam keeps parameters (stage 3: their shards) on the device"
                )
        elif key in _ZERO_TUNING or key.startswith("stage3_"):
            out.ignored.append(where)
        else:
            raise _bad(where, value, "is not a zero_optimization key ZeroAdam can honour")

    # DeepSpeed clips by default (1.0): the key's absence means that, here too.
    clip = float(cfg.get("gradient_clipping", 1.0) or 0.0)
    if clip > 0:
        zo["max_grad_norm"] = clip
    cfg["gradient_clipping"] = 0.0  # DeepSpeed would clip p.grad before ZeroAdam has averaged it
    for key in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"):
        cfg.pop(key, None)
    if (cfg.get("fp16") or {}).get("enabled", False):
        raise _bad(
            "fp16.enabled", True, "is not supported: DeepSpeed's fp16 optimizer would wrap ZeroAdam and own the "
            "master weights; use bf16 (ZeroAdam keeps compact master weights for bf16 parameters)"
        )
    cfg.pop("fp16", None)
    bf16 = cfg.pop("bf16", None) or cfg.pop("bfloat16", None) or {}
    if bf16.get("enabled", False):
        out.dtype = torch.bfloat16
    return out


def initialize(
    *,
    model: torch.nn.Module,
    config: Union[str, dict[str, Any]],
    model_parameters: Optional[Any] = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with ZeroAdam doing the sharding; returns DeepSpeed's
    ``(engine, optimizer, dataloader, lr_scheduler)``, where ``optimizer`` is the ZeroAdam.

    Stage 3 shards the model with ``zeroadam.shard_model`` (its default units); to choose units or prefetch, pass
    a model already sharded by ``shard_model`` on the accelerator's device (and in bf16 for a bf16 config).
    ``kwargs`` go to ``deepspeed.initialize`` (``training_data``, ``lr_scheduler``, ``collate_fn``, ...).
    """
    if "optimizer" in kwargs:
        raise ValueError("zeroadam.integrations.deepspeed.initialize builds the optimizer from the config; pass no optimizer")
    t = translate(config)
    if t.ignored:
        warnings.warn(
            "zeroadam.integrations.deepspeed: these config keys tune DeepSpeed's own ZeRO and have no effect with "
            f"ZeroAdam: {', '.join(t.ignored)}",
            UserWarning,
            stacklevel=2,
        )
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    stage = t.zeroadam["stage"]
    sharded: Optional[ShardedModel] = getattr(model, "_zeroadam_sharded", None)
    if sharded is not None:
        _check_sharded(model, stage, device, t.dtype)
    else:
        # ZeroAdam's flat buffers (and shard_model's) are made on the parameters' device: move (and cast) first.
        model.to(device)
        if t.dtype is not None:
            model.to(t.dtype)
        if stage == 3:
            sharded = shard_model(model)._zeroadam_sharded  # type: ignore[assignment]
    params = model_parameters if model_parameters is not None else [p for p in model.parameters() if p.requires_grad]
    opt = ZeroAdam(params, **t.zeroadam, gradient_sync="optimizer")
    with _gathered(sharded):
        engine, optimizer, dataloader, scheduler = deepspeed.initialize(
            model=model, optimizer=opt, config=t.deepspeed, **kwargs
        )
    if optimizer is not opt:  # pragma: no cover - DeepSpeed wraps a client optimizer only for ZeRO or fp16 / bf16
        raise RuntimeError(f"zeroadam.integrations.deepspeed: DeepSpeed wrapped ZeroAdam in {type(optimizer).__name__}")
    if opt._zero is None:
        return engine, optimizer, dataloader, scheduler  # stage 0: DeepSpeed's all-reduce averages the gradients
    # ZeroAdam averages the gradients; DeepSpeed's all-reduce would move them a second time.
    engine.enable_backward_allreduce = False
    if sharded is not None:
        # DeepSpeed's checkpoints read and write the parameters themselves, which hold no storage between steps:
        # save_checkpoint writes empty tensors and load_checkpoint fails ("Trying to resize storage that is not
        # resizable"). zeroadam.checkpoint gathers and scatters the shards.
        def no_deepspeed_checkpoints(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(
                "zeroadam.integrations.deepspeed: at zero_optimization.stage 3 the engine's save_checkpoint and "
                "load_checkpoint cannot read or write the sharded parameters; use "
                "zeroadam.checkpoint.save(path, engine.module, optimizer) and zeroadam.checkpoint.load(...)"
            )

        engine.save_checkpoint = engine.load_checkpoint = no_deepspeed_checkpoints
    # Stage 1 reduces in step(); stage 3 in every backward (deferring would keep whole gradients in p.grad).
    if getattr(opt._zero, "buckets", None) is not None:
        buckets = opt._zero.buckets

        def sync_on_boundary(module: torch.nn.Module, args: Any) -> None:
            # With gradient accumulation, stage 2 reduces only the last micro-batch's backward (which carries the
            # sum), as DeepSpeed's no_sync does.
            buckets.sync = engine.is_gradient_accumulation_boundary()

        engine.module.register_forward_pre_hook(sync_on_boundary)
    return engine, optimizer, dataloader, scheduler


def _check_sharded(model: torch.nn.Module, stage: int, device: torch.device, dtype: Optional[torch.dtype]) -> None:
    """A model that ``shard_model`` already sharded is used as it is: moving or casting it would copy parameters
    whose storage is released, and they would no longer view the unit buffers."""
    if stage != 3:
        raise _bad(
            "zero_optimization.stage", stage, "does not fit a model sharded by zeroadam.shard_model; set stage 3, "
            "or pass the model unsharded"
        )
    on = {p.device for p in model.parameters()}
    if on != {device}:
        raise ValueError(
            f"zeroadam.integrations.deepspeed: the model was sharded on {sorted(map(str, on))}, and DeepSpeed runs "
            f"it on {device}; shard it there: zeroadam.shard_model(model.to({str(device)!r}))"
        )
    if dtype is not None and any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        raise _bad(
            "bf16.enabled", True, "needs bf16 parameters, and this model was sharded in another dtype; cast it "
            "before sharding: zeroadam.shard_model(model.to(torch.bfloat16))"
        )


@contextlib.contextmanager
def _gathered(sharded: Optional[ShardedModel]) -> Iterator[None]:
    """Every unit of a stage-3 model gathered while DeepSpeed builds its engine, released after.

    [Note: DeepSpeed's engine and released parameters]
    The engine broadcasts every parameter from rank 0 (``_broadcast_model``) and moves the module to its device
    while it is built. Outside a unit's forward and backward, ``shard_model`` releases the parameters' storage (0
    bytes), and a broadcast of one hands the backend a tensor with no memory behind it: gloo aborts the process
    ("writev: Bad address") and the other ranks wait forever. Gathered, the broadcast sends rank 0's values, which
    every rank already holds (``shard_model`` broadcast them), and the move is a no-op. The cost is the whole model
    in memory once, during construction.
    """
    if sharded is None:
        yield
        return
    for u in sharded.units:
        sharded.gather(u)
    try:
        yield
    finally:
        for u in sharded.units:
            sharded.release(u)


# ---------------------------------------------------------------------------------------------- registration
class _MappedState(ParamState):
    """A parameter's state that DeepSpeed's ZeRO can also read as a dict of tensors: it maps each tensor shaped
    like the flat partition onto the model's parameters (its fragment API, universal checkpoints)."""

    @classmethod
    def of(cls, st: ParamState) -> "_MappedState":
        # Field by field, so a field added to ParamState is carried without a change here.
        return cls(**{f.name: getattr(st, f.name) for f in fields(st)})

    def items(self) -> Any:
        return {**self.moments.tensors(), **self.master.tensors()}.items()


class DeepSpeedZeroAdam(ZeroAdam):
    """ZeroAdam as the optimizer DeepSpeed builds from ``"optimizer": {"type": "ZeroAdam", "params": {...}}``.

    DeepSpeed owns the distribution (its ``zero_optimization``, all-reduce, clipping and loss scaling), so this
    ZeroAdam is unsharded (stage 0): under DeepSpeed's ZeRO 1/2 it updates the flat fp32 partition of each group.
    """

    def __init__(self, params: Any, **kwargs: Any) -> None:
        for key in ("stage", "offload", "process_group", "max_grad_norm"):
            if kwargs.get(key) not in (None, 0):
                raise ValueError(
                    f"ZeroAdam as DeepSpeed's optimizer: optimizer.params.{key}={kwargs[key]!r} is DeepSpeed's job "
                    "here (zero_optimization, offload_optimizer, gradient_clipping); for ZeroAdam's own sharding use "
                    "zeroadam.integrations.deepspeed.initialize"
                )
        for key in _IMPLEMENTATION_PARAMS:
            kwargs.pop(key, None)
        for key, supported in (("adam_w_mode", True), ("bias_correction", True), ("amsgrad", False)):
            value = kwargs.pop(key, supported)
            if bool(value) != supported:
                raise ValueError(f"ZeroAdam as DeepSpeed's optimizer: optimizer.params.{key}={value!r} is not supported")
        super().__init__(params, **kwargs)

    def _init_state(self, p: torch.Tensor, index_base: int) -> ParamState:
        return _MappedState.of(super()._init_state(p, index_base))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for p, st in list(self.state.items()):
            if isinstance(st, ParamState) and not isinstance(st, _MappedState):
                self.state[p] = _MappedState.of(st)


def _register() -> None:
    """Where DeepSpeed looks: ``torch.optim.<type>`` for unknown types, and ZeRO's list of tested optimizers."""
    torch.optim.ZeroAdam = DeepSpeedZeroAdam  # type: ignore[attr-defined]
    from deepspeed.runtime.zero import utils as zero_utils

    if DeepSpeedZeroAdam not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(DeepSpeedZeroAdam)


_register()
