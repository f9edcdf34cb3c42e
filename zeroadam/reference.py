"""The pure fp32 AdamW update: the truth every fast path is tested against.

It never sees a storage format: callers dequantize before and requantize after. The arithmetic follows
``torch.optim.AdamW`` (single-tensor path) operation for operation, so that fp32 state matches it to rounding.
"""
from __future__ import annotations

import math

import torch

__all__ = ["adamw_reference", "bias_corrections"]


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(lr multiplier 1 / (1 - beta1^t), sqrt(1 - beta2^t)) for step t >= 1, in float64 as torch computes them."""
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    return 1.0 / bc1, bc2_sqrt


def adamw_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One decoupled-weight-decay Adam step, in place, on fp32 tensors of one shape.

    ``grad`` is the final gradient (already unscaled and clipped); ``step`` counts this update (1 for the first).
    """
    assert param.dtype == grad.dtype == exp_avg.dtype == exp_avg_sq.dtype == torch.float32
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    inv_bc1, bc2_sqrt = bias_corrections(beta1, beta2, step)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr * inv_bc1)
