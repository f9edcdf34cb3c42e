"""The fast CPU update: a C++ kernel compiled at first use, and the choice between it and torch's kernels.

The kernel makes one pass over memory for every format. OpenMP threads take 256-element blocks; a block's
gradient (times grad_scale), master values and moments are brought to fp32 (in L1 scratch, or in place where
they are fp32 already), updated in the reference's operation order, and written back in their formats: int8
blocks requantized from the block's new absmax, bf16 moments rounded stochastically with the bits of one
``state.hash_bits`` per element (``state.round_bf16_bits``), master-less 16-bit parameters with those of
``state.hash_uniform``, compact masters split into a 16-bit value and an int8 residual. Each format is a small policy struct; a run is one composition of them, chosen once per call.

The C++ source, ``adamw.cpp`` beside this file, includes no torch header: a plain function over raw pointers,
called through ctypes, compiles in under 2 s of CPU time where ``torch/extension.h`` alone takes about 40 s on
this project's 2-core machines (``zeroadam.kernels.build`` compiles it for the CPU that ``ZEROADAM_CPU_ARCH``
names). Python checks every tensor (device, dtype, contiguity, length) before it hands over a pointer.

[Note: matching update_torch]
``update_torch`` is the definition; the kernel repeats its fp32 operations in its order, with FMA exactly
where torch's AVX2 and AVX-512 CPU kernels use it (``lerp_`` and ``addcmul_``) and nowhere else
(-ffp-contract=off), on every target (``std::fma`` is fused with or without an FMA instruction). What remains
different: torch's CPU ``sqrt`` is not correctly rounded (on torch 2.13 it is 1 ulp off for ~16% of inputs, on
its DEFAULT, AVX2 and AVX-512 kernels alike), the kernel's is. So fp32 parameters agree to an ulp or two,
moments exactly, and an int8 code or a 16-bit rounding that lies on a boundary can rarely differ by one step.
torch's DEFAULT kernels (ATEN_CPU_CAPABILITY=default, or a CPU without AVX2) round ``lerp_`` and ``addcmul_``
twice and divide differently: there moments too differ by ulps.

When the kernel cannot be built (no compiler, no ninja), ``update_cpu`` warns once and falls back to torch:
its fused AdamW for plain fp32, ``update_torch`` for everything else.
"""
from __future__ import annotations

import ctypes
import functools
import math
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from zeroadam import _compat
from zeroadam.formats.quant import num_blocks
from zeroadam.formats.table import MASTER_TENSORS, MOMENT_TENSORS, StateTensor
from zeroadam.kernels import build
from zeroadam.update.contract import Run, StepScalars, coefficients, update_torch

__all__ = [
    "update_cpu", "update_cpu_runs", "update_compiled", "update_fused_fp32", "compiled_kernel", "sq_sum_compiled",
    "sq_sums_compiled", "add_sq_sum_compiled", "RunTable", "GradTable", "StepCounts", "DTYPE_CODES",
]

# The enums Dtype, MomentsFormat and MasterKind of adamw.cpp.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The dtypes the kernel reads (gradients, parameters) -> its codes."""
_MOMENTS_CODE = {"fp32": 0, "bf16": 1, "int8": 2}
_MASTER_CODE = {"param": 0, "fp32": 1, "compact": 2, "none": 3}


class _RunArgs(ctypes.Structure):
    """ZaRun in adamw.cpp, field for field (checked at load: build.check_layout)."""

    _fields_ = [
        ("numel", ctypes.c_int64),
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("exp_avg", ctypes.c_void_p),
        ("exp_avg_sq", ctypes.c_void_p),
        ("exp_avg_scale", ctypes.c_void_p),
        ("exp_avg_sq_scale", ctypes.c_void_p),
        ("master", ctypes.c_void_p),
        ("residual", ctypes.c_void_p),
        ("param_dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("moments_format", ctypes.c_int32),
        ("master_kind", ctypes.c_int32),
        ("index_base", ctypes.c_int64),
        ("seed_exp_avg", ctypes.c_uint32),
        ("seed_exp_avg_sq", ctypes.c_uint32),
        ("seed_param", ctypes.c_uint32),
    ]


class _Coefficients(ctypes.Structure):
    """ZaCoefficients in adamw.cpp: the fp64 scalars of reference.adamw_reference."""

    _fields_ = [
        (name, ctypes.c_double)
        for name in ("decay", "lerp_weight", "beta2", "one_minus_beta2", "bc2_sqrt", "eps", "step_size", "grad_scale")
    ]


class Kernel(NamedTuple):
    """The compiled entry points."""

    steps: Callable[[ctypes.Array, int, _Coefficients, Optional[ctypes.Array], int], int]
    """(runs, count, coefficients, seeds or None, threads) -> 0, or 1 + the index of the first run whose combination
    of formats it has no code for (then nothing is written): every run in one OpenMP region ([Note: many runs in one
    call]); seeds, three uint32, replace every run's own."""
    sq_sums: Callable[[ctypes.Array, ctypes.Array, ctypes.Array, int, int], float]
    """(data pointers, numels, dtype codes, count, threads) -> the sum of squares of all in fp64, in one region; inf
    or nan if any value is."""
    fill_f32: Callable[[ctypes.Array, int, float], None]
    """(pointers to fp32 values, count, value): writes value at each pointer."""
    add_sq_sum: Callable[[int, int, Optional[int], int, float, int, int], float]
    """(dst, dst dtype, src or None, src dtype, alpha, numel, threads) -> dst += alpha * src (dst *= alpha without
    src), then the sum of squares of dst in fp64."""


_STRUCTS = {"ZaRun": _RunArgs, "ZaCoefficients": _Coefficients}


def _build() -> Kernel:
    """Compile the kernel for ``ZEROADAM_CPU_ARCH``, or load it from torch's extension cache, and check that the
    ctypes structures match the C++ ones; raises when nothing builds."""
    lib = ctypes.CDLL(build.build_library(build.cpu_arch()))
    layout = lib.zeroadam_layout
    layout.argtypes = []
    layout.restype = ctypes.c_char_p
    build.check_layout(layout().decode(), _STRUCTS)
    steps = lib.zeroadam_adamw_steps
    steps.argtypes = [ctypes.POINTER(_RunArgs), ctypes.c_int32, ctypes.POINTER(_Coefficients),
                      ctypes.POINTER(ctypes.c_uint32), ctypes.c_int32]
    steps.restype = ctypes.c_int
    sq_sums = lib.zeroadam_sq_sums
    sq_sums.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32),
                        ctypes.c_int32, ctypes.c_int32]
    sq_sums.restype = ctypes.c_double
    fill_f32 = lib.zeroadam_fill_f32
    fill_f32.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_float]
    fill_f32.restype = None
    add_sq_sum = lib.zeroadam_add_sq_sum
    add_sq_sum.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_double,
                           ctypes.c_int64, ctypes.c_int32]
    add_sq_sum.restype = ctypes.c_double
    return Kernel(
        steps=lambda runs, count, coefficients, seeds, threads: steps(runs, count, ctypes.byref(coefficients), seeds,
                                                                     threads),
        sq_sums=sq_sums,
        fill_f32=fill_f32,
        add_sq_sum=add_sq_sum,
    )


@functools.lru_cache(maxsize=None)
def compiled_kernel() -> Optional[Kernel]:
    """The compiled kernel, built once per process; None, after one warning, when it cannot be built here.

    Raises ValueError for a ``ZEROADAM_CPU_ARCH`` this machine cannot run, and RuntimeError when the ctypes
    structures do not match the C++ structs: both are mistakes to fix, not reasons to run slower."""
    build.cpu_arch()  # outside the try: an invalid value raises rather than falling back
    try:
        return _build()
    except build.LayoutError:
        raise
    except Exception as e:
        lines = str(e).strip().splitlines()
        # The compiler's first "adamw.cpp:LINE:COL: error:" says more than ninja's summary line.
        cause = next((line for line in lines if ": error:" in line), lines[0] if lines else type(e).__name__)
        warnings.warn(
            "zeroadam: the compiled CPU kernel could not be built, so CPU updates use torch operations instead "
            "(same results, several times slower for int8 / bf16 / 16-bit state). It needs a C++ compiler and "
            f"ninja (pip install 'zeroadam[cpu]'). Cause: {cause.strip()}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


@functools.lru_cache(maxsize=None)
def _storage(fmt: str, kind: str) -> tuple[tuple[bool, StateTensor], ...]:
    """(in Moments rather than Master, spec) of every storage tensor of a run: the table read once per combination,
    not once per run and step (building its dicts was a third of a small run's cost)."""
    return tuple((True, t) for t in MOMENT_TENSORS[fmt]) + tuple((False, t) for t in MASTER_TENSORS[kind])


def _check_lengths(run: Run, storage: list[torch.Tensor]) -> None:
    """The kernel trusts every length and dtype with raw pointers: a mismatch is a bug upstream, never clipped."""
    n = run.param.numel()
    if run.grad.numel() != n:
        raise RuntimeError(f"zeroadam: a run's grad holds {run.grad.numel()} x {run.grad.dtype}; expected {n} x a float")
    per_block = num_blocks(n)
    for (_, spec), t in zip(_storage(run.moments.fmt, run.master.kind), storage):
        want = per_block if spec.per_block else n
        if t.numel() != want or t.dtype != spec.dtype:
            raise RuntimeError(f"zeroadam: a run's {spec.key} holds {t.numel()} x {t.dtype}; expected {want} x {spec.dtype}")
    if (run.master.kind == "param") != (run.param.dtype == torch.float32):
        raise RuntimeError(f"zeroadam: master kind {run.master.kind!r} does not fit a {run.param.dtype} parameter")


def _run_args(run: Run, seeds: tuple[int, int, int]) -> Optional[_RunArgs]:
    """The kernel's view of a run, or None when the kernel does not take it (the caller falls back).

    Called for every run of every step on the general path, so it is written for few Python operations: 4.5 us a run
    (6.2 before; int8 moments, this project's 2-core EPYC VM)."""
    mo, ma, param, grad = run.moments, run.master, run.param, run.grad
    storage = [getattr(mo if in_moments else ma, spec.field) for in_moments, spec in _storage(mo.fmt, ma.kind)]
    for t in (param, grad, *storage):
        if not (t.is_cpu and t.dim() == 1 and t.is_contiguous()):  # is_cpu: a seventh of device.type's cost
            return None
    param_dtype, grad_dtype = DTYPE_CODES.get(param.dtype), DTYPE_CODES.get(grad.dtype)
    if param_dtype is None or grad_dtype is None:
        return None
    _check_lengths(run, storage)
    # Positional, in ZaRun's field order (keywords cost twice as much per run).
    return _RunArgs(
        param.numel(),
        param.data_ptr(),
        grad.data_ptr(),
        *(t.data_ptr() for t in storage[:2]),  # exp_avg, exp_avg_sq: every format has both
        _ptr(mo.exp_avg_scale),
        _ptr(mo.exp_avg_sq_scale),
        _ptr(ma.fp32),
        _ptr(ma.residual),
        param_dtype,
        grad_dtype,
        _MOMENTS_CODE[mo.fmt],
        _MASTER_CODE[ma.kind],
        run.index_base,
        *seeds,
    )


def _coefficients(sc: StepScalars) -> _Coefficients:
    """The contract's coefficients as the C++ struct (fp64; the kernel casts them to fp32 as torch does)."""
    return _Coefficients(**coefficients(sc)._asdict())


def update_compiled(run: Run, sc: StepScalars) -> bool:
    """The C++ kernel on one run, in place; False, with nothing done, when the kernel cannot take the run."""
    return not update_compiled_runs([run], sc)


def update_compiled_runs(runs: Sequence[Run], sc: StepScalars) -> list[Run]:
    """The C++ kernel on every run it can take, all in one call (one OpenMP region: [Note: many runs in one call] in
    adamw.cpp); returns the runs it did not take, untouched, for the caller's fallback."""
    kernel = compiled_kernel()
    if kernel is None:
        return list(runs)
    seeds = sc.seeds()
    threads = torch.get_num_threads()
    taken: list[_RunArgs] = []
    rest: list[Run] = []
    for run in runs:
        args = _run_args(run, seeds)
        if args is None:
            rest.append(run)
        elif args.numel > 0:
            taken.append(args)
    if taken:
        bad = kernel.steps((_RunArgs * len(taken))(*taken), len(taken), _coefficients(sc), None, threads)
        if bad != 0:
            a = taken[bad - 1]  # _run_args let through a combination that the kernel does not compose
            names = {code: dtype for dtype, code in DTYPE_CODES.items()}
            raise RuntimeError(
                f"zeroadam: no CPU kernel for param {names.get(a.param_dtype)}, grad {names.get(a.grad_dtype)}, moments "
                f"code {a.moments_format}, master code {a.master_kind}"
            )
    return rest


def sq_sum_compiled(t: torch.Tensor) -> Optional[float]:
    """The sum of squares of a dense CPU tensor, accumulated in fp64 (no finite fp32 square overflows, and the sum
    does not lose the small terms of a long tensor); None when the kernel cannot take the tensor. As fast as a
    BLAS dot in fp32 (both read memory at full speed: ~3.5 ms for 20M fp32 elements on 2 cores)."""
    total, rest = sq_sums_compiled([t])
    return None if rest else total


def sq_sums_compiled(tensors: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """(sum of squares in fp64 of every dense CPU tensor the kernel takes, the tensors it does not take): one call
    and one OpenMP region for all of them ([Note: many runs in one call] in adamw.cpp)."""
    kernel = compiled_kernel()
    if kernel is None:
        return 0.0, list(tensors)
    taken: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    for t in tensors:
        if t.is_cpu and t.dtype in DTYPE_CODES and t.is_contiguous():
            if t.numel() > 0:
                taken.append(t)
        else:
            rest.append(t)
    if not taken:
        return 0.0, rest
    k = len(taken)
    total = kernel.sq_sums(
        (ctypes.c_void_p * k)(*(t.data_ptr() for t in taken)),
        (ctypes.c_int64 * k)(*(t.numel() for t in taken)),
        (ctypes.c_int32 * k)(*(DTYPE_CODES[t.dtype] for t in taken)),
        k,
        torch.get_num_threads(),
    )
    return total, rest


def add_sq_sum_compiled(dst: torch.Tensor, src: Optional[torch.Tensor], alpha: float) -> Optional[float]:
    """``dst.add_(src, alpha=alpha)`` (``dst.mul_(alpha)`` when src is None) and the sum of squares of the result in
    fp64, in one pass over memory (see [Note: landing a gradient with its norm] in adamw.cpp); None, with dst
    untouched, when the kernel cannot take these tensors (the caller uses torch). dst: a dense fp32 or bf16 CPU
    tensor; src: a dense CPU tensor of the same length, fp32, bf16 or fp16. Bumps dst's version counter like an
    in-place torch op."""
    kernel = compiled_kernel()
    if (
        kernel is None
        or dst.device.type != "cpu"
        or dst.dtype not in (torch.float32, torch.bfloat16)
        or not dst.is_contiguous()
        or (src is not None and (src.device.type != "cpu" or src.dtype not in DTYPE_CODES or not src.is_contiguous()
                                 or src.numel() != dst.numel()))
        # bf16 into bf16: torch's arithmetic for an alpha that is not a power of two is not fp32's (it differs in the
        # last bf16 bit for ~1% of elements at alpha = 1/3); those take torch's add_ and a pass of their own.
        or (src is not None and src.dtype == dst.dtype == torch.bfloat16 and math.frexp(alpha)[0] != 0.5)
    ):
        return None
    if dst.numel() == 0:
        return 0.0
    total = kernel.add_sq_sum(
        dst.data_ptr(),
        DTYPE_CODES[dst.dtype],
        None if src is None else src.data_ptr(),
        0 if src is None else DTYPE_CODES[src.dtype],
        float(alpha),
        dst.numel(),
        torch.get_num_threads(),
    )
    torch.autograd.graph.increment_version(dst)
    return total


class RunTable:
    """The kernel's arguments for a fixed list of runs, kept from one step to the next: a later step writes the
    gradients' addresses (``set_grad``) and makes one call. The caller vouches that every other tensor of the runs
    is still the one, at the same address and length, that the table was built from (see [Note: the stage-0 step
    plan] in engines/local.py); ``of`` checks them once, as ``update_compiled_runs`` does at every call."""

    def __init__(self, kernel: Kernel, args: list[_RunArgs]) -> None:
        self.kernel = kernel
        self.count = len(args)
        self.args = (_RunArgs * self.count)(*args)

    @staticmethod
    def of(runs: Sequence[Run]) -> Optional["RunTable"]:
        """The table of these runs, or None when the kernel does not take every one of them."""
        kernel = compiled_kernel()
        if kernel is None:
            return None
        args = []
        for run in runs:
            a = _run_args(run, (0, 0, 0))  # the step's seeds come with each call
            if a is None:
                return None
            args.append(a)
        return RunTable(kernel, args)

    def set_grad(self, i: int, ptr: int) -> None:
        self.args[i].grad = ptr

    def step(self, sc: StepScalars) -> None:
        """Every run's update with this step's scalars, in one kernel call."""
        if self.count:
            seeds = (ctypes.c_uint32 * 3)(*sc.seeds())
            bad = self.kernel.steps(self.args, self.count, _coefficients(sc), seeds, torch.get_num_threads())
            if bad != 0:  # of() checked every combination
                raise RuntimeError(f"zeroadam: the CPU kernel refused run {bad - 1} of a checked table")


class GradTable:
    """The addresses, lengths and dtypes of a fixed list of gradients, for ``sq_sums_compiled`` without rebuilding
    its arrays at every step (the same kernel call, so the same bits)."""

    def __init__(self, kernel: Kernel, grads: Sequence[torch.Tensor]) -> None:
        self.kernel = kernel
        self.count = len(grads)
        self.ptrs = (ctypes.c_void_p * self.count)(*(g.data_ptr() for g in grads))
        self.numels = (ctypes.c_int64 * self.count)(*(g.numel() for g in grads))
        self.dtypes = (ctypes.c_int32 * self.count)(*(DTYPE_CODES[g.dtype] for g in grads))

    def sq_sum(self) -> float:
        return self.kernel.sq_sums(self.ptrs, self.numels, self.dtypes, self.count, torch.get_num_threads())


class StepCounts:
    """A param group's step tensors (one-element fp32 CPU tensors, as torch.optim.AdamW's), set to a new count in one
    call. The write does not bump their version counters: the caller watches those to see writes other than its own
    (see [Note: the stage-0 step plan] in engines/local.py), and checks their addresses before each call."""

    def __init__(self, kernel: Kernel, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            if not (t.is_cpu and t.dtype == torch.float32 and t.numel() == 1):
                raise ValueError(f"zeroadam: a step tensor must be one fp32 value on the CPU; got {t.dtype} x {t.numel()}")
        self.kernel = kernel
        self.count = len(tensors)
        self.ptrs = (ctypes.c_void_p * self.count)(*(t.data_ptr() for t in tensors))

    def set(self, step: int) -> None:
        self.kernel.fill_f32(self.ptrs, self.count, float(step))


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


def update_cpu_runs(runs: Sequence[Run], sc: StepScalars) -> None:
    """``update_cpu`` on runs that share the step's scalars: the compiled kernel takes all it can in one call."""
    for run in update_compiled_runs(runs, sc):
        _update_without_kernel(run, sc)


def update_cpu(run: Run, sc: StepScalars) -> None:
    """The compiled kernel; without it, torch's fused AdamW for plain fp32 and ``update_torch`` for the rest.

    The kernel also takes plain fp32: it ties torch's fused AdamW at grad_scale 1 and is ~4x faster at any other
    scale, where the fused path first writes a scaled copy of the gradient. 20M fp32 elements, 2 threads, min of
    12 steps, three runs on a shared 2-core EPYC VM: 29.8 / 34.8 / 36.4 ms vs 29.2 / 38.0 / 34.1 ms at
    grad_scale 1; 40.0 / 36.3 / 35.7 ms vs 167.8 / 142.1 / 138.7 ms at grad_scale 0.5.
    """
    if not update_compiled(run, sc):
        _update_without_kernel(run, sc)


def _update_without_kernel(run: Run, sc: StepScalars) -> None:
    if (
        run.moments.fmt == "fp32"
        and run.master.kind == "param"
        and run.param.dtype == torch.float32
        and _compat.has_fused_cpu_adamw()
    ):
        update_fused_fp32(run, sc)
        return
    update_torch(run, sc)
