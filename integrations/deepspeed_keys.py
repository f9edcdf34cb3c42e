"""The one table of DeepSpeed config keys under ``zeroadam.integrations.deepspeed.initialize``, and the HF ``"auto"``
values it resolves.

Each key of DeepSpeed's ZeRO schema (``DeepSpeedZeroConfig`` and its aliases), its ``offload_optimizer`` and ``bf16``
sections, and each top-level key that zds reads or rewrites, is one of:

* ``honoured``: zds maps it onto ZeroAdam (or hands it to DeepSpeed, which runs it as usual);
* ``tuning``: it tunes DeepSpeed's own ZeRO engine (buckets, overlap, prefetch, ...), which does not run under zds;
  it cannot change results, and one warning lists every such key present;
* ``refused``: it changes results and ZeroAdam has no such thing: a value other than DeepSpeed's default raises
  ``ValueError`` naming the key and the reason.

``tests/test_integration_deepspeed.py`` walks the installed DeepSpeed's pydantic models, so a field added by a new
release that is missing here fails that test instead of falling through.

Top-level keys not in ``TOP_LEVEL`` (batch sizes, ``scheduler``, logging, ``checkpoint``, ...) go to DeepSpeed as they
are: its engine still runs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

__all__ = [
    "Key", "ZERO", "OFFLOAD_OPTIMIZER", "BF16", "TOP_LEVEL", "GRAD_ACCUM_DTYPE", "AUTO", "is_auto", "hidden_size"
]

Kind = Literal["honoured", "tuning", "refused"]


@dataclass(frozen=True)
class Key:
    kind: Kind
    why: str = ""
    """For ``refused``: why, and what to use instead. For ``honoured``: what zds does with it."""
    accepted: tuple[Any, ...] = ()
    """For ``refused``: the values that change nothing (DeepSpeed's default), accepted silently."""


_TUNING = Key("tuning")
_OFF = (False, None)


def _refused(why: str, accepted: tuple[Any, ...] = _OFF) -> Key:
    return Key("refused", why, accepted)


_QUANTIZED = "stores frozen weights quantized, which changes results; ZeroAdam keeps every parameter exact"

# zero_optimization: every field of DeepSpeedZeroConfig, under its name and its alias (DeepSpeed accepts both).
ZERO: dict[str, Key] = {
    "stage": Key("honoured", "ZeroAdam's stage"),
    "reduce_bucket_size": Key("honoured", "stages 1-2: ZeroAdam's bucket_size; stage 3: no effect"),
    "offload_optimizer": Key("honoured", "device 'cpu': ZeroAdam's offload='cpu'"),
    "cpu_offload": Key("honoured", "DeepSpeed's deprecated spelling of offload_optimizer: {'device': 'cpu'}"),
    "offload_param": Key("honoured", "device 'cpu' at stage 3: zeroadam.shard_model(offload_params=True); see OFFLOAD_PARAM"),
    "cpu_offload_param": Key("honoured", "DeepSpeed's deprecated spelling of offload_param: {'device': 'cpu'}"),
    "gather_16bit_weights_on_model_save": Key("honoured", "stage 3: engine.save_16bit_model gathers the weights"),
    "stage3_gather_16bit_weights_on_model_save": Key("honoured", "alias of gather_16bit_weights_on_model_save"),
    "stage3_gather_fp16_weights_on_model_save": Key("honoured", "deprecated alias of gather_16bit_weights_on_model_save"),
    "zenflow": _refused("(ZenFlow) applies part of each update late, which changes results; ZeroAdam updates every step"),
    "zero_quantized_weights": Key("honoured", "ZeroAdam's quantized_weights: int8 parameter all-gathers (qwZ)"),
    "zero_quantized_gradients": Key("honoured", "ZeroAdam's quantized_gradients: int8 gradient reductions (qgZ)"),
    "zero_quantized_nontrainable_weights": _refused(_QUANTIZED),
    "zero_hpz_partition_size": Key(
        "honoured", "1: nothing; n > 1: zds.initialize(mesh=...) with a 'shard' dim of n ranks (hybrid sharding)"
    ),
    **dict.fromkeys(
        [
            "contiguous_gradients",
            "reduce_scatter",
            "use_multi_rank_bucket_allreduce",
            "allgather_partitions",
            "allgather_bucket_size",
            "overlap_comm",
            "compute_grad_norm",
            "load_from_fp32_weights",
            "elastic_checkpoint",
            "sub_group_size",
            "cpu_offload_use_pin_memory",
            "prefetch_bucket_size",
            "stage3_prefetch_bucket_size",
            "param_persistence_threshold",
            "stage3_param_persistence_threshold",
            "model_persistence_threshold",
            "stage3_model_persistence_threshold",
            "max_live_parameters",
            "stage3_max_live_parameters",
            "max_reuse_distance",
            "stage3_max_reuse_distance",
            "module_granularity_threshold",
            "stage3_module_granularity_threshold",
            "use_all_reduce_for_fetch_params",
            "stage3_use_all_reduce_for_fetch_params",
            "allgather_sequential",
            "stage3_allgather_sequential",
            "ignore_unused_parameters",
            "legacy_stage1",
            "round_robin_gradients",
            "parameter_alignment",
            "memory_efficient_linear",
            "pipeline_loading_checkpoint",
            "override_module_apply",
            "log_trace_cache_warnings",
            "enable_sanity_checks",
            "save_muon_momentum_buffer_in_memory",
            "leaf_module",
        ],
        _TUNING,
    ),
}

# zero_optimization.offload_optimizer: every field of DeepSpeedZeroOffloadOptimizerConfig.
OFFLOAD_OPTIMIZER: dict[str, Key] = {
    "device": Key("honoured", "'cpu' offloads ZeroAdam's state; 'none' nothing; 'nvme' is refused"),
    "pin_memory": Key("honoured", "ZeroAdam pins its host state"),
    **dict.fromkeys(
        ["nvme_path", "buffer_count", "pipeline_read", "pipeline_write", "fast_init", "ratio", "super_offload",
         "cpuadam_cores_perc", "pipeline"],
        _TUNING,
    ),
}

# zero_optimization.offload_param: every field of DeepSpeedZeroOffloadParamConfig.
OFFLOAD_PARAM: dict[str, Key] = {
    "device": Key(
        "honoured",
        "'cpu' keeps the parameter shards on the host (stage 3, with offload_optimizer 'cpu'); 'none' nothing; "
        "'nvme' is refused",
    ),
    "pin_memory": Key("honoured", "ZeroAdam pins the host parameter shards whenever a GPU is present"),
    **dict.fromkeys(["nvme_path", "buffer_count", "buffer_size", "max_in_cpu"], _TUNING),  # NVMe offload only
}

# bf16 (or its old name bfloat16): every field of DeepSpeedBF16Config.
BF16: dict[str, Key] = {
    "enabled": Key("honoured", "casts the model to bf16; ZeroAdam keeps compact master weights"),
    "immediate_grad_update": _TUNING,
    "check_grad_overflow": Key(
        "honoured", "ZeroAdam's skip_nonfinite: false updates through non-finite gradients as DeepSpeed then does"
    ),
    "bf16_master_weights_and_grads": _refused(
        "is not supported: ZeroAdam keeps the master weights; choose them with optimizer.params.master_weights "
        "('auto': compact, 'fp32', or 'none': update the bf16 parameters directly)"
    ),
    "bf16_optimizer_states": _refused(
        "is not supported as such: ZeroAdam's moments are chosen with optimizer.params.state_dtype "
        "('int8', 'bf16', 'fp32', ...)"
    ),
}

# Top-level keys that zds reads or rewrites; the others go to DeepSpeed untouched.
_AVERAGED_BY_ZEROADAM = (
    "only tunes DeepSpeed's gradient all-reduce; at stages 1-3 ZeroAdam averages the gradients itself in fp32 "
    "(stage 0: DeepSpeed's all-reduce runs and honours it)"
)
TOP_LEVEL: dict[str, Key] = {
    "optimizer": Key("honoured", "ZeroAdam's hyperparameters"),
    "zero_optimization": Key("honoured", "see ZERO"),
    "gradient_clipping": Key("honoured", "ZeroAdam's max_grad_norm (DeepSpeed's default 1.0 when absent)"),
    "fp16": Key("honoured", "casts the model; DeepSpeedGradScaler follows DeepSpeed's loss-scale policy"),
    "bf16": Key("honoured", "see BF16"),
    "bfloat16": Key("honoured", "DeepSpeed's old name of bf16"),
    "zero_allow_untested_optimizer": Key("honoured", "nothing to allow: ZeroAdam is the optimizer"),
    "zero_force_ds_cpu_optimizer": Key("honoured", "nothing to force: offload_optimizer runs ZeroAdam on the host"),
    "prescale_gradients": Key("tuning", _AVERAGED_BY_ZEROADAM),
    "gradient_predivide_factor": Key("tuning", _AVERAGED_BY_ZEROADAM),
    "communication_data_type": _refused(
        "reduces the gradients in that precision; at stages 1-3 ZeroAdam reduces them in fp32 (stage 0: DeepSpeed's "
        "all-reduce honours it)",
        accepted=(None, "fp32", "float32"),
    ),
    "amp": _refused("(NVIDIA apex amp) wraps the optimizer; use bf16 or fp16", accepted=(None, False)),
    "data_types": Key(
        "honoured", "stages 1-3: grad_accum_dtype is ZeroAdam's grad_dtype ('fp32' or 'bf16'); the other keys go to "
        "DeepSpeed"
    ),
}

GRAD_ACCUM_DTYPE: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16"
}
"""DeepSpeed's ``data_types.grad_accum_dtype`` spellings and the ``grad_dtype`` each becomes; fp16 is refused (a
loss-scaled fp16 gradient shard flushes small gradients to zero when unscaled: [Note: 16-bit gradient shards])."""

# ---------------------------------------------------------------------------------------------- "auto"
# [Note: HF "auto" values]
# The HF Trainer fills the "auto" values of its DeepSpeed config files (transformers' trainer_config_process and
# trainer_config_finalize) from TrainingArguments, the model's config and the number of training steps. zds has the
# model and the config, not the Trainer's arguments, so it resolves what those determine and refuses the rest,
# naming the key. AUTO says, per dotted key, what "auto" becomes; a key that is not here and not a tuning key
# (where "auto" changes nothing, as in DeepSpeed's own pydantic sections, which drop "auto") is refused.
AUTO: dict[str, str] = {
    "optimizer.params.lr": "refused: the Trainer fills it from TrainingArguments.learning_rate; set a number",
    "optimizer.params.betas": "the optimizer type's default, (0.9, 0.999) (the Trainer's adam_beta1/adam_beta2 default)",
    "optimizer.params.eps": "the optimizer type's default, 1e-8 (the Trainer's adam_epsilon default)",
    "optimizer.params.weight_decay": "the optimizer type's default (Adam/AdamW: 0.0, the Trainer's default too)",
    "gradient_clipping": "1.0, DeepSpeed's default and the Trainer's max_grad_norm default",
    "fp16.enabled": "off, as the Trainer resolves it unless --fp16",
    "bf16.enabled": "off, as the Trainer resolves it unless --bf16",
    "train_micro_batch_size_per_gpu": "left to DeepSpeed, derived from the other batch sizes (refused if none is set)",
    "train_batch_size": "left to DeepSpeed, derived from the other batch sizes (refused if none is set)",
    "gradient_accumulation_steps": "left to DeepSpeed: 1, or derived from the two batch sizes",
    "zero_optimization.reduce_bucket_size": "hidden_size**2 from model.config, as the Trainer; else ZeroAdam's default",
    "zero_optimization.stage3_prefetch_bucket_size": "no effect (tuning); the Trainer's 0.9 * hidden_size**2",
    "zero_optimization.stage3_param_persistence_threshold": "no effect (tuning); the Trainer's 10 * hidden_size",
    "scheduler.params.warmup_min_lr": "0, as the Trainer",
    "scheduler.params.warmup_max_lr": "optimizer.params.lr, as the Trainer",
    "scheduler.params.warmup_num_steps": "refused: the Trainer derives it from its warmup arguments; set a number",
    "scheduler.params.total_num_steps": "refused: the Trainer derives it from the length of training; set a number",
}


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def hidden_size(model: Optional[torch.nn.Module]) -> Optional[int]:
    """The hidden size the HF Trainer reads from ``model.config`` (the largest of ``hidden_sizes``; a text config's)."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        if isinstance(getattr(cfg, "hidden_size", None), int):
            return int(cfg.hidden_size)
        if getattr(cfg, "hidden_sizes", None):
            return int(max(cfg.hidden_sizes))
    return None
