"""The fused AdamW update of many runs in one launch: the kernels of ``adamw`` over a table of runs.

Stage 0 updates every parameter as its own run. One launch per run costs a 7B model ~300 launches (and as many
host round trips of argument packing) per step, where the work is one pass over memory. Here the runs of one
(device, parameter dtype, gradient dtype, moment format, master kind) share a launch: the grid covers the
programs of every run, end to end, and a program finds its run by a binary search over the runs' first program
numbers in a table that also holds each run's addresses, length and hash index base. The tile itself is computed
by the very functions the one-run kernels use (``adamw._fp32_tile`` and its siblings), so results are the same
bits as one ``update_triton`` per run (``tests/test_triton_multi.py``).

[Note: the run table]
One int64 row of ``_COLUMNS`` per run. Addresses are stored as integers and cast back to typed pointers in the
kernel (``int.to(tl.pointer_type(...))``, supported by compiled Triton and its interpreter). The table is built on
the host per launch (gradients are new tensors every step when ``zero_grad`` sets them to None) and copied to the
device from pinned memory without a host sync: a few KiB for hundreds of runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from zeroadam import _compat
from zeroadam.options import BLOCK_SIZE
from zeroadam.update.contract import Run, StepScalars, coefficients

triton = _compat.require("triton", "the Triton AdamW kernels")
tl = _compat.require("triton.language", "the Triton AdamW kernels")

from . import _launch  # noqa: E402
from .adamw import _NO_SPECIALIZE, _bf16_tile, _fp32_tile, _int8_tile, check_run  # noqa: E402

__all__ = ["update_triton_runs", "sq_sum_triton"]

# [Note: the run table] columns.
_COLUMNS = (
    "first_program", "numel", "index_base", "param", "grad", "master", "exp_avg", "exp_avg_sq", "exp_avg_scale",
    "exp_avg_sq_scale",
)  # fmt: skip
_STRIDE = tl.constexpr(len(_COLUMNS))
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_NO_SPECIALIZE_MULTI = ["runs", *_NO_SPECIALIZE]


# ---------------------------------------------------------------------------------------------- table lookups
@triton.jit
def _find_run(table, runs, SEARCH_STEPS: tl.constexpr, STRIDE: tl.constexpr):
    """(row pointer, program's tile number within its run): the last run whose first program is <= this one, in
    a table of int64 rows of STRIDE columns whose first column is the run's first program."""
    pid = tl.program_id(0)
    lo = pid * 0
    hi = lo + runs
    # Invariant: first_program[lo] <= pid < first_program[hi] (hi == runs: past the end). SEARCH_STEPS >=
    # log2(runs) halvings leave hi == lo + 1; further steps change nothing.
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go = tl.load(table + mid.to(tl.int64) * STRIDE) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    row = table + lo.to(tl.int64) * STRIDE
    return row, pid - tl.load(row)


@triton.jit
def _ptr(row, column: tl.constexpr, DTYPE: tl.constexpr):
    return tl.load(row + column).to(tl.pointer_type(DTYPE))


@triton.jit
def _master_ptr(row, param_ptr, MASTER: tl.constexpr):
    """The master storage's pointer; the parameter's where there is none (the tile never reads it then)."""
    if MASTER == "fp32":
        out = _ptr(row, 5, tl.float32)
    elif MASTER == "compact":
        out = _ptr(row, 5, tl.int8)
    else:
        out = param_ptr
    return out


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=_NO_SPECIALIZE_MULTI)
def _multi_fp32_kernel(
    table, runs, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MASTER: tl.constexpr, TILE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):  # fmt: skip
    row, tile = _find_run(table, runs, SEARCH_STEPS, _STRIDE)
    n = tl.load(row + 1)
    param_ptr = _ptr(row, 3, P_DTYPE)
    offs = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    _fp32_tile(
        param_ptr, _ptr(row, 4, G_DTYPE), _master_ptr(row, param_ptr, MASTER), _ptr(row, 6, tl.float32),
        _ptr(row, 7, tl.float32), offs, offs < n, tl.load(row + 2), seed_p,
        grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER,
    )  # fmt: skip


@triton.jit(do_not_specialize=_NO_SPECIALIZE_MULTI)
def _multi_bf16_kernel(
    table, runs, seed_m, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MASTER: tl.constexpr, TILE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):  # fmt: skip
    row, tile = _find_run(table, runs, SEARCH_STEPS, _STRIDE)
    n = tl.load(row + 1)
    param_ptr = _ptr(row, 3, P_DTYPE)
    offs = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    _bf16_tile(
        param_ptr, _ptr(row, 4, G_DTYPE), _master_ptr(row, param_ptr, MASTER), _ptr(row, 6, tl.bfloat16),
        _ptr(row, 7, tl.bfloat16), offs, offs < n, tl.load(row + 2), seed_m, seed_p,
        grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER,
    )  # fmt: skip


@triton.jit(do_not_specialize=_NO_SPECIALIZE_MULTI)
def _multi_int8_kernel(
    table, runs, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MASTER: tl.constexpr, ROWS: tl.constexpr, QBLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):  # fmt: skip
    row, tile = _find_run(table, runs, SEARCH_STEPS, _STRIDE)
    param_ptr = _ptr(row, 3, P_DTYPE)
    _int8_tile(
        param_ptr, _ptr(row, 4, G_DTYPE), _master_ptr(row, param_ptr, MASTER), _ptr(row, 6, tl.int8),
        _ptr(row, 7, tl.uint8), _ptr(row, 8, tl.float32), _ptr(row, 9, tl.float32),
        tile.to(tl.int64) * ROWS + tl.arange(0, ROWS), tl.load(row + 1), tl.load(row + 2), seed_p,
        grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER, QBLOCK,
    )  # fmt: skip


@triton.jit(do_not_specialize=["runs"])
def _multi_sq_sum_kernel(table, runs, partials, G_DTYPE: tl.constexpr, TILE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """partials[program] = the fp64 sum of squares of the program's tile of its tensor (rows: first program,
    numel, address)."""
    row, tile = _find_run(table, runs, SEARCH_STEPS, 3)
    offs = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    g = tl.load(_ptr(row, 2, G_DTYPE) + offs, mask=offs < tl.load(row + 1), other=0.0).to(tl.float64)
    tl.store(partials + tl.program_id(0), tl.sum(g * g, axis=0))


# ---------------------------------------------------------------------------------------------- launcher
def _device_table(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    # Pinned and non-blocking: no host sync; the caching host allocator keeps the buffer until the copy is done.
    return host.pin_memory().to(device, non_blocking=True)


def sq_sum_triton(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of dense tensors on one device, in fp64 (no finite square overflows: fp32 squares of
    values over 1.8e19 would), as a 0-dim tensor there: one launch per gradient dtype writes a partial sum per
    program (a fixed order: the same bits every call, unlike atomics), and one ``torch.sum`` adds them. 200 tensors
    of one dtype: 2 launches, where a norm per tensor costs 200 and their sum as many more."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        if g.numel():
            by_dtype.setdefault(g.dtype, []).append(g)
    device = grads[0].device
    if not by_dtype:
        return torch.zeros((), dtype=torch.float64, device=device)
    parts = []
    for dtype, gs in by_dtype.items():
        tile = _launch.elementwise_tile(max(g.numel() for g in gs))
        values: list[int] = []
        first = 0
        for g in gs:
            values += [first, g.numel(), g.data_ptr()]
            first += triton.cdiv(g.numel(), tile.size)
        partials = torch.empty(first, dtype=torch.float64, device=device)  # no launch: every entry is written
        with torch.cuda.device_of(gs[0]):
            _multi_sq_sum_kernel[(first,)](
                _device_table(values, device), len(gs), partials,
                G_DTYPE=_TL_DTYPE[dtype], TILE=tile.size, SEARCH_STEPS=len(gs).bit_length(),
                **_launch.launch_options(tile),
            )  # fmt: skip
        parts.append(partials)
    return torch.sum(parts[0] if len(parts) == 1 else torch.cat(parts))


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _table(runs: Sequence[tuple[Run, Optional[torch.Tensor]]], programs: Sequence[int]) -> tuple[torch.Tensor, int]:
    """[Note: the run table] on the runs' device, and the total number of programs."""
    values: list[int] = []
    first = 0
    for (run, master), count in zip(runs, programs):
        mom = run.moments
        values += [
            first, run.param.numel(), run.index_base, run.param.data_ptr(), run.grad.data_ptr(), _address(master),
            mom.exp_avg.data_ptr(), mom.exp_avg_sq.data_ptr(), _address(mom.exp_avg_scale),
            _address(mom.exp_avg_sq_scale),
        ]  # fmt: skip
        first += count
    return _device_table(values, runs[0][0].param.device), first


def _launch_group(members: list[tuple[Run, Optional[torch.Tensor]]], sc: StepScalars) -> None:
    run0 = members[0][0]
    fmt, kind = run0.moments.fmt, run0.master.kind
    largest = max(run.param.numel() for run, _ in members)
    seed_m, _, seed_p = sc.seeds()  # bf16 moments draw both roundings from seed_m
    scalars = coefficients(sc)
    dtypes = {"P_DTYPE": _TL_DTYPE[run0.param.dtype], "G_DTYPE": _TL_DTYPE[run0.grad.dtype], "MASTER": kind}
    search = {"SEARCH_STEPS": len(members).bit_length()}
    if fmt == "int8":
        tile = _launch.block_tile(largest)
        programs = [triton.cdiv(triton.cdiv(run.param.numel(), BLOCK_SIZE), tile.rows) for run, _ in members]
    else:
        tile = _launch.elementwise_tile(largest)
        programs = [triton.cdiv(run.param.numel(), tile.size) for run, _ in members]
    table, total = _table(members, programs)
    with torch.cuda.device_of(run0.param):
        if fmt == "int8":
            _multi_int8_kernel[(total,)](
                table, len(members), seed_p, *scalars,
                ROWS=tile.rows, QBLOCK=BLOCK_SIZE, **dtypes, **search, **_launch.launch_options(tile),
            )  # fmt: skip
        elif fmt == "bf16":
            _multi_bf16_kernel[(total,)](
                table, len(members), seed_m, seed_p, *scalars,
                TILE=tile.size, **dtypes, **search, **_launch.launch_options(tile),
            )  # fmt: skip
        else:
            _multi_fp32_kernel[(total,)](
                table, len(members), seed_p, *scalars,
                TILE=tile.size, **dtypes, **search, **_launch.launch_options(tile),
            )  # fmt: skip


def update_triton_runs(runs: Sequence[Run], sc: StepScalars) -> None:
    """Update every run in place with one launch per (device, parameter dtype, gradient dtype, moment format,
    master kind): the same results as ``update_triton`` on each run. Runs must not overlap."""
    groups: dict[tuple, list[tuple[Run, Optional[torch.Tensor]]]] = {}
    for run in runs:
        if run.param.numel() == 0:
            continue
        master = check_run(run)
        key = (run.param.device, run.param.dtype, run.grad.dtype, run.moments.fmt, run.master.kind)
        groups.setdefault(key, []).append((run, master))
    for members in groups.values():
        _launch_group(members, sc)
