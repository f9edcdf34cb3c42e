"""The choice of backend that performs the fused update of one run (``zeroadam.update.contract``), and the
gradient pre-pass. Backends, fastest first:

* CUDA tensors: the Triton kernel for the run's formats (``zeroadam.triton_kernels.adamw``).
* CPU tensors: the compiled CPU kernel (``zeroadam.kernels.cpu``), one OpenMP pass in C++ for every format
  (torch's fused CPU AdamW when the kernel cannot be built and the run is plain fp32).
* Anything else, or when neither is available: ``update_torch``, the reference composed with the formats.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from zeroadam import _compat
from zeroadam.update.contract import Backend, Run, StepScalars, update_torch

__all__ = ["fused_update", "backend_for", "grad_sq_sum", "grads_sq_sum"]


def backend_for(run: Run, prefer: Optional[str] = None) -> tuple[str, Backend]:
    """(name, function) of the backend for this run; ``prefer`` forces "torch", "cpu" or "triton"."""
    dev = run.param.device.type
    if prefer == "torch":
        return "torch", update_torch
    if (prefer in (None, "triton")) and dev == "cuda" and _compat.has_triton():
        from zeroadam.triton_kernels.adamw import update_triton

        return "triton", update_triton
    if prefer == "triton" and dev == "cpu" and _compat.has_triton() and _compat.triton_interpret():
        from zeroadam.triton_kernels.adamw import update_triton

        return "triton", update_triton
    if (prefer in (None, "cpu")) and dev == "cpu":
        from zeroadam.kernels.cpu import update_cpu

        return "cpu", update_cpu
    if prefer is not None:
        raise ValueError(
            f"ZeroAdam: backend {prefer!r} cannot update {dev} tensors; use prefer=None to choose automatically"
        )
    return "torch", update_torch


def fused_update(run: Run, sc: StepScalars, prefer: Optional[str] = None) -> None:
    _, fn = backend_for(run, prefer)
    fn(run, sc)


def grad_sq_sum(g: torch.Tensor) -> torch.Tensor:
    """Sum of squares in fp32 by torch. A BLAS dot for dense fp32 gradients: 6.3 ms against vector_norm's 9.6 ms
    for 30M elements on 2 cores."""
    if g.dtype == torch.float32 and g.is_contiguous():
        flat = g.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(g, dtype=torch.float32) ** 2


def grads_sq_sum(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of every gradient, on the first one's device: the pre-pass that finds non-finite
    gradients (and the norm to clip by) before anything is written.

    CPU gradients go through the compiled kernel in fp64, the rest through torch in fp32."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    from zeroadam.kernels.cpu import sq_sum_compiled

    dev = grads[0].device
    total = torch.zeros((), dtype=torch.float64 if dev.type == "cpu" else torch.float32, device=dev)
    host = 0.0
    for g in grads:
        s = sq_sum_compiled(g) if g.device.type == "cpu" else None
        if s is None:
            total += grad_sq_sum(g).to(device=dev, dtype=total.dtype)
        else:
            host += s
    return total + host
