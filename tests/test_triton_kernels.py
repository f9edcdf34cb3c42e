"""update_triton (zeroadam.triton_kernels.adamw) against update_torch, the definition of the update.

The kernels run on CPU tensors in Triton's interpreter. Each step starts both backends from the same state (the
reference's state after the previous step), so every comparison measures one update and errors never compound:

* fp32 values (moments, fp32 parameters, fp32 masters, int8 block scales) agree to ~1e-6 relative; torch's CPU
  sqrt is not correctly rounded, the kernels' is, so exact equality is not expected.
* 16-bit values (parameters, bf16 moments) are equal, or one ulp apart in rare elements where the fp32 value sits
  on a rounding boundary; int8 codes likewise equal or ±1 in rare elements.
* compact masters agree as decoded values, to one residual step (ulp / 254): a value on a residual rounding
  boundary may go either way.
"""
import os

# Kernels bind to the interpreter when they are defined: set this before triton or any kernel module is imported.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

tl = pytest.importorskip("triton.language")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# Triton's own jit functions (tl.sum, tl.max) are bound when triton is first imported: if another module of this
# pytest process imported triton before the line above, they cannot run in the interpreter.
if not isinstance(tl.sum, InterpretedFunction):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set (by a test module collected earlier in this "
        "process); run this file in its own pytest process",
        allow_module_level=True,
    )

from zeroadam import ZeroAdam  # noqa: E402
from zeroadam.update.contract import Run, StepScalars, update_torch  # noqa: E402
from zeroadam.update.dispatch import backend_for  # noqa: E402
from zeroadam.options import GroupHyper  # noqa: E402
from zeroadam.formats.state import Master, Moments, compact_decode, ulp_up  # noqa: E402
from zeroadam.triton_kernels.adamw import update_triton  # noqa: E402

CPU = torch.device("cpu")
LR = 1e-2  # large enough that one step moves 16-bit parameters by many ulps
GRAD_SCALE = 0.37  # not a power of two, so the scaling rounds
STEPS = 3  # step 1 starts from zero moments; later steps dequantize what the previous step stored
INDEX_BASE = 3 * 256
RTOL = 1e-6

PARAM_KINDS = [
    (torch.float32, "param"),
    (torch.bfloat16, "fp32"),
    (torch.bfloat16, "compact"),
    (torch.bfloat16, "none"),
    (torch.float16, "fp32"),
    (torch.float16, "compact"),
    (torch.float16, "none"),
]
# Block edges (255, 256, 257), a partial last block (4097), and a run over two interpreter programs (20_000);
# weight decay alternates so that every format and master kind sees both.
SIZES_DECAY = [(1, 0.0), (255, 0.1), (256, 0.0), (257, 0.1), (4097, 0.0), (20_000, 0.1)]


def _hyper(weight_decay: float, beta1: float = 0.9) -> GroupHyper:
    return GroupHyper(lr=LR, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=weight_decay)


def _make_run(fmt: str, param_dtype: torch.dtype, kind: str, n: int, gen: torch.Generator) -> Run:
    param = (torch.randn(n, generator=gen) * 0.5).to(param_dtype)
    return Run(
        param=param,
        grad=torch.empty(n, dtype=param_dtype),
        moments=Moments.zeros(fmt, n, CPU),  # type: ignore[arg-type]
        master=Master.create(kind, param),  # type: ignore[arg-type]
        index_base=INDEX_BASE,
    )


def _random_grad(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # Magnitudes spread over four decades, so int8 blocks hold elements far below their absmax.
    mag = 10.0 ** (torch.rand(n, generator=gen) * 4.0 - 3.0)
    return (torch.randn(n, generator=gen) * mag).to(dtype)


def _clone(t):
    return None if t is None else t.clone()


def _clone_run(run: Run) -> Run:
    mo, ma = run.moments, run.master
    return Run(
        param=run.param.clone(),
        grad=run.grad.clone(),
        moments=Moments(
            mo.fmt, mo.exp_avg.clone(), mo.exp_avg_sq.clone(), _clone(mo.exp_avg_scale), _clone(mo.exp_avg_sq_scale)
        ),
        master=Master(ma.kind, fp32=_clone(ma.fp32), residual=_clone(ma.residual)),
        index_base=run.index_base,
    )


def _rare(n: int) -> int:
    """How many elements may sit on a rounding boundary and differ."""
    return 1 + n // 1000


def _check_fp32(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_16bit(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    diff = (got.float() - want.float()).abs()
    spacing = torch.maximum(ulp_up(got), ulp_up(want))
    far = torch.nonzero(~(diff <= spacing)).flatten()
    assert far.numel() == 0, f"{name}: {far.numel()} elements more than one ulp apart, first at {far[:5].tolist()}"
    n_diff = int((diff > 0).sum())
    assert n_diff <= _rare(got.numel()), f"{name}: {n_diff} of {got.numel()} elements differ by one ulp"


def _check_codes(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 1, f"{name}: codes differ by up to {int(diff.max())}"
    n_diff = int((diff > 0).sum())
    assert n_diff <= _rare(got.numel()), f"{name}: {n_diff} of {got.numel()} codes differ by one"


def _check_master(got: Run, want: Run) -> None:
    kind = want.master.kind
    if kind == "param":
        _check_fp32("param", got.param, want.param, atol=RTOL * LR)
        return
    _check_16bit("param", got.param, want.param)
    if kind == "fp32":
        _check_fp32("master", got.master.fp32, want.master.fp32, atol=RTOL * LR)
    elif kind == "compact":
        x_got = compact_decode(got.param, got.master.residual)
        x_want = compact_decode(want.param, want.master.residual)
        step = torch.maximum(ulp_up(got.param), ulp_up(want.param)) / 254.0
        # One residual step, plus the fp32 tolerance of the value itself (near 0, an ulp of a step of size LR).
        excess = (x_got - x_want).abs() - (step + RTOL * x_want.abs() + RTOL * LR)
        bad = torch.nonzero(excess > 0).flatten()
        assert bad.numel() == 0, f"compact master: more than one residual step apart at {bad[:5].tolist()}"


def _check_moments(got: Moments, want: Moments) -> None:
    if want.fmt == "fp32":
        _check_fp32("exp_avg", got.exp_avg, want.exp_avg, atol=RTOL * float(want.exp_avg.abs().max()))
        _check_fp32("exp_avg_sq", got.exp_avg_sq, want.exp_avg_sq, atol=RTOL * float(want.exp_avg_sq.max()))
    elif want.fmt == "bf16":
        _check_16bit("exp_avg", got.exp_avg, want.exp_avg)
        _check_16bit("exp_avg_sq", got.exp_avg_sq, want.exp_avg_sq)
    else:
        _check_codes("exp_avg", got.exp_avg, want.exp_avg)
        _check_codes("exp_avg_sq", got.exp_avg_sq, want.exp_avg_sq)
        _check_fp32("exp_avg_scale", got.exp_avg_scale, want.exp_avg_scale, atol=0.0)
        _check_fp32("exp_avg_sq_scale", got.exp_avg_sq_scale, want.exp_avg_sq_scale, atol=0.0)


def _run_lockstep(
    ref: Run, hyper: GroupHyper, grad_dtype: torch.dtype, gen: torch.Generator, steps: int = STEPS
) -> None:
    """Several steps; each runs both backends from the reference's state and compares the results."""
    n = ref.param.numel()
    for step in range(1, steps + 1):
        ref.grad = _random_grad(n, grad_dtype, gen)
        sc = StepScalars(hyper, step, GRAD_SCALE, group_index=0)
        got = _clone_run(ref)
        update_torch(ref, sc)
        update_triton(got, sc)
        where = f"step {step}"
        try:
            _check_moments(got.moments, ref.moments)
            _check_master(got, ref)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from e


@pytest.mark.parametrize("n, weight_decay", SIZES_DECAY, ids=[f"n{n}-wd{wd}" for n, wd in SIZES_DECAY])
@pytest.mark.parametrize(
    "param_dtype, kind", PARAM_KINDS, ids=[f"{str(d).split('.')[1]}-{k}" for d, k in PARAM_KINDS]
)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_matches_update_torch(fmt: str, param_dtype: torch.dtype, kind: str, n: int, weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(n * 7 + len(kind))
    ref = _make_run(fmt, param_dtype, kind, n, gen)
    _run_lockstep(ref, _hyper(weight_decay), param_dtype, gen)


@pytest.mark.parametrize(
    "param_dtype, grad_dtype, kind",
    [
        (torch.bfloat16, torch.float32, "compact"),
        (torch.float32, torch.bfloat16, "param"),
        (torch.float16, torch.float32, "none"),
    ],
)
def test_gradient_dtype_differs_from_param(param_dtype: torch.dtype, grad_dtype: torch.dtype, kind: str) -> None:
    gen = torch.Generator().manual_seed(11)
    ref = _make_run("int8", param_dtype, kind, 4097, gen)
    _run_lockstep(ref, _hyper(0.1), grad_dtype, gen)


def test_large_lerp_weight() -> None:
    """beta1 < 0.5 takes the other branch of torch's lerp."""
    gen = torch.Generator().manual_seed(5)
    ref = _make_run("fp32", torch.float32, "param", 257, gen)
    _run_lockstep(ref, _hyper(0.1, beta1=0.2), torch.float32, gen)


@pytest.mark.parametrize("index_base", [2**31 - 1024, 2**32 - 1024, 2**33 + 512])
def test_hash_index_wraps_like_the_reference(index_base: int) -> None:
    """The stochastic-rounding index is taken modulo 2**32, whatever the width of index_base."""
    gen = torch.Generator().manual_seed(3)
    ref = _make_run("bf16", torch.bfloat16, "none", 4097, gen)
    ref.index_base = index_base
    _run_lockstep(ref, _hyper(0.0), torch.bfloat16, gen, steps=2)


def test_empty_run_is_a_no_op() -> None:
    gen = torch.Generator().manual_seed(0)
    run = _make_run("int8", torch.bfloat16, "compact", 0, gen)
    update_triton(run, StepScalars(_hyper(0.1), 1, 1.0, group_index=0))


def test_rejects_compact_master_on_fp32_param() -> None:
    gen = torch.Generator().manual_seed(0)
    run = _make_run("fp32", torch.bfloat16, "compact", 300, gen)
    run.param = run.param.float()
    run.grad = torch.zeros(300)
    with pytest.raises(ValueError, match="16-bit parameter"):
        update_triton(run, StepScalars(_hyper(0.1), 1, 1.0, group_index=0))


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
def test_zeroadam_triton_backend(state_dtype: str) -> None:
    """ZeroAdam(backend="triton") on CPU tensors (interpreted) tracks ZeroAdam(backend="torch")."""
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(64, 80, generator=gen), torch.randn(80, generator=gen)]  # int8 / bf16 moments; fp32 (small)
    params = {b: [torch.nn.Parameter(t.clone()) for t in init] for b in ("triton", "torch")}
    opts = {b: ZeroAdam(params[b], lr=LR, weight_decay=0.1, state_dtype=state_dtype, backend=b) for b in params}
    for _ in range(STEPS):
        grads = [torch.randn(t.shape, generator=gen) for t in init]
        for b in params:
            for p, g in zip(params[b], grads):
                p.grad = g.clone()
            opts[b].step()
    p0 = params["triton"][0]
    st = opts["triton"].state[p0]
    run = Run(p0.detach().view(-1), p0.grad.view(-1), st.moments, st.master, 0)
    assert backend_for(run, prefer="triton")[0] == "triton"
    assert st.moments.fmt == state_dtype
    for got, want in zip(params["triton"], params["torch"]):
        # Not lockstep: a rare int8 code that rounds the other way changes later steps by a fraction of a step.
        torch.testing.assert_close(got.detach(), want.detach(), rtol=RTOL, atol=1e-3 * LR)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter: 1 / a subnormal scale
def test_int8_extreme_magnitudes() -> None:
    """Blocks whose exp_avg scale is subnormal (its reciprocal overflows: the encoder divides instead) and blocks
    near the fp32 limit, against update_torch."""
    n = 1024
    gen = torch.Generator().manual_seed(13)
    ref = _make_run("int8", torch.float32, "param", n, gen)
    for step, mag in enumerate((1e-39, 1e-39, 1e17), start=1):
        ref.grad = torch.randn(n, generator=gen) * mag
        sc = StepScalars(_hyper(0.0), step, 1.0, group_index=0)
        got = _clone_run(ref)
        update_torch(ref, sc)
        update_triton(got, sc)
        _check_moments(got.moments, ref.moments)
        if step < 3:  # the reciprocal of the scale overflows fp32
            assert bool((ref.moments.exp_avg_scale < torch.finfo(torch.float32).tiny).all())
