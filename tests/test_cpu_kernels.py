"""zeroadam.kernels.cpu: the compiled CPU kernel against ``update_torch``, the definition of the update.

Every format combination (moments fp32 / bf16 / int8, fp32 / bf16 / fp16 parameters with their master kinds,
fp32 / bf16 / fp16 gradients) runs several steps from the same state on both paths, at sizes that cover an
empty-tail block, whole blocks and one-element tails. What may differ, and how much (see [Note: matching
update_torch] in the module): fp32 values by an ulp or two of sqrt, and, rarely, an int8 code, a 16-bit
parameter or a compact residual by one step.

Moments are compared bit for bit where torch's vector kernels fuse their multiply-adds as the kernel does (AVX2 and
AVX-512 builds, ``torch.backends.cpu.get_cpu_capability()``); torch's DEFAULT build rounds ``lerp_`` and
``addcmul_`` twice, and there the moments may differ by the bound derived at ``MOMENTS_RTOL``.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import pytest
import torch

from zeroadam.kernels import build
from zeroadam.kernels import cpu as cpu_kernels
from zeroadam.update.contract import Run, StepScalars, update_torch
from zeroadam.update.dispatch import grads_sq_sum
from zeroadam.options import GroupHyper
from zeroadam.formats.state import Master, Moments, compact_decode, ulp_up

SIZES = [1, 255, 256, 257, 4097, 100_003]
PARAM_MASTERS = [
    (torch.float32, "param"),
    (torch.bfloat16, "fp32"),
    (torch.bfloat16, "compact"),
    (torch.bfloat16, "none"),
    (torch.float16, "fp32"),
    (torch.float16, "compact"),
    (torch.float16, "none"),
]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32_RTOL = 1e-6  # relative to |value| + lr: an ulp of sqrt moves an update of size ~lr by ~1e-7 of it
# Elements allowed to differ by one step (code, 16-bit ulp, residual): sqrt ulps land on a rounding boundary
# about once in 10^4 - 10^5 elements; 1 in 500 leaves room and still catches any systematic error.
RARE = 500
# torch's AVX2 and AVX-512 kernels compute lerp_ and addcmul_ with one FMA, as the compiled kernel does; its DEFAULT
# kernels (ATEN_CPU_CAPABILITY=default, or a CPU without AVX2) and any capability not listed here may not.
TORCH_FUSES = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# Moments where torch does not fuse: m + w * (g - m) rounded twice errs by at most u * |w * (g - m)| + u * |m'|
# <= 2u * G per step, with G the largest |gradient * grad_scale| of the element so far (|m| <= G); beta1 < 1 damps
# what earlier steps left, so after the 3 steps of these tests |dm| <= 6u * G = 3.6e-7 * G. Likewise
# |dv| <= 6u * G**2 for v * beta2 + (1 - beta2) * g * g. 1e-6 is 16.8u.
MOMENTS_RTOL = 1e-6
# A differing int8 code (or bf16 moment) changes that element's update for good, so its parameter may then differ
# by many 16-bit steps (near 0 an fp16 step is far below lr). It stays within both paths' movement: AdamW moves an
# element by lr * |m_hat| / (sqrt(v_hat) + eps) per step, which Cauchy-Schwarz bounds by 1.004 * lr for these betas
# over 3 steps; int8 decoding adds up to a code step (measured: at most 1.08 * lr over every case here). 1.25 covers
# it, and two paths apart by at most 2 * 1.25 * (sum of lr).
UPDATE_RATIO = 1.25


@pytest.fixture(scope="module")
def kernel() -> None:
    if cpu_kernels.compiled_kernel() is None:
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler or ninja)")


requires_kernel = pytest.mark.usefixtures("kernel")


# ----------------------------------------------------------------------------- state and comparisons


@dataclass
class State:
    param: torch.Tensor  # 1D [n]
    moments: Moments
    master: Master

    def clone(self) -> "State":
        def copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.clone()

        mo, ma = self.moments, self.master
        tensors = (mo.exp_avg, mo.exp_avg_sq, mo.exp_avg_scale, mo.exp_avg_sq_scale)
        moments = Moments(mo.fmt, *(copy(t) for t in tensors))
        return State(self.param.clone(), moments, Master(ma.kind, copy(ma.fp32), copy(ma.residual)))


def make_state(n: int, fmt: str, param_dtype: torch.dtype, kind: str, gen: torch.Generator) -> State:
    param = (torch.randn(n, generator=gen) * 0.5).to(param_dtype)
    moments = Moments.zeros(fmt, n, torch.device("cpu"))  # type: ignore[arg-type]
    return State(param, moments, Master.create(kind, param))  # type: ignore[arg-type]


def allowed(n: int) -> int:
    return n // RARE


def ordered(t: torch.Tensor) -> torch.Tensor:
    """Integers whose differences count ulps of a 16-bit tensor across zero."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def check_fp32(name: str, got: torch.Tensor, want: torch.Tensor, scale: float, spare: int) -> None:
    bad = (got - want).abs() > FP32_RTOL * (want.abs() + scale)
    assert int(bad.sum()) <= spare, f"{name}: {int(bad.sum())} of {want.numel()} values differ beyond rtol"


def check_steps(name: str, got: torch.Tensor, want: torch.Tensor, spare: int, far: Optional[float] = None) -> None:
    """Integer-like tensors (codes, residuals, 16-bit ulps): equal but for `spare` elements one step apart; with
    `far`, those elements may lie further apart but within `far` in value (16-bit tensors only)."""
    if got.dtype in (torch.int8, torch.uint8):
        d = (got.to(torch.int32) - want.to(torch.int32)).abs()
    else:
        d = (ordered(got) - ordered(want)).abs()
    assert int((d > 0).sum()) <= spare, f"{name}: {int((d > 0).sum())} of {d.numel()} elements differ"
    if far is None:
        assert int(d.max()) <= 1, f"{name}: an element differs by {int(d.max())} steps"
        return
    gap = float((got.float() - want.float()).abs().max())
    assert gap <= far, f"{name}: an element differs by {gap:.3g} > {far:.3g}"


class Outcome(NamedTuple):
    """Both paths after the same steps from the same state."""

    got: State  # the compiled kernel
    want: State  # update_torch
    grad_max: torch.Tensor  # [n], the largest |gradient * grad_scale| each element saw
    lrs: list[float]  # the learning rate of every step


def compare(o: Outcome) -> None:
    got, want, lr = o.got, o.want, max(o.lrs)
    n = want.param.numel()
    fmt, kind = want.moments.fmt, want.master.kind
    spare = allowed(n)
    # A differing int8 code, or a bf16 moment rounded the other way where torch does not fuse, changes that
    # element's update, and so its parameter, for good.
    moments_differ = fmt == "int8" or (fmt == "bf16" and not TORCH_FUSES)
    fp32_spare = spare if moments_differ else 0
    far = 2 * UPDATE_RATIO * sum(o.lrs) if moments_differ else None
    if fmt == "int8":
        check_steps("exp_avg codes", got.moments.exp_avg, want.moments.exp_avg, spare)
        check_steps("exp_avg_sq codes", got.moments.exp_avg_sq, want.moments.exp_avg_sq, spare)
        for name in ("exp_avg_scale", "exp_avg_sq_scale"):
            check_fp32(name, getattr(got.moments, name), getattr(want.moments, name), 0.0, spare)
    elif TORCH_FUSES:
        for name in ("exp_avg", "exp_avg_sq"):
            g, w = getattr(got.moments, name).float(), getattr(want.moments, name).float()
            check_fp32(name, g, w, 1e-30, 0)
    else:
        # bf16 moments are rounded stochastically: an fp32 value an ulp away may round one bf16 step the other way.
        moment_spare = spare if fmt == "bf16" else 0
        for name, scale in (("exp_avg", o.grad_max), ("exp_avg_sq", o.grad_max**2)):
            g, w = getattr(got.moments, name).float(), getattr(want.moments, name).float()
            bad = (g - w).abs() > MOMENTS_RTOL * (w.abs() + scale)
            assert int(bad.sum()) <= moment_spare, f"{name}: {int(bad.sum())} of {n} values differ beyond the bound"
    if kind == "param":
        check_fp32("param", got.param, want.param, lr, fp32_spare)
        return
    check_steps("16-bit param", got.param, want.param, spare, far)
    if kind == "fp32":
        check_fp32("master", got.master.fp32, want.master.fp32, lr, fp32_spare)
    elif kind == "compact":
        # Residuals are compared through the value they encode: one residual step is ulp / 254.
        x_got = compact_decode(got.param, got.master.residual)
        x_want = compact_decode(want.param, want.master.residual)
        step = ulp_up(want.param) / 254.0
        bad = (x_got - x_want).abs() > 1.01 * step + FP32_RTOL * (x_want.abs() + lr)
        assert int(bad.sum()) <= spare, f"compact master: {int(bad.sum())} of {n} values differ by over a step"


def run_both(
    n: int,
    fmt: str,
    param_dtype: torch.dtype,
    kind: str,
    grad_dtype: torch.dtype,
    *,
    hypers: list[tuple[GroupHyper, float]],
    index_base: int,
    seed: int,
) -> Outcome:
    """Both paths after one step per (hyper, grad_scale)."""
    gen = torch.Generator().manual_seed(seed)
    want = make_state(n, fmt, param_dtype, kind, gen)
    got = want.clone()
    grad_max = torch.zeros(n)
    for step, (hyper, grad_scale) in enumerate(hypers, start=1):
        grad = (torch.randn(n, generator=gen) * 2.0).to(grad_dtype)
        grad_max = torch.maximum(grad_max, grad.float().abs() * grad_scale)
        sc = StepScalars(hyper, step, grad_scale, group_index=1)
        update_torch(Run(want.param, grad, want.moments, want.master, index_base), sc)
        assert cpu_kernels.update_compiled(Run(got.param, grad, got.moments, got.master, index_base), sc)
    return Outcome(got, want, grad_max, [hyper.lr for hyper, _ in hypers])


# ----------------------------------------------------------------------------- parity with update_torch

# Weight decay on and off, gradient scales of 1 and not 1, in one trajectory.
STEPS = [
    (GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1), 1.0),
    (GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0), 0.37),
    (GroupHyper(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05), 4.0),
]


@requires_kernel
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("param_dtype,kind", PARAM_MASTERS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_matches_update_torch(fmt: str, param_dtype: torch.dtype, kind: str, grad_dtype: torch.dtype) -> None:
    for i, n in enumerate(SIZES):
        compare(run_both(n, fmt, param_dtype, kind, grad_dtype, hypers=STEPS, index_base=512 * i, seed=i))


@requires_kernel
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_small_beta1_takes_the_other_lerp_form(fmt: str) -> None:
    # torch's lerp switches formula at weight 0.5, i.e. beta1 <= 0.5; beta1 = 0 copies the gradient.
    for beta1 in (0.3, 0.0):
        hyper = GroupHyper(lr=1e-2, beta1=beta1, beta2=0.9, eps=1e-8, weight_decay=0.1)
        compare(run_both(4097, fmt, torch.float32, "param", torch.float32, hypers=[(hyper, 0.5)] * 3,
                         index_base=0, seed=7))


@requires_kernel
def test_index_base_beyond_32_bits() -> None:
    # hash_uniform takes the element index modulo 2**32; so must the kernel.
    for param_dtype, kind in [(torch.bfloat16, "none"), (torch.float16, "none")]:
        compare(run_both(4097, "bf16", param_dtype, kind, torch.float32, hypers=STEPS,
                         index_base=2**32 + 3 * 256, seed=3))


@requires_kernel
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_extreme_magnitudes(fmt: str) -> None:
    # Gradients from 1e-40 (subnormal squares) to 1e20 (squares near the fp32 limit) run the bf16 rounding's
    # float fallback (see [Note: bf16 stochastic rounding in integers]) and the int8 maps' edges.
    n = 20_000
    gen = torch.Generator().manual_seed(11)
    want = make_state(n, fmt, torch.bfloat16, "none", gen)
    got = want.clone()
    hyper = GroupHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    for step in range(1, 4):
        grad = torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 60 - 40)
        sc = StepScalars(hyper, step, 1.0, 0)
        update_torch(Run(want.param, grad, want.moments, want.master, 0), sc)
        assert cpu_kernels.update_compiled(Run(got.param, grad, got.moments, got.master, 0), sc)
    for name, t in want.moments.tensors().items():
        g = got.moments.tensors()[name]
        if t.dtype == torch.bfloat16 and TORCH_FUSES:
            assert torch.equal(ordered(g), ordered(t)), name
        else:
            assert int((g != t).sum()) <= allowed(n), name
    check_steps("16-bit param", got.param, want.param, allowed(n))


@requires_kernel
def test_int8_subnormal_scales() -> None:
    # Gradients ~1e-39 make every exp_avg block scale subnormal: its reciprocal overflows and the encoder divides
    # (quant.encode_blocks); the codes must still equal update_torch's.
    n = 4096
    gen = torch.Generator().manual_seed(5)
    want = make_state(n, "int8", torch.float32, "param", gen)
    got = want.clone()
    hyper = GroupHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    for step in range(1, 3):
        grad = torch.randn(n, generator=gen) * 1e-39
        sc = StepScalars(hyper, step, 1.0, 0)
        update_torch(Run(want.param, grad, want.moments, want.master, 0), sc)
        assert cpu_kernels.update_compiled(Run(got.param, grad, got.moments, got.master, 0), sc)
        assert bool((want.moments.exp_avg_scale < torch.finfo(torch.float32).tiny).all())
        for name, t in want.moments.tensors().items():
            assert torch.equal(got.moments.tensors()[name], t), f"step {step}: {name}"


@requires_kernel
def test_results_do_not_depend_on_thread_count() -> None:
    n = 64 * 256 * 3 + 17  # above the kernel's threshold for going parallel
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(5)
            state = make_state(n, "int8", torch.bfloat16, "none", gen)
            for step, (hyper, grad_scale) in enumerate(STEPS, start=1):
                run = Run(state.param, torch.randn(n, generator=gen), state.moments, state.master, 0)
                assert cpu_kernels.update_compiled(run, StepScalars(hyper, step, grad_scale, 0))
            results.append(state)
    finally:
        torch.set_num_threads(previous)
    a, b = results
    assert torch.equal(a.param, b.param)
    for name, t in a.moments.tensors().items():
        assert torch.equal(t, b.moments.tensors()[name]), name


# ----------------------------------------------------------------------------- 16-bit conversions, exhaustively


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_gradients_load_exactly(dtype: torch.dtype) -> None:
    # beta1 = 0 makes exp_avg the gradient itself, so fp32 moments show every 16-bit pattern's fp32 value.
    grad = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    grad = grad[torch.isfinite(grad.float())]  # fma(0, inf, inf) is NaN in torch's lerp as in the kernel
    n = grad.numel()
    state = make_state(n, "fp32", torch.float32, "param", torch.Generator().manual_seed(0))
    hyper = GroupHyper(lr=0.0, beta1=0.0, beta2=0.5, eps=1e-8, weight_decay=0.0)
    run = Run(state.param, grad, state.moments, state.master, 0)
    assert cpu_kernels.update_compiled(run, StepScalars(hyper, 1, 1.0, 0))
    assert torch.equal(state.moments.exp_avg.view(torch.int32), grad.float().view(torch.int32))


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_parameters_round_to_nearest_like_torch(dtype: torch.dtype) -> None:
    # An fp32 master with lr = 0 keeps its values, and the parameter becomes their nearest 16-bit value: over
    # random fp32 bit patterns (every exponent, subnormals, inf) and the exact midpoints between 16-bit values.
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31, (1_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    halves = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    mids = (halves[:-1] + (halves[1:] - halves[:-1]) / 2).float()
    x = torch.cat([bits.view(torch.float32), mids, -mids])
    x = x[torch.isfinite(x) | torch.isinf(x)]  # NaN payloads are not compared
    param = x.to(dtype)
    master = Master("fp32", fp32=x.clone())
    moments = Moments.zeros("fp32", x.numel(), torch.device("cpu"))
    hyper = GroupHyper(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    param.zero_()  # the kernel must write every element
    grad = torch.zeros(x.numel())
    assert cpu_kernels.update_compiled(Run(param, grad, moments, master, 0), StepScalars(hyper, 1, 1.0, 0))
    assert torch.equal(param.view(torch.int16), x.to(dtype).view(torch.int16))


# ----------------------------------------------------------------------------- dispatch and fallback


@requires_kernel
def test_non_contiguous_run_falls_back_to_torch() -> None:
    base = torch.randn(2 * 4097)
    param = base[::2]
    moments = Moments.zeros("int8", 4097, torch.device("cpu"))
    sc = StepScalars(STEPS[0][0], 1, 1.0, 0)
    assert not cpu_kernels.update_compiled(Run(param, torch.randn(4097), moments, Master("param"), 0), sc)


@requires_kernel
def test_mismatched_lengths_raise() -> None:
    moments = Moments.zeros("int8", 4096, torch.device("cpu"))
    run = Run(torch.randn(4097), torch.randn(4097), moments, Master("param"), 0)
    with pytest.raises(RuntimeError, match="exp_avg"):
        cpu_kernels.update_compiled(run, StepScalars(STEPS[0][0], 1, 1.0, 0))


@requires_kernel
def test_build_drops_flags_the_compiler_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(build._ARCH_FLAGS, "native", "-march=no-such-cpu")
    cpu_kernels.compiled_kernel.cache_clear()
    try:
        assert cpu_kernels.compiled_kernel() is not None  # built again with -fopenmp alone
        compare(run_both(4097, "int8", torch.bfloat16, "none", torch.float16, hypers=STEPS, index_base=0, seed=9))
    finally:
        monkeypatch.undo()
        cpu_kernels.compiled_kernel.cache_clear()


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def fail() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_build", fail)
    cpu_kernels.compiled_kernel.cache_clear()
    yield
    monkeypatch.undo()
    cpu_kernels.compiled_kernel.cache_clear()  # the next use loads the built module again


def test_fallback_warns_once_and_matches_update_torch(no_compiler: None) -> None:
    combos = itertools.product(["int8", "fp32"], [(torch.bfloat16, "compact"), (torch.float32, "param")])
    for fmt, (param_dtype, kind) in combos:
        gen = torch.Generator().manual_seed(2)
        want = make_state(4097, fmt, param_dtype, kind, gen)
        got = want.clone()
        grad = torch.randn(4097, generator=gen)
        sc = StepScalars(STEPS[1][0], 1, 0.5, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cpu_kernels.update_cpu(Run(got.param, grad, got.moments, got.master, 0), sc)
        update_torch(Run(want.param, grad, want.moments, want.master, 0), sc)
        first = fmt == "int8" and kind == "compact"
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == (1 if first else 0), messages
        if first:
            assert "could not be built" in messages[0] and "Ninja is required" in messages[0]
        if fmt == "fp32" and kind == "param":  # torch's fused AdamW: the same math in another operation order
            torch.testing.assert_close(got.param, want.param, rtol=1e-5, atol=1e-7)
        else:  # update_torch itself
            assert torch.equal(got.param, want.param)
            for name, t in want.moments.tensors().items():
                assert torch.equal(got.moments.tensors()[name], t), name


# ----------------------------------------------------------------------------- the pre-pass: sum of squares
@requires_kernel
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 255, 256, 257, 64 * 256 + 3, 1024 * 256 * 2 + 17])
def test_sq_sum_matches_fp64(dtype: torch.dtype, n: int) -> None:
    # The last two sizes are split between threads; the smaller ones stay on the calling thread.
    t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3.0).to(dtype)
    want = float(torch.sum(t.double() ** 2))
    got = cpu_kernels.sq_sum_compiled(t)
    assert got == pytest.approx(want, rel=1e-12)
    assert cpu_kernels.sq_sum_compiled(t) == got  # the same order every call


@requires_kernel
def test_sq_sum_non_finite_and_extremes() -> None:
    big = torch.full((300,), 3e38)  # fp32 squares would overflow; fp64 ones do not
    assert cpu_kernels.sq_sum_compiled(big) == pytest.approx(300 * 9e76, rel=1e-6)
    for bad, check in ((float("nan"), lambda s: s != s), (float("inf"), lambda s: s == float("inf"))):
        t = torch.randn(70_000)
        t[69_999] = bad  # in the second thread's part
        assert check(cpu_kernels.sq_sum_compiled(t))
    assert cpu_kernels.sq_sum_compiled(torch.zeros(0)) == 0.0
    assert cpu_kernels.sq_sum_compiled(torch.randn(8, 8).t()) is None  # not contiguous: the caller uses torch


def test_grads_sq_sum_mixes_kernel_and_torch() -> None:
    grads = [torch.randn(300), torch.randn(20, 30).t(), torch.randn(5000).bfloat16(), torch.zeros(0)]
    want = sum(float(torch.sum(g.double() ** 2)) for g in grads)
    got = grads_sq_sum(grads)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(want, rel=1e-6)
    assert float(grads_sq_sum([])) == 0.0


@requires_kernel
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 17, 257, 1_000_003])
def test_sq_sum_odd_lengths_and_non_finite_anywhere(dtype: torch.dtype, n: int) -> None:
    # Odd lengths leave a tail after the 16-element vector steps; 1_000_003 is also split between threads.
    t = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3.0).to(dtype)
    # Each of the kernel's 16 lanes adds ~n/16 positive terms: worst case (n/16 + 8) * 2**-53 relative (7e-12 at
    # n = 1e6); rounding errors of random sign grow as sqrt(n/16) * 2**-53 = 3e-14, and torch's sum is pairwise.
    # 1e-12 is 30x the expected error, and 1e4x below an fp32 accumulation's.
    assert cpu_kernels.sq_sum_compiled(t) == pytest.approx(float(torch.sum(t.double() ** 2)), rel=1e-12)
    for where in sorted({0, n // 2, n - 1}):
        for bad, check in ((float("nan"), lambda s: s != s), (float("inf"), lambda s: s == float("inf"))):
            u = t.clone()
            u[where] = bad
            assert check(cpu_kernels.sq_sum_compiled(u)), (where, bad)


@requires_kernel
def test_sq_sum_near_fp32_max() -> None:
    # Squares near 1.2e77 overflow fp32 but not fp64: the sum stays finite and exact to fp64 rounding.
    big = torch.finfo(torch.float32).max
    t = torch.rand(1_000_003, generator=torch.Generator().manual_seed(3)) * big
    want = float(torch.sum(t.double() ** 2))
    got = cpu_kernels.sq_sum_compiled(t)
    assert got != float("inf") and got == pytest.approx(want, rel=1e-12)
