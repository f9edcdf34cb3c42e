"""DeepSpeed configs: ``initialize`` runs an ordinary DeepSpeed JSON config with ZeroAdam doing the sharding, and
importing this module lets ``deepspeed.initialize`` build ``"optimizer": {"type": "ZeroAdam"}`` itself.

Two ways in:

* ``zeroadam.integrations.deepspeed.initialize(model=..., model_parameters=..., config=...)`` reads the config's
  optimizer and ZeRO sections into a ``ZeroAdam`` (see ``translate``), hands DeepSpeed the rest with ZeRO off, and
  returns DeepSpeed's ``(engine, optimizer, dataloader, lr_scheduler)``. ZeroAdam shards state and gradients (stage
  1-2, ``offload_optimizer``) and, at stage 3, the parameters (``zeroadam.shard_model``; ``offload_param`` with
  ``offload_optimizer`` keeps their shards on the host: ``offload_params=True``); it clips by the global
  norm and averages gradients itself: the engine's own all-reduce is switched off
  (``engine.enable_backward_allreduce``). With gradient accumulation stage 2 communicates on the boundary
  micro-batch only; stage 3 reduce-scatters every micro-batch into the gradient shards, as DeepSpeed's ZeRO-3
  does, so that no rank holds whole gradients. ``bf16`` and ``fp16`` cast the model; ZeroAdam keeps compact master
  weights. With ``fp16`` the loss is scaled by a ``DeepSpeedGradScaler`` (``optimizer.scaler``): a
  ``zeroadam.GradScaler`` whose scale follows DeepSpeed's own loss scaler, so that every ``fp16`` key means what
  it means in DeepSpeed (see [Note: fp16 through DeepSpeed's engine]).
  Which config keys are honoured, only tune DeepSpeed's own ZeRO (one warning), or are refused, and what HF
  "auto" values become: ``deepspeed_keys.py``. ``save_checkpoint`` / ``load_checkpoint`` (``deepspeed_checkpoint.py``)
  save a run at any stage, with the lr scheduler, the engine's counters and the fp16 scaler; at stage 3
  ``engine.save_16bit_model`` writes the gathered weights.
* ``import zeroadam.integrations.deepspeed`` registers ``ZeroAdam`` where DeepSpeed looks up optimizer types it
  does not know (``torch.optim``) and among the optimizers its ZeRO accepts without
  ``zero_allow_untested_optimizer``. A plain ``deepspeed.initialize`` then builds it from the config; under
  DeepSpeed's own ZeRO 1/2 (with or without ``offload_optimizer``) it is DeepSpeed's inner optimizer: DeepSpeed
  shards, reduces and clips, and ZeroAdam updates each flat fp32 partition with compact state and the fused kernel.
  A stage-0 ZeroAdam the user builds and passes as ``optimizer=`` works the same way; a sharded one is refused.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Optional, Union

import torch

from zeroadam._compat import require
from zeroadam.integrations import deepspeed_keys as keys
from zeroadam.integrations.deepspeed_checkpoint import load_checkpoint, save_16bit_model, save_checkpoint
from zeroadam.amp import GradScaler
from zeroadam.engines.local import LocalEngine, ParamState
from zeroadam.optimizer import ZeroAdam
from zeroadam.sharding.model import ShardedModel, shard_model

deepspeed = require("deepspeed", "zeroadam.integrations.deepspeed")

__all__ = [
    "initialize",
    "save_checkpoint",
    "load_checkpoint",
    "translate",
    "Translation",
    "Fp16Config",
    "DeepSpeedGradScaler",
    "DeepSpeedZeroAdam",
]

# Optimizer types whose update ZeroAdam is: AdamW, and DeepSpeed's "Adam", which is AdamW unless adam_w_mode=false.
_TYPES = {"zeroadam", "adamw", "adam"}
_OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "state_dtype", "master_weights", "skip_nonfinite"}
# Optimizer params that choose DeepSpeed's implementation, not the math: nothing to honour.
_IMPLEMENTATION_PARAMS = {"torch_adam", "foreach", "fused"}


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"zeroadam.integrations.deepspeed: config key {key}={value!r} {why}")


@dataclass(frozen=True, kw_only=True)
class Fp16Config:
    """DeepSpeed's ``fp16`` section, with its names and defaults: the loss-scale policy of DeepSpeed's own fp16
    optimizers, which ``DeepSpeedGradScaler`` follows."""

    loss_scale: float = 0.0
    """A static loss scale when > 0; 0 scales dynamically."""
    initial_scale_power: int = 16
    """The dynamic scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """Steps without overflow before the dynamic scale doubles (counted as DeepSpeed's ``DynamicLossScaler`` does)."""
    hysteresis: int = 2
    """Overflows the dynamic scale absorbs before it halves (1: every overflow halves it); each still skips its step."""
    consecutive_hysteresis: bool = False
    """Refill the hysteresis after every step without overflow (False: only when the scale grows)."""
    min_loss_scale: float = 1.0
    """The dynamic scale's floor; an overflow at the floor raises, as in DeepSpeed."""
    auto_cast: bool = False
    """Cast the forward's floating-point positional inputs to fp16, as DeepSpeed's engine does."""

    def __post_init__(self) -> None:
        counts = (lambda v: float(v).is_integer() and v >= 1, "an integer >= 1")
        for key, (ok, allowed) in {
            "loss_scale": (lambda v: v >= 0, "a number >= 0 (0: dynamic loss scaling)"),
            "initial_scale_power": (lambda v: float(v).is_integer(), "an integer"),
            "loss_scale_window": counts,
            "hysteresis": counts,
            "min_loss_scale": (lambda v: v > 0, "a number > 0"),
        }.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise _bad(f"fp16.{key}", v, f"is invalid; expected {allowed}")
        for key in ("consecutive_hysteresis", "auto_cast"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(f"fp16.{key}", getattr(self, key), "is invalid; expected true or false")

    @classmethod
    def of(cls, section: dict[str, Any]) -> "Fp16Config":
        """The config from DeepSpeed's ``fp16`` section; a key that cannot be honoured raises, naming it."""
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in section.items():
            if key == "enabled":
                continue
            if key == "fp16_master_weights_and_grads":
                if value:
                    raise _bad(
                        f"fp16.{key}", value, "is not supported: ZeroAdam keeps the master weights; choose them with "
                        "optimizer.params.master_weights ('auto' = 'compact', 'fp32', or 'none')"
                    )
                continue
            if key not in known:
                raise _bad(f"fp16.{key}", value, "is not an fp16 key ZeroAdam knows")
            kwargs[key] = value
        return cls(**kwargs)


@dataclass
class Translation:
    """A DeepSpeed config split into ZeroAdam's options and what DeepSpeed still runs."""

    zeroadam: dict[str, Any]  # ZeroAdam keyword arguments
    deepspeed: dict[str, Any]  # the config handed to deepspeed.initialize (no optimizer, ZeRO, clipping, bf16, fp16)
    dtype: Optional[torch.dtype] = None  # bf16 / fp16: the model's parameters are cast before ZeroAdam is built
    fp16: Optional[Fp16Config] = None  # fp16: the loss scaling DeepSpeedGradScaler follows
    ignored: list[str] = field(default_factory=list)  # keys that have no effect, warned about
    resolved: list[str] = field(default_factory=list)  # HF "auto" values and deprecated keys, as "key=value (why)"
    gather_16bit_on_save: bool = False  # stage 3: save_16bit_model gathers and writes the weights
    hpz: int = 1  # zero_hpz_partition_size: ranks per parameter-gather group (> 1 needs a mesh, see initialize)
    offload_params: bool = False  # stage 3: offload_param device 'cpu', shard_model(offload_params=True)


def _load(config: Union[str, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)


def _check_keys(section: dict[str, Any], table: dict[str, keys.Key], prefix: str, out: Translation) -> None:
    """Tuning keys go to ``out.ignored``; a refused key with a value other than its default raises; an unknown key
    raises."""
    for key, value in section.items():
        where = f"{prefix}.{key}" if prefix else key
        entry = table.get(key)
        if entry is None:
            raise _bad(where, value, f"is not a {prefix} key ZeroAdam knows")
        if entry.kind == "tuning":
            out.ignored.append(where)
        elif entry.kind == "refused" and not keys.is_auto(value) and value not in entry.accepted:
            raise _bad(where, value, entry.why)


def _legacy_offload(zero: dict[str, Any], old: str, new: str, out: Translation, *, stacklevel: int) -> None:
    """DeepSpeed's deprecated boolean spelling ``old`` (true = ``new: {device: cpu}``, false = nothing), with
    DeepSpeed's own deprecation warning (DeepSpeedConfigModel), as it still accepts it."""
    if old not in zero:
        return
    legacy = zero.pop(old)
    warnings.warn(f"Config parameter {old} is deprecated use {new} instead", FutureWarning, stacklevel)
    if legacy:
        if new in zero:
            raise _bad(f"zero_optimization.{old}", legacy, f"and zero_optimization.{new} are both set; keep {new}")
        zero[new] = {"device": "cpu"}
        out.resolved.append(f"zero_optimization.{old}: true -> {new}: {{'device': 'cpu'}}")


def _offload_param(zero: dict[str, Any], stage: int, zo: dict[str, Any], out: Translation) -> bool:
    """Whether the config offloads the parameters (``offload_param``, or the deprecated ``cpu_offload_param``)."""
    _legacy_offload(zero, "cpu_offload_param", "offload_param", out, stacklevel=5)
    section = zero.get("offload_param") or {}
    _check_keys(section, keys.OFFLOAD_PARAM, "zero_optimization.offload_param", out)
    device = section.get("device", "none")
    if device in ("none", None):
        return False
    where = "zero_optimization.offload_param.device"
    if device != "cpu":
        raise _bad(where, device, "is not supported; ZeroAdam offloads parameters to 'cpu' only (no NVMe offload)")
    if stage != 3:
        raise _bad(
            where, device, f"needs zero_optimization.stage 3 (the stage is {stage}): only stage 3 shards the "
            "parameters, as in DeepSpeed, where offload_param is valid only with stage 3"
        )
    if zo.get("offload") != "cpu":
        raise _bad(
            where, device, "needs offload_optimizer: {'device': 'cpu'} as well: ZeroAdam updates offloaded parameter "
            "shards on the host, where the optimizer state then lives (ZeRO-Infinity's usual setup); add it, or "
            "drop offload_param to keep the parameter shards on the device"
        )
    return True


def _optimizer_defaults(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """What DeepSpeed itself builds for this optimizer type uses when a hyperparameter is absent (or "auto").

    "Adam" and "AdamW" build FusedAdam, or DeepSpeedCPUAdam with offload_optimizer: weight_decay 0.0 (lr 1e-3,
    betas (0.9, 0.999), eps 1e-8, as ZeroAdam's); with ``torch_adam`` torch.optim.AdamW (0.01) or torch.optim.Adam
    (0.0). "ZeroAdam" builds ZeroAdam itself (``torch.optim.ZeroAdam``): its own defaults.
    """
    if kind == "zeroadam":
        return {}
    adamw = kind == "adamw" or bool(params.get("adam_w_mode", True))
    return {"weight_decay": 0.01 if params.get("torch_adam") and adamw else 0.0}


def _resolve_auto(cfg: dict[str, Any], model: Optional[torch.nn.Module], out: Translation) -> None:
    """Replace the HF "auto" values that zds can resolve, in place, and refuse the others (see [Note: HF "auto"
    values] in deepspeed_keys.py)."""

    def note(key: str, value: Any) -> None:
        out.resolved.append(f"{key}: 'auto' -> {value!r}")

    def refuse(key: str) -> ValueError:
        why = keys.AUTO.get(key, "zeroadam has nothing to resolve it from; set a value").removeprefix("refused: ")
        return _bad(key, "auto", f"cannot be resolved here: {why}")

    opt = cfg.get("optimizer") or {}
    params = opt.get("params") or {}
    kind = str(opt.get("type", "ZeroAdam")).lower()
    if keys.is_auto(params.get("lr")):
        raise refuse("optimizer.params.lr")
    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, **_optimizer_defaults(kind, params)}
    for key in ("betas", "eps", "weight_decay"):
        if keys.is_auto(params.get(key)):
            # The type's default: DeepSpeed's, which are the Trainer's ("ZeroAdam": its own weight_decay).
            if key in defaults:
                params[key] = defaults[key]
            else:
                del params[key]
            note(f"optimizer.params.{key}", defaults.get(key, "ZeroAdam's default"))
    for key, value in params.items():
        if keys.is_auto(value):
            raise refuse(f"optimizer.params.{key}")

    if keys.is_auto(cfg.get("gradient_clipping")):
        cfg["gradient_clipping"] = 1.0
        note("gradient_clipping", 1.0)
    for section in ("fp16", "bf16", "bfloat16"):
        sec = cfg.get(section) or {}
        if keys.is_auto(sec.get("enabled")):
            sec["enabled"] = False
            note(f"{'bf16' if section == 'bfloat16' else section}.enabled", False)
    batch = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps")
    autos = [k for k in batch if keys.is_auto(cfg.get(k))]
    for k in autos:
        del cfg[k]  # DeepSpeed derives a missing batch size from the others
        note(k, "derived by DeepSpeed")
    if autos and "train_batch_size" not in cfg and "train_micro_batch_size_per_gpu" not in cfg:
        raise _bad(
            " and ".join(k for k in batch[:2]), "auto", "cannot be resolved here: neither is a number, and the "
            "Trainer fills them from its "
            "per_device_train_batch_size; set train_micro_batch_size_per_gpu to a number"
        )

    zero = cfg.get("zero_optimization") or {}
    if keys.is_auto(zero.get("reduce_bucket_size")):
        hidden = keys.hidden_size(model)
        if hidden is None:
            del zero["reduce_bucket_size"]
            note("zero_optimization.reduce_bucket_size", "ZeroAdam's bucket_size (no model.config.hidden_size)")
        else:
            zero["reduce_bucket_size"] = hidden * hidden
            note("zero_optimization.reduce_bucket_size", hidden * hidden)
    for key, value in zero.items():
        if keys.is_auto(value) and keys.ZERO.get(key, keys.Key("refused")).kind != "tuning":
            raise refuse(f"zero_optimization.{key}")

    sched = (cfg.get("scheduler") or {}).get("params") or {}
    if keys.is_auto(sched.get("warmup_min_lr")):
        sched["warmup_min_lr"] = 0
        note("scheduler.params.warmup_min_lr", 0)
    if keys.is_auto(sched.get("warmup_max_lr")):
        sched["warmup_max_lr"] = params.get("lr", 1e-3)
        note("scheduler.params.warmup_max_lr", sched["warmup_max_lr"])
    for key, value in sched.items():
        if keys.is_auto(value):
            raise refuse(f"scheduler.params.{key}")
    for key, value in cfg.items():
        if keys.is_auto(value):
            raise refuse(key)


def translate(config: Union[str, dict[str, Any]], model: Optional[torch.nn.Module] = None) -> Translation:
    """Map a DeepSpeed config (dict or JSON path) onto ZeroAdam; raise ``ValueError`` naming any key that cannot
    be honoured, and list the keys that have no effect (``deepspeed_keys.py`` classifies every key).

    HF "auto" values are resolved as the HF Trainer does where the config and ``model`` (its ``config.hidden_size``)
    determine them, and refused otherwise (``deepspeed_keys.AUTO``)."""
    cfg = _load(config)
    out = Translation(zeroadam={}, deepspeed=cfg)
    zo = out.zeroadam
    _resolve_auto(cfg, model, out)
    stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
    # Stage 0: DeepSpeed's all-reduce averages the gradients and honours the keys that tune it.
    all_reduce_keys = ("prescale_gradients", "gradient_predivide_factor", "communication_data_type")
    top = {k: v for k, v in cfg.items() if k in keys.TOP_LEVEL and not (stage == 0 and k in all_reduce_keys)}
    top = {k: v.get("enabled", False) if isinstance(v, dict) and k == "amp" else v for k, v in top.items()}
    _check_keys(top, keys.TOP_LEVEL, "", out)

    opt = cfg.pop("optimizer", None) or {"type": "ZeroAdam"}
    kind = str(opt.get("type", "ZeroAdam"))
    if kind.lower() not in _TYPES:
        raise _bad("optimizer.type", kind, "is not AdamW; expected 'ZeroAdam', 'AdamW' or 'Adam'")
    params = opt.get("params") or {}
    for key, value in params.items():
        where = f"optimizer.params.{key}"
        if key in _OPTIMIZER_PARAMS:
            if key == "betas":
                if isinstance(value, str) or len(value) != 2:
                    raise _bad(where, value, "is invalid; expected two numbers [beta1, beta2]")
                value = tuple(value)
            zo[key] = value
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
    for key, value in _optimizer_defaults(kind.lower(), params).items():
        zo.setdefault(key, value)

    zero = cfg.pop("zero_optimization", None) or {}
    if stage not in (0, 1, 2, 3):
        raise _bad("zero_optimization.stage", stage, "is not a ZeRO stage (0, 1, 2, 3)")
    zo["stage"] = stage
    _check_keys(zero, keys.ZERO, "zero_optimization", out)
    _legacy_offload(zero, "cpu_offload", "offload_optimizer", out, stacklevel=4)
    for key, option in (("zero_quantized_weights", "quantized_weights"), ("zero_quantized_gradients", "quantized_gradients")):
        if zero.get(key, False):
            if stage == 0:
                raise _bad(f"zero_optimization.{key}", zero[key], "needs a zero_optimization.stage of 1-3 (8-bit "
                           "collectives of ZeroAdam's sharding; stage 0 reduces through DeepSpeed's all-reduce)")
            zo[option] = bool(zero[key])
    hpz = zero.get("zero_hpz_partition_size", 1)
    if not isinstance(hpz, int) or isinstance(hpz, bool) or hpz < 1:
        raise _bad("zero_optimization.zero_hpz_partition_size", hpz, "expected a number of ranks >= 1")
    out.hpz = hpz
    if "reduce_bucket_size" in zero:
        size = zero["reduce_bucket_size"]
        # DeepSpeed's own check (its ZeRO config refuses 0); here at every stage, ignored at 3 or not.
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not size >= 1:
            raise _bad("zero_optimization.reduce_bucket_size", size, "expected a number of elements >= 1 (DeepSpeed "
                       "refuses 0 as well); leave it out for ZeroAdam's default")
    if stage in (1, 2) and "reduce_bucket_size" in zero:
        zo["bucket_size"] = int(zero["reduce_bucket_size"])
    elif "reduce_bucket_size" in zero:
        out.ignored.append("zero_optimization.reduce_bucket_size")  # stage 3 reduce-scatters each unit whole
    offload = zero.get("offload_optimizer") or {}
    _check_keys(offload, keys.OFFLOAD_OPTIMIZER, "zero_optimization.offload_optimizer", out)
    device = offload.get("device", "none")
    if device == "cpu":
        zo["offload"] = "cpu"
    elif device not in ("none", None):
        raise _bad(
            "zero_optimization.offload_optimizer.device", device, "is not supported; ZeroAdam offloads to 'cpu' only"
        )
    out.offload_params = _offload_param(zero, stage, zo, out)
    out.gather_16bit_on_save = any(
        bool(zero.get(k))
        for k in ("gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
                  "stage3_gather_fp16_weights_on_model_save")
    )

    data_types = cfg.get("data_types") or {}
    accum = data_types.get("grad_accum_dtype")
    if stage >= 1 and accum is not None:
        # ZeroAdam keeps the gradient shards at stages 1-3; at stage 0 DeepSpeed accumulates and honours the key.
        grad = keys.GRAD_ACCUM_DTYPE.get(str(accum).lower())
        if grad is None:
            raise _bad(
                "data_types.grad_accum_dtype", accum, "is not supported; expected 'fp32' or 'bf16' (ZeroAdam's "
                "grad_dtype: a loss-scaled fp16 gradient shard loses its small gradients when unscaled)"
            )
        zo["grad_dtype"] = grad
        rest = {k: v for k, v in data_types.items() if k != "grad_accum_dtype"}
        if rest:
            cfg["data_types"] = rest
        else:
            cfg.pop("data_types")

    # DeepSpeed clips by default (1.0): the key's absence means that, here too.
    clip = float(cfg.get("gradient_clipping", 1.0) or 0.0)
    if clip > 0:
        zo["max_grad_norm"] = clip
    cfg["gradient_clipping"] = 0.0  # DeepSpeed would clip p.grad before ZeroAdam has averaged it
    if stage >= 1:
        # ZeroAdam averages the gradients: DeepSpeed's all-reduce, which these tune, does not run (see TOP_LEVEL).
        for key in all_reduce_keys:
            cfg.pop(key, None)
    for key in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"):
        cfg.pop(key, None)
    # Neither section reaches DeepSpeed: its fp16 / bf16 optimizers would wrap ZeroAdam and own the master weights.
    fp16 = cfg.pop("fp16", None) or {}
    bf16 = cfg.pop("bf16", None) or cfg.pop("bfloat16", None) or {}
    _check_keys(bf16, keys.BF16, "bf16", out)
    check = bf16.get("check_grad_overflow")
    if check is not None and not keys.is_auto(check):
        if not isinstance(check, bool):
            raise _bad("bf16.check_grad_overflow", check, "is invalid; expected true or false")
        zo["skip_nonfinite"] = check
    if fp16.get("enabled", False):
        if bf16.get("enabled", False):
            raise _bad("fp16.enabled", True, "and bf16.enabled=True are both set; enable one of them")
        out.dtype = torch.float16
        out.fp16 = Fp16Config.of(fp16)
    elif bf16.get("enabled", False):
        out.dtype = torch.bfloat16
    return out


def initialize(
    *,
    model: torch.nn.Module,
    config: Union[str, dict[str, Any]],
    model_parameters: Optional[Any] = None,
    mesh: Optional[Any] = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with ZeroAdam doing the sharding; returns DeepSpeed's
    ``(engine, optimizer, dataloader, lr_scheduler)``, where ``optimizer`` is the ZeroAdam.

    Stage 3 shards the model with ``zeroadam.shard_model`` (its default units); to choose units or prefetch, pass
    a model already sharded by ``shard_model`` on the accelerator's device (and in bf16 / fp16 for such a config).
    ``kwargs`` go to ``deepspeed.initialize`` (``training_data``, ``lr_scheduler``, ``collate_fn``, ...).

    ``mesh``: a ``("replicate", "shard")`` DeviceMesh for hybrid sharding (ZeroAdam's and shard_model's ``mesh=``);
    ``zero_hpz_partition_size: n`` > 1 needs one whose "shard" dim has n ranks (gathers stay within it; unlike
    DeepSpeed's hpZ, each replica then holds its own copy of the optimizer state's shards).

    With ``fp16``, ``optimizer.scaler`` is the ``DeepSpeedGradScaler`` that ``engine.backward`` and ``engine.step``
    use, and ``optimizer.overflow`` says whether the last step was skipped (see [Note: fp16 through DeepSpeed's
    engine]).
    """
    if "optimizer" in kwargs:
        raise ValueError("zeroadam.integrations.deepspeed.initialize builds the optimizer from the config; pass no optimizer")
    t = translate(config, model)
    _check_hpz(t.hpz, mesh)
    if t.ignored:
        warnings.warn(
            "zeroadam.integrations.deepspeed: these config keys tune DeepSpeed's own ZeRO and have no effect with "
            f"ZeroAdam: {', '.join(t.ignored)}",
            UserWarning,
            stacklevel=2,
        )
    if t.resolved:
        warnings.warn(f"zeroadam.integrations.deepspeed: resolved {'; '.join(t.resolved)}", UserWarning, stacklevel=2)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    stage = t.zeroadam["stage"]
    if t.dtype == torch.float16 and stage == 0 and torch.float16 not in accelerator.supported_dtypes():
        # DeepSpeed's all-reduce averages stage 0's gradients and asserts on a dtype its accelerator lacks.
        raise _bad(
            "fp16.enabled", True, f"at zero_optimization.stage 0 is not supported on this {device.type}: DeepSpeed "
            "itself refuses fp16 here (\"Type fp16 is not supported on your device\"), and its all-reduce of the "
            "gradients cannot take fp16. Use bf16.enabled (or fp32), or a zero_optimization.stage of 1-3, where "
            "ZeroAdam averages the gradients itself"
        )
    sharded: Optional[ShardedModel] = getattr(model, "_zeroadam_sharded", None)
    if sharded is not None:
        _check_sharded(model, stage, device, t.dtype)
        if sharded.offload_params != t.offload_params:
            raise _bad(
                "zero_optimization.offload_param.device", "cpu" if t.offload_params else "none",
                f"does not fit a model sharded by zeroadam.shard_model with offload_params={sharded.offload_params}; "
                f"shard it with offload_params={t.offload_params}, or pass the model unsharded",
            )
    else:
        # ZeroAdam's flat buffers (and shard_model's) are made on the parameters' device: move (and cast) first.
        model.to(device)
        if t.dtype is not None:
            model.to(t.dtype)
        if stage == 3:
            sharded = shard_model(model, mesh=mesh, offload_params=t.offload_params)._zeroadam_sharded  # type: ignore[assignment]
    params = model_parameters if model_parameters is not None else [p for p in model.parameters() if p.requires_grad]
    opt = ZeroAdam(params, **t.zeroadam, gradient_sync="optimizer", mesh=mesh)
    with _gathered(sharded):
        engine, optimizer, dataloader, scheduler = deepspeed.initialize(
            model=model, optimizer=opt, config=t.deepspeed, **kwargs
        )
    if optimizer is not opt:  # pragma: no cover - DeepSpeed wraps a client optimizer only for ZeRO or fp16 / bf16
        raise RuntimeError(f"zeroadam.integrations.deepspeed: DeepSpeed wrapped ZeroAdam in {type(optimizer).__name__}")
    if t.fp16 is not None:
        _scale_losses(engine, opt, t.fp16, device)
    if not opt.engine.averages_gradients:
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
                "zeroadam.integrations.deepspeed.save_checkpoint(engine, path) and load_checkpoint(engine, path) "
                "(model, optimizer, lr scheduler, step counters, fp16 loss scaler), or "
                "zeroadam.checkpoint.save(path, engine.module, optimizer) for the model and optimizer alone"
            )

        engine.save_checkpoint = engine.load_checkpoint = no_deepspeed_checkpoints
        engine.save_16bit_model = save_16bit_model(engine, t.gather_16bit_on_save)
    # Stage 1 reduces in step(); stage 3 in every backward (deferring would keep whole gradients in p.grad).
    if opt.options.stage == 2:

        def sync_on_boundary(module: torch.nn.Module, args: Any) -> None:
            # With gradient accumulation, stage 2 reduces only the last micro-batch's backward (which carries the
            # sum), as DeepSpeed's no_sync does.
            opt.engine.defer_gradient_sync(not engine.is_gradient_accumulation_boundary())

        engine.module.register_forward_pre_hook(sync_on_boundary)
    return engine, optimizer, dataloader, scheduler


def _check_hpz(hpz: int, mesh: Optional[Any]) -> None:
    """zero_hpz_partition_size (ZeRO++ hpZ, parameter gathers within a node) maps to a mesh's "shard" dim."""
    shards = None
    if mesh is not None and mesh.ndim == 2 and "shard" in (mesh.mesh_dim_names or ()):
        shards = mesh.size(mesh.mesh_dim_names.index("shard"))
    if hpz > 1 and shards != hpz:
        got = "no mesh" if mesh is None else f"a mesh of shape {tuple(mesh.shape)} ({mesh.mesh_dim_names})"
        raise _bad(
            "zero_optimization.zero_hpz_partition_size", hpz, f"needs a hybrid-sharding mesh with a 'shard' dim of "
            f"{hpz} ranks, got {got}: pass mesh=torch.distributed.device_mesh.init_device_mesh(device_type, "
            f"(world_size // {hpz}, {hpz}), mesh_dim_names=('replicate', 'shard')) to zds.initialize (gathers then "
            "stay within each group of {hpz} ranks), or remove the key".replace("{hpz}", str(hpz))
        )


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
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        raise _bad(
            f"{name}.enabled", True, f"needs {name} parameters, and this model was sharded in another dtype; cast it "
            f"before sharding: zeroadam.shard_model(model.to({dtype}))"
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


# ---------------------------------------------------------------------------------------------- fp16
class DeepSpeedGradScaler(GradScaler):
    """``zeroadam.GradScaler`` whose scale follows DeepSpeed's own loss scaler, so that every ``fp16`` key means
    what it means in DeepSpeed.

    torch's GradScaler scales the loss, finds non-finite gradients (ZeroAdam's check over the global gradient norm,
    the same verdict on every rank) and has ZeroAdam skip the step; ``update`` hands that verdict to the loss scaler
    DeepSpeed's fp16 optimizers use (``DynamicLossScaler``: ``loss_scale_window``, ``hysteresis``,
    ``consecutive_hysteresis``, ``min_loss_scale``; ``LossScaler`` for a static ``loss_scale``) and takes its
    scale. ``step`` also sets ``optimizer.overflow``, which DeepSpeed's engine reads.
    """

    loss_scaler: Any  # deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler, or LossScaler for a static scale

    # The loss scaler's counters that state_dict carries (its options come from the config).
    _COUNTERS: tuple[str, ...] = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def __init__(self, fp16: Fp16Config, *, device: str) -> None:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        if fp16.loss_scale > 0:
            self.loss_scaler = LossScaler(scale=fp16.loss_scale)
        else:
            self.loss_scaler = DynamicLossScaler(
                init_scale=2.0**fp16.initial_scale_power,
                scale_window=fp16.loss_scale_window,
                min_scale=fp16.min_loss_scale,
                delayed_shift=fp16.hysteresis,
                consecutive_hysteresis=fp16.consecutive_hysteresis,
            )
        super().__init__(device, init_scale=float(self.loss_scaler.cur_scale))

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        skipped = optimizer.skipped_steps  # type: ignore[attr-defined]
        retval = super().step(optimizer, *args, **kwargs)
        # ZeroAdam's own count: it skipped the step on every rank, or on none.
        optimizer.overflow = optimizer.skipped_steps != skipped  # type: ignore[attr-defined]
        return retval

    def update(self, new_scale: Optional[Union[float, torch.Tensor]] = None) -> None:
        if new_scale is not None:
            self.loss_scaler.cur_scale = float(new_scale)
        elif self.is_enabled():
            found = [t for st in self._per_optimizer_states.values() for t in st["found_inf_per_device"].values()]
            if found:  # none: the parent raises its own error (update before step)
                try:
                    # Raises on an overflow at min_loss_scale, as DeepSpeed does; the scaler is left consistent.
                    self.loss_scaler.update_scale(any(float(t) > 0 for t in found))
                finally:
                    super().update(float(self.loss_scaler.cur_scale))
                return
        super().update(new_scale)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if out:
            ls = self.loss_scaler
            out["deepspeed_loss_scaler"] = {k: getattr(ls, k) for k in self._COUNTERS if hasattr(ls, k)}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("deepspeed_loss_scaler", {"cur_scale": state_dict.get("scale", self.get_scale())})
        super().load_state_dict(state_dict)
        for k, v in counters.items():
            setattr(self.loss_scaler, k, v)


def _scale_losses(engine: Any, opt: ZeroAdam, fp16: Fp16Config, device: torch.device) -> None:
    """fp16: a ``DeepSpeedGradScaler`` in the engine's backward and step; ``optimizer.scaler`` is it.

    [Note: fp16 through DeepSpeed's engine]
    DeepSpeed runs this engine with ZeRO off and no fp16 section, and its engine has one place for a GradScaler
    there: ``engine.torch_autocast_z0_gradscaler`` (which it fills for ``torch_autocast`` fp16 without ZeRO).
    Installed there, ``engine.backward(loss)`` (and ``engine.scale(loss)``) scales
    ``loss / gradient_accumulation_steps``; a ``loss.backward()`` that skipped the scaling raises. At the
    accumulation boundary ``engine.step()`` calls ``scaler.step(optimizer)`` and ``scaler.update()`` (GradScaler
    calls ``optimizer.step()``: nothing is patched, nothing recurses); it never unscales first, because
    ``gradient_clipping`` is 0 in the config it got (ZeroAdam clips inside the update, by the unscaled global
    norm). Then it reads ``optimizer.overflow``: on a skipped step it adds one to ``engine.skipped_steps`` and does
    not step the lr scheduler, as with DeepSpeed's own fp16 optimizers; ``engine.global_steps`` advances either
    way, and ``engine.was_step_applied()`` is False.
    """
    if not hasattr(engine, "torch_autocast_z0_gradscaler"):
        raise RuntimeError(
            "zeroadam.integrations.deepspeed: fp16.enabled needs a DeepSpeed whose engine takes a GradScaler without "
            "ZeRO (engine.torch_autocast_z0_gradscaler; tested with deepspeed 0.19.8); upgrade DeepSpeed, or use bf16"
        )
    scaler = DeepSpeedGradScaler(fp16, device=device.type)
    engine.torch_autocast_z0_gradscaler = scaler
    opt.scaler = scaler  # type: ignore[attr-defined]
    opt.overflow = False  # type: ignore[attr-defined]
    if fp16.auto_cast:
        engine.module.register_forward_pre_hook(lambda module, args: _to_half(args))
    _checkpoint_scaler(engine, scaler)


# Where the engine's checkpoints keep the fp16 loss scaler: a client_state key of the model-states file.
SCALER_KEY = "zeroadam_fp16_scaler"


def _checkpoint_scaler(engine: Any, scaler: "DeepSpeedGradScaler") -> None:
    """Carry the loss scaler in the engine's checkpoints (``client_state[SCALER_KEY]``): a resumed fp16 run goes on
    with the scale, hysteresis and growth counters where they were, as DeepSpeed's own fp16 optimizers do."""
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(
        save_dir: str, tag: Any = None, client_state: Optional[dict] = None, *args: Any, **kwargs: Any
    ) -> Any:
        state = {**(client_state or {}), SCALER_KEY: scaler.state_dict()}
        return save(save_dir, tag, state, *args, **kwargs)

    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        path, client_state = load(*args, **kwargs)
        if client_state is not None and SCALER_KEY in client_state:
            scaler.load_state_dict(client_state.pop(SCALER_KEY))
        return path, client_state

    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


def _to_half(x: Any) -> Any:
    """DeepSpeed's ``auto_cast``: floating-point tensors to fp16, through lists, tuples and dicts."""
    if isinstance(x, (list, tuple)):
        return type(x)(_to_half(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_half(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.half()
    return x


# ---------------------------------------------------------------------------------------------- registration
class _MappedState(ParamState):
    """A parameter's state that DeepSpeed's ZeRO can also read as a dict of tensors: it maps each tensor shaped
    like the flat partition onto the model's parameters (its fragment API, universal checkpoints)."""

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
        assert isinstance(self.engine, LocalEngine)  # stage 0, refused otherwise above
        self.engine.state_class = _MappedState


def _check_inside_deepspeed_zero(optimizer: ZeroAdam) -> None:
    """A ZeroAdam the user built, handed to DeepSpeed's own ZeRO 1/2 (``deepspeed.initialize(optimizer=...)``):
    DeepSpeed shards, averages and clips, and replaces each group's parameters by its flat fp32 partition, which a
    stage-0 ZeroAdam updates like any parameter. One that shards, offloads or clips itself would do it a second
    time over the partitions (its clipping norm would be this rank's partition's alone): refused here, at
    construction."""
    o = optimizer.options
    for key, value, default in (
        ("stage", o.stage, 0),
        ("offload", o.offload, None),
        ("max_grad_norm", o.max_grad_norm, None),
    ):
        if value != default:
            raise ValueError(
                f"ZeroAdam({key}={value!r}) inside DeepSpeed's zero_optimization: DeepSpeed already shards, offloads "
                "and clips (zero_optimization, offload_optimizer, gradient_clipping). Build ZeroAdam with stage=0 and "
                "no max_grad_norm, or let DeepSpeed build it: \"optimizer\": {\"type\": \"ZeroAdam\", \"params\": "
                "{...}} after import zeroadam.integrations.deepspeed; or use zeroadam.integrations.deepspeed.initialize "
                "for ZeroAdam's own sharding"
            )


def _register() -> None:
    """Where DeepSpeed looks: ``torch.optim.<type>`` for unknown types, and ZeRO's list of tested optimizers."""
    torch.optim.ZeroAdam = DeepSpeedZeroAdam  # type: ignore[attr-defined]
    from deepspeed.runtime.zero import utils as zero_utils

    for cls in (DeepSpeedZeroAdam, ZeroAdam):
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)
    # DeepSpeed's engine asks this (its own module's name for it) about every optimizer ZeRO will wrap: the one
    # place where a user's ZeroAdam is seen at construction.
    from deepspeed.runtime import engine as ds_engine

    supported = ds_engine.is_zero_supported_optimizer
    if getattr(supported, "_zeroadam_checked", False):
        return

    def is_zero_supported_optimizer(optimizer: Any) -> bool:
        if isinstance(optimizer, ZeroAdam):
            _check_inside_deepspeed_zero(optimizer)
        return supported(optimizer)

    is_zero_supported_optimizer._zeroadam_checked = True  # type: ignore[attr-defined]
    ds_engine.is_zero_supported_optimizer = is_zero_supported_optimizer


_register()
