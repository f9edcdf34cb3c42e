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

__all__ = [
    "fused_update", "fused_updates", "backend_for", "grad_sq_sum", "foreach_sq_sum", "accelerator_sq_sum",
    "grads_sq_sum", "land_sq_sum",
]


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


def fused_updates(runs: Sequence[Run], sc: StepScalars, prefer: Optional[str] = None) -> None:
    """Update many runs that share the step's scalars: the runs bound for Triton in one launch per storage
    combination (``zeroadam.triton_kernels.adamw_multi``: a launch per parameter costs a 7B model ~300 launches a
    step), those bound for the compiled CPU kernel in one call (``zeroadam.kernels.cpu.update_cpu_runs``), the
    others one by one."""
    batches: dict[str, list[Run]] = {"triton": [], "cpu": []}
    for run in runs:
        name, fn = backend_for(run, prefer)
        if name in batches:
            batches[name].append(run)
        else:
            fn(run, sc)
    if batches["cpu"]:
        from zeroadam.kernels.cpu import update_cpu_runs

        update_cpu_runs(batches["cpu"], sc)
    if batches["triton"]:
        from zeroadam.triton_kernels.adamw_multi import update_triton_runs

        update_triton_runs(batches["triton"], sc)


def grad_sq_sum(g: torch.Tensor) -> torch.Tensor:
    """Sum of squares in fp32 by torch. A BLAS dot for dense fp32 gradients: 6.3 ms against vector_norm's 9.6 ms
    for 30M elements on 2 cores."""
    if g.dtype == torch.float32 and g.is_contiguous():
        flat = g.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(g, dtype=torch.float32) ** 2


def foreach_sq_sum(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares in fp32 of gradients on one device, in three launches whatever their number: torch's
    multi-tensor norm (one per dtype), then the norms' squares summed by a dot. One reduction per tensor cost a
    7B model ~300 launches plus a conversion and an add each."""
    norms = torch.stack(torch._foreach_norm(list(grads), 2, dtype=torch.float32))
    return torch.dot(norms, norms)


def accelerator_sq_sum(grads: Sequence[torch.Tensor], prefer: Optional[str] = None) -> torch.Tensor:
    """Sum of squares of gradients on one device: on CUDA with Triton (or ``prefer="triton"`` under
    TRITON_INTERPRET, as the tests run it) the multi-tensor kernel, fp64, two launches for one gradient dtype
    (``zeroadam.triton_kernels.adamw_multi.sq_sum_triton``); otherwise ``foreach_sq_sum``, fp32, three ops."""
    dev = grads[0].device
    triton_here = (dev.type == "cuda" and prefer in (None, "triton")) or (prefer == "triton" and _compat.triton_interpret())
    if triton_here and _compat.has_triton() and all(g.is_contiguous() for g in grads):
        from zeroadam.triton_kernels.adamw_multi import sq_sum_triton

        return sq_sum_triton(grads)
    return foreach_sq_sum(grads)


def grads_sq_sum(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of every gradient, on the first one's device: the pre-pass that finds non-finite
    gradients (and the norm to clip by) before anything is written.

    CPU gradients go through the compiled kernel in fp64 (torch's dot in fp32 without it), the others through
    ``foreach_sq_sum`` in fp32, per device."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    from zeroadam.kernels.cpu import sq_sums_compiled

    dev = grads[0].device
    if dev.type != "cpu" and all(g.device == dev for g in grads):
        return accelerator_sq_sum(grads)  # the usual accelerator case: nothing else to launch
    total = torch.zeros((), dtype=torch.float64 if dev.type == "cpu" else torch.float32, device=dev)
    host, rest = sq_sums_compiled([g for g in grads if g.is_cpu])  # all in one call
    for g in rest:
        total += grad_sq_sum(g).to(device=dev, dtype=total.dtype)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        if not g.is_cpu:
            by_device.setdefault(g.device, []).append(g)
    for gs in by_device.values():
        total += accelerator_sq_sum(gs).to(device=dev, dtype=total.dtype)
    return total + host


def land_sq_sum(dst: torch.Tensor, src: Optional[torch.Tensor], alpha: float) -> "float | torch.Tensor":
    """``dst.add_(src, alpha=alpha)`` (``dst.mul_(alpha)`` when src is None), then the sum of squares of ``dst``: a
    reduced gradient landing in its shard (see [Note: the norm where gradients land] in ``engines/grad_norm.py``).
    A CPU ``dst`` is written and summed in one pass by the compiled kernel (a float, fp64); otherwise torch adds
    and ``grads_sq_sum`` reduces (a tensor on ``dst``'s device; on an accelerator no host sync)."""
    if dst.device.type == "cpu":
        from zeroadam.kernels.cpu import add_sq_sum_compiled

        s = add_sq_sum_compiled(dst, src if src is None else src.to(dst.device), alpha)
        if s is not None:
            return s
    if src is not None:
        dst.add_(src.to(dst.device), alpha=alpha)
    elif alpha != 1.0:
        dst.mul_(alpha)
    return grads_sq_sum([dst])
