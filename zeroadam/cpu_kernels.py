"""The fast CPU update.

fp32 moments on an fp32 parameter use torch's fused CPU AdamW kernel (vectorized, multi-threaded). The other
formats (int8 blocks, bf16 moments, 16-bit parameters with compact or no master) fall back to the torch
composition until the compiled kernel below is available.
"""
from __future__ import annotations

import torch

from . import _compat
from .fused import Run, StepScalars, update_torch

__all__ = ["update_cpu", "update_fused_fp32"]


def update_fused_fp32(run: Run, sc: StepScalars) -> None:
    """torch's fused CPU AdamW on one fp32 run; the gradient scale is folded in as a loss-scale divisor."""
    h = sc.hyper
    grad = run.grad if run.grad.dtype == torch.float32 else run.grad.float()
    if sc.grad_scale != 1.0:
        grad = grad * sc.grad_scale
    step_t = torch.tensor(float(sc.step))
    torch._fused_adamw_(
        [run.param],
        [grad],
        [run.moments.exp_avg],
        [run.moments.exp_avg_sq],
        [],
        [step_t],
        amsgrad=False,
        lr=h.lr,
        beta1=h.beta1,
        beta2=h.beta2,
        weight_decay=h.weight_decay,
        eps=h.eps,
        maximize=False,
    )


def update_cpu(run: Run, sc: StepScalars) -> None:
    if (
        run.moments.fmt == "fp32"
        and run.master.kind == "param"
        and run.param.dtype == torch.float32
        and _compat.has_fused_cpu_adamw()
    ):
        update_fused_fp32(run, sc)
        return
    update_torch(run, sc)
