"""The kernel contract: what one fused update receives, and the composition every backend must match.

A *run* is a contiguous 1D range of parameter values with its gradient, moments and master storage; it starts on a
block boundary of its parameter. ``update_torch`` composes the formats (``zeroadam.formats``) with the pure fp32
reference (``zeroadam.reference``): it is the definition that the compiled CPU kernel and the Triton kernels are
tested against. ``coefficients`` is the one place the step's scalars are derived from the hyperparameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from zeroadam.formats.state import STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, STREAM_PARAM, Master, Moments, mix_seed
from zeroadam.options import GroupHyper
from zeroadam.reference import adamw_reference, bias_corrections

__all__ = ["Run", "StepScalars", "Coefficients", "coefficients", "update_torch", "Backend"]


@dataclass
class Run:
    param: torch.Tensor  # 1D [n], fp32 / bf16 / fp16; updated in place
    grad: torch.Tensor  # 1D [n], fp32 / bf16 / fp16 (scaled by StepScalars.grad_scale before use)
    moments: Moments
    master: Master
    index_base: int  # position of element 0 in the group's block-aligned layout (hash index for rounding)


@dataclass(frozen=True)
class StepScalars:
    """What one step of one param group needs besides the tensors."""

    hyper: GroupHyper
    step: int  # this update's count, 1 for the first
    grad_scale: float  # multiplies every gradient: ±1 (maximize) × clip coefficient / loss scale
    group_index: int

    @staticmethod
    def for_group(hyper: GroupHyper, step: int, scale: float, group_index: int) -> "StepScalars":
        """The scalars of one group's step, with ``scale`` (clip / loss scale) signed for ``maximize``: ascending
        is descending on the negated gradient, so every backend gets it for free."""
        return StepScalars(hyper, step, -scale if hyper.maximize else scale, group_index)

    def seeds(self) -> tuple[int, int, int]:
        """Rounding seeds for (exp_avg, exp_avg_sq, param)."""
        return tuple(mix_seed(self.step, self.group_index, s) for s in (STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, STREAM_PARAM))  # type: ignore[return-value]


class Coefficients(NamedTuple):
    """The step's floats, in the Triton kernels' argument order, computed in float64 as ``adamw_reference``
    computes them (kernels receive them as fp32, as torch's ops round a Python scalar)."""

    grad_scale: float
    decay: float  # 1 - lr * weight_decay
    lerp_weight: float  # 1 - beta1
    beta2: float
    one_minus_beta2: float
    step_size: float  # -lr / (1 - beta1^t)
    bc2_sqrt: float  # sqrt(1 - beta2^t)
    eps: float


def coefficients(sc: StepScalars) -> Coefficients:
    h = sc.hyper
    inv_bc1, bc2_sqrt = bias_corrections(h.beta1, h.beta2, sc.step)
    return Coefficients(
        grad_scale=float(sc.grad_scale),
        decay=1.0 - h.lr * h.weight_decay,
        lerp_weight=1.0 - h.beta1,
        beta2=h.beta2,
        one_minus_beta2=1.0 - h.beta2,
        step_size=-h.lr * inv_bc1,
        bc2_sqrt=bc2_sqrt,
        eps=h.eps,
    )


def update_torch(run: Run, sc: StepScalars) -> None:
    """Dequantize, apply the reference update, requantize: the definition every backend must match."""
    h = sc.hyper
    g = run.grad.float() * sc.grad_scale
    x = run.master.read(run.param)
    m, v = run.moments.load()
    adamw_reference(
        x, g, m, v, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay, step=sc.step
    )
    seed_m, seed_v, seed_p = sc.seeds()
    run.moments.store(m, v, index_base=run.index_base, seed_m=seed_m, seed_v=seed_v)
    run.master.write(x, run.param, index_base=run.index_base, seed=seed_p)


Backend = Callable[[Run, StepScalars], None]
