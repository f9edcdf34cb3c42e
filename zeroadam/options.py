"""Validated optimizer options.

Every user-facing ``ValueError`` about an option is raised here, so that the message format is the same
everywhere: the argument, the value, and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

__all__ = [
    "StateDtype",
    "MasterWeights",
    "Offload",
    "GradientSync",
    "GradDtype",
    "ZeroOptions",
    "grad_dtype_for",
    "GroupHyper",
    "check_hyper",
    "BLOCK_SIZE",
    "MIN_QUANT_NUMEL",
]

StateDtype = Literal["int8", "bf16", "fp32"]
MasterWeights = Literal["auto", "fp32", "compact", "none"]
Offload = Literal["cpu"]
GradientSync = Literal["auto", "optimizer", "wrapper"]
GradDtype = Literal["fp32", "bf16", "auto"]

# Quantization block along a parameter's flattened (global) index. Shard boundaries fall on block boundaries,
# so the int8 state never depends on how a parameter is later split across ranks.
BLOCK_SIZE = 256
# Small tensors (biases, norms) keep fp32 state: their 8-bit savings are negligible and their moments are the
# most sensitive to quantization error.
MIN_QUANT_NUMEL = 4096


def _bad(arg: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"ZeroAdam: invalid {arg}={value!r}; {allowed}")


def _check_choice(arg: str, value: object, literal: object) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise _bad(arg, value, "expected one of " + ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class GroupHyper:
    """The per-group hyperparameters of one AdamW update (all plain Python numbers)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False  # ascend: the update uses the negated gradient (torch.optim.AdamW's flag)

    @staticmethod
    def of(group: dict) -> "GroupHyper":
        """The hyperparameters of a torch param group, read at step time (schedulers change them)."""
        b1, b2 = group["betas"]
        return GroupHyper(
            lr=float(group["lr"]),
            beta1=float(b1),
            beta2=float(b2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            maximize=bool(group.get("maximize", False)),
        )


def check_hyper(lr: object, betas: object, eps: object, weight_decay: object) -> None:
    """Validate AdamW hyperparameters; a tensor lr is allowed (as in torch.optim), any other type is not."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise _bad("lr", lr, "Tensor lr must be 1-element (for example lr=torch.tensor(1e-3))")
    lr_value = lr.item() if isinstance(lr, torch.Tensor) else lr
    if not isinstance(lr_value, (int, float)) or isinstance(lr_value, bool) or not math.isfinite(lr_value) or lr_value < 0:
        raise _bad("lr", lr, "expected a finite number >= 0 (for example lr=1e-3)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise _bad("betas", betas, "expected a pair (beta1, beta2), each in [0, 1), for example (0.9, 0.999)")
    for i, beta in enumerate(betas):
        b = beta.item() if isinstance(beta, torch.Tensor) and beta.numel() == 1 else beta  # as torch.optim.AdamW
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not (0.0 <= b < 1.0):
            raise _bad(f"betas[{i}]", beta, "expected a number in [0, 1), for example betas=(0.9, 0.999)")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise _bad("eps", eps, "expected a finite number >= 0 (for example eps=1e-8)")
    if (
        not isinstance(weight_decay, (int, float))
        or isinstance(weight_decay, bool)
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise _bad("weight_decay", weight_decay, "expected a finite number >= 0 (0 disables decay)")


@dataclass(frozen=True, kw_only=True)
class ZeroOptions:
    """Options that hold for the whole optimizer (not per param group)."""

    state_dtype: StateDtype = "int8"
    """Storage of exp_avg / exp_avg_sq: 8-bit blocks, bf16 with stochastic rounding, or fp32."""
    master_weights: MasterWeights = "auto"
    """For 16-bit parameters: an fp32 copy, the 16-bit value plus an int8 residual, or nothing."""
    max_grad_norm: Optional[float] = None
    """Global-norm clipping applied inside the update; None disables it."""
    stage: int = 0
    """ZeRO stage: 0 none, 1 state sharded, 2 state and gradients sharded, 3 parameters too."""
    offload: Optional[Offload] = None
    """Where the shard's state lives and is updated: None (with the parameters) or "cpu"."""
    bucket_size: int = 5_000_000
    """Elements per stage-2 gradient bucket; larger buckets mean fewer, larger collectives."""
    quantized_weights: bool = False
    """Stages 1-3: parameter all-gathers send int8 blocks (ZeRO++ qwZ); the shards the update writes stay exact."""
    quantized_gradients: bool = False
    """Stages 1-3: gradient reductions send int8 blocks and sum in fp32 on arrival (ZeRO++ qgZ)."""
    gradient_sync: GradientSync = "auto"
    """Stages 1-2: who averages gradients over ranks: "optimizer" (ZeroAdam's collectives; the model is not wrapped
    in DDP), "wrapper" (a DDP-wrapped model already holds the average in p.grad), or "auto" ("wrapper" when a
    DistributedDataParallel forward ran over these parameters, or Accelerate wraps models in DDP); see [Note:
    gradients averaged by a wrapper] in grad_sync.py."""

    grad_dtype: GradDtype = "fp32"
    """Stages 1-3 and offload: the dtype of the reduced gradient shard and of the buckets / reduce-scatters that
    fill it. "bf16" halves the gradient memory and traffic; "auto" is bf16 for bf16 parameters and fp32 otherwise
    (see [Note: 16-bit gradient shards] in zeroadam/options.py)."""
    release_grads: bool = False
    """Update each unit (stage 3), bucket (stage 2) or parameter (stage 0) as soon as its gradient of the last
    micro-batch is final, inside backward, and free the gradient; no rank holds a whole gradient shard. Refuses
    global-norm clipping and an fp16 GradScaler (both need every gradient before the first update)."""
    skip_nonfinite: bool = True
    """Skip a step whose gradients hold an inf or NaN on any rank, leaving parameters and state untouched (counted
    in ``skipped_steps``). False updates as ``torch.optim.AdamW`` does, non-finite values and all, and a step
    that needs no norm (one process, no clipping, no GradScaler) then reads no gradient before its update; see
    [Note: the non-finite skip] in zeroadam/optimizer.py. A GradScaler's found inf still skips the step."""

    def __post_init__(self) -> None:
        _check_choice("state_dtype", self.state_dtype, StateDtype)
        _check_choice("grad_dtype", self.grad_dtype, GradDtype)
        if not isinstance(self.release_grads, bool):
            raise _bad("release_grads", self.release_grads, "expected True or False")
        if not isinstance(self.skip_nonfinite, bool):
            raise _bad("skip_nonfinite", self.skip_nonfinite, "expected True or False")
        if self.release_grads and self.max_grad_norm is not None:
            # The reason lives in [Note: released gradients] (zeroadam/engines/release.py).
            raise _bad(
                "max_grad_norm", self.max_grad_norm, "with release_grads=True: global-norm clipping needs every "
                "gradient before the first update, and release_grads updates each unit during backward; use "
                "max_grad_norm=None, or release_grads=False to clip"
            )
        _check_choice("master_weights", self.master_weights, MasterWeights)
        _check_choice("gradient_sync", self.gradient_sync, GradientSync)
        if self.offload is not None:
            _check_choice("offload", self.offload, Offload)
        if self.max_grad_norm is not None:
            v = self.max_grad_norm
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise _bad("max_grad_norm", v, "expected None or a finite number > 0")
        if not isinstance(self.stage, int) or isinstance(self.stage, bool) or self.stage not in (0, 1, 2, 3):
            raise _bad("stage", self.stage, "expected 0, 1, 2 or 3")
        for name in ("quantized_weights", "quantized_gradients"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _bad(name, value, "expected True or False")
            if value and self.stage == 0:
                raise _bad(
                    name, value, "8-bit collectives need a sharded stage: use stage=1, 2 or 3 (stage=0 communicates "
                    "nothing of its own; a DDP wrapper reduces its gradients)"
                )
        if not isinstance(self.bucket_size, int) or self.bucket_size < 1:
            raise _bad("bucket_size", self.bucket_size, "expected a positive number of elements (default 5_000_000)")


# [Note: 16-bit gradient shards]
# A bf16 gradient shard (and the bf16 buckets / reduce-scatters that fill it) halves the gradient bytes held and
# sent. The update reads it as fp32 (every backend widens the gradient on load). "auto" does not give fp16
# parameters an fp16 shard: a loss-scaled fp16 gradient unscaled in place (GradScaler.unscale_) flushes the small
# gradients to zero (fp16's smallest subnormal is 6e-8), while bf16 has fp32's range; fp16 parameters keep fp32
# shards unless "bf16" is asked for. Micro-batches accumulated outside no_sync() add into the 16-bit shard: the
# cost measured on char-GPT is in README.md (benchmarks/grad_dtype.py).


def grad_dtype_for(option: GradDtype, param_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the gradient shard of parameters of ``param_dtype`` under ``grad_dtype=option``."""
    if option == "bf16" or (option == "auto" and param_dtype == torch.bfloat16):
        return torch.bfloat16
    return torch.float32
