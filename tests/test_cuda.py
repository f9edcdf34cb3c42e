"""ZeroAdam on CUDA parameters: the Triton backend is the one chosen, and it matches torch.

* fp32 parameters: ZeroAdam against ``torch.optim.AdamW`` (fp32 state to rounding; bf16 / int8 state by the
  relative error of the whole update, which the state's precision bounds).
* every format and master kind: one ``update_triton`` step against ``update_torch`` on the same CUDA tensors,
  with the tolerances of ``tests/test_triton_kernels.py``.
* int8 state costs at most 2.05 bytes per parameter.
* offload="cpu": every state tensor is pinned on the host, and the parameters match the on-GPU path.

Skipped without a CUDA device. ``tests/test_triton_kernels.py`` sets ``TRITON_INTERPRET=1`` for its whole process,
which would send these tests through the CPU interpreter; they skip when they see it, so run this file in a pytest
process of its own (``pytest tests/test_cuda.py``).
"""
import pytest
import torch

from zeroadam import ZeroAdam, _compat
from zeroadam.update.contract import Run, StepScalars, update_torch
from zeroadam.update.dispatch import backend_for
from zeroadam.options import GroupHyper
from zeroadam.formats.state import Master, Moments, compact_decode, ulp_up

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    # has_package, not has_triton: importing triton while collecting would bind its jit functions before
    # tests/test_triton_kernels.py sets TRITON_INTERPRET=1.
    pytest.mark.skipif(not _compat.has_package("triton"), reason="needs triton: pip install 'zeroadam[triton]'"),
]

LR = 1e-3
RTOL = 1e-6
STATE_DTYPES = ["fp32", "bf16", "int8"]
# Relative error of 10 steps' total update against torch.optim.AdamW on fp32 parameters, from the state's
# precision alone: measured on CPU with the torch path (fp32: 0, bf16: 2.5e-3, int8: 8.0e-3), with ~3x margin.
UPDATE_RTOL = {"bf16": 1e-2, "int8": 3e-2}


@pytest.fixture(autouse=True)
def _compiled_kernels() -> None:
    if _compat.triton_interpret():
        pytest.skip("TRITON_INTERPRET=1 in this process (tests/test_triton_kernels.py sets it); run this file alone")


def _dev() -> torch.device:
    return torch.device("cuda")


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device=_dev(), dtype=dtype)) for s in shapes]


# Sizes under MIN_QUANT_NUMEL keep fp32 moments; the others take the requested format; 257 and 4097 end mid-block.
SHAPES = [(256, 513), (4097,), (257,)]


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize(
    "dtype, master_weights", [(torch.float32, "auto"), (torch.bfloat16, "compact"), (torch.float16, "none")]
)
def test_triton_backend_is_chosen(state_dtype: str, dtype: torch.dtype, master_weights: str) -> None:
    from zeroadam.triton_kernels.adamw import update_triton

    params = _params(SHAPES, dtype, seed=0)
    opt = ZeroAdam(params, lr=LR, state_dtype=state_dtype, master_weights=master_weights)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        st = opt.state[p]
        run = Run(p.detach().view(-1), p.grad.view(-1), st.moments, st.master, 0)
        name, fn = backend_for(run)
        assert name == "triton" and fn is update_triton


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_matches_torch_adamw(state_dtype: str) -> None:
    ours = _params(SHAPES, torch.float32, seed=1)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = ZeroAdam(ours, lr=LR, weight_decay=0.01, state_dtype=state_dtype)
    ref_opt = torch.optim.AdamW(ref, lr=LR, weight_decay=0.01, foreach=False)
    gen = torch.Generator(device="cpu").manual_seed(2)
    for _ in range(10):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(_dev())
            p.grad, q.grad = g.clone(), g
        opt.step()
        ref_opt.step()
    for p, q, p0 in zip(ours, ref, start):
        if state_dtype == "fp32" or p.numel() < 4096:
            # torch's CUDA ops round a little differently (addcdiv's fma, division by a reciprocal): a few ulps of
            # a step of size LR after 10 steps.
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5 * LR)
        else:
            du, dr = p.detach() - p0, q.detach() - p0
            err = float((du - dr).norm() / dr.norm())
            assert err < UPDATE_RTOL[state_dtype], f"{state_dtype}: update differs from AdamW by {err:.2e} (relative)"


# ------------------------------------------------------------------------------ one kernel step vs update_torch
def _check_fp32(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_16bit(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= torch.maximum(ulp_up(got), ulp_up(want))).all()), f"{name}: more than one ulp apart"
    n_diff = int((diff > 0).sum())
    assert n_diff <= 1 + got.numel() // 1000, f"{name}: {n_diff} of {got.numel()} differ by one ulp"


def _check_codes(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 1, f"{name}: codes differ by {int(diff.max())}"
    assert int((diff > 0).sum()) <= 1 + got.numel() // 1000, f"{name}: too many codes differ by one"


def _clone_run(run: Run) -> Run:
    mo, ma = run.moments, run.master

    def c(t):
        return None if t is None else t.clone()

    return Run(
        run.param.clone(),
        run.grad.clone(),
        Moments(mo.fmt, mo.exp_avg.clone(), mo.exp_avg_sq.clone(), c(mo.exp_avg_scale), c(mo.exp_avg_sq_scale)),
        Master(ma.kind, fp32=c(ma.fp32), residual=c(ma.residual)),
        run.index_base,
    )


KINDS = [(torch.float32, "param"), (torch.bfloat16, "fp32"), (torch.bfloat16, "compact"), (torch.bfloat16, "none"),
         (torch.float16, "compact"), (torch.float16, "none")]  # fmt: skip


@pytest.mark.parametrize("n", [1, 257, 4097, (1 << 20) + 3])
@pytest.mark.parametrize("param_dtype, kind", KINDS)
@pytest.mark.parametrize("fmt", STATE_DTYPES)
def test_kernel_step_matches_update_torch(fmt: str, param_dtype: torch.dtype, kind: str, n: int) -> None:
    from zeroadam.triton_kernels.adamw import update_triton

    gen = torch.Generator(device="cpu").manual_seed(n)
    param = (torch.randn(n, generator=gen) * 0.5).to(device=_dev(), dtype=param_dtype)
    moments = Moments.zeros(fmt, n, _dev())  # type: ignore[arg-type]
    ref = Run(param, torch.empty_like(param), moments, Master.create(kind, param), 768)  # type: ignore[arg-type]
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for step in (1, 2, 3):  # each step starts both from the reference's state
        mag = 10.0 ** (torch.rand(n, generator=gen) * 4.0 - 3.0)
        ref.grad = (torch.randn(n, generator=gen) * mag).to(device=_dev(), dtype=param_dtype)
        sc = StepScalars(hyper, step, 0.37, group_index=0)
        got = _clone_run(ref)
        update_torch(ref, sc)
        update_triton(got, sc)
        mo, mr = got.moments, ref.moments
        if fmt == "fp32":
            _check_fp32("exp_avg", mo.exp_avg, mr.exp_avg, RTOL * float(mr.exp_avg.abs().max()))
            _check_fp32("exp_avg_sq", mo.exp_avg_sq, mr.exp_avg_sq, RTOL * float(mr.exp_avg_sq.max()))
        elif fmt == "bf16":
            _check_16bit("exp_avg", mo.exp_avg, mr.exp_avg)
            _check_16bit("exp_avg_sq", mo.exp_avg_sq, mr.exp_avg_sq)
        else:
            _check_codes("exp_avg", mo.exp_avg, mr.exp_avg)
            _check_codes("exp_avg_sq", mo.exp_avg_sq, mr.exp_avg_sq)
            _check_fp32("exp_avg_scale", mo.exp_avg_scale, mr.exp_avg_scale, 0.0)
            _check_fp32("exp_avg_sq_scale", mo.exp_avg_sq_scale, mr.exp_avg_sq_scale, 0.0)
        if kind == "param":
            _check_fp32("param", got.param, ref.param, RTOL * hyper.lr)
            continue
        _check_16bit("param", got.param, ref.param)
        if kind == "fp32":
            _check_fp32("master", got.master.fp32, ref.master.fp32, RTOL * hyper.lr)
        elif kind == "compact":
            x_got = compact_decode(got.param, got.master.residual)
            x_want = compact_decode(ref.param, ref.master.residual)
            step_size = torch.maximum(ulp_up(got.param), ulp_up(ref.param)) / 254.0
            excess = (x_got - x_want).abs() - (step_size + RTOL * x_want.abs() + RTOL * hyper.lr)
            assert bool((excess <= 0).all()), "compact master: more than one residual step apart"


def test_int8_state_bytes_per_param() -> None:
    params = _params([(1024, 1024)], torch.bfloat16, seed=3)
    opt = ZeroAdam(params, lr=LR, state_dtype="int8", master_weights="compact")
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    stats = opt.memory_stats()
    per_param = stats["state_bytes"] / params[0].numel()
    assert per_param <= 2.05, f"int8 state takes {per_param:.3f} bytes per parameter"


# ------------------------------------------------------------------------------ CPU offload from a GPU
@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_keeps_state_on_the_host_and_matches_the_gpu_path(
    state_dtype: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeroadam.engines import offload

    # Several parameter chunks per step, so that the copies overlap the CPU update (HostParamCopies).
    monkeypatch.setattr(offload, "HOST_CHUNK", 1024)
    ours = _params(SHAPES, dtype, seed=4)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=LR, weight_decay=0.01, state_dtype=state_dtype)
    opt = ZeroAdam(ours, **kw, offload="cpu")
    ref_opt = ZeroAdam(ref, **kw)  # on the GPU: the Triton kernels
    gen = torch.Generator(device="cpu").manual_seed(5)
    for _ in range(5):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(device=_dev(), dtype=dtype)
            p.grad, q.grad = g.clone(), g
        opt.step()
        ref_opt.step()
    for sp in opt.engine.spaces:
        assert sp.flat.device.type == "cuda"
        for t in [*sp.moments.tensors().values(), *sp.master.tensors().values(), sp.grad_shard]:
            assert t.device.type == "cpu" and t.is_pinned()
    # The C++ and the Triton kernel both repeat update_torch op for op: equal but for an ulp of sqrt, or a 16-bit
    # rounding or an int8 code on a boundary in rare elements.
    for p, q in zip(ours, ref):
        if dtype == torch.float32:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5 * LR)
        else:
            _check_16bit("param", p.detach().view(-1), q.detach().view(-1))


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_stage0_multi_tensor_step_matches_one_launch_per_parameter(state_dtype: str) -> None:
    """Stage 0 on CUDA updates a 200-tensor model in one launch per storage combination
    (``triton_kernels/adamw_multi.py``): the same bits as ``update_triton`` on every parameter, and the norm's
    pre-pass equals the per-tensor sum of squares."""
    from zeroadam.engines import local
    from zeroadam.triton_kernels.adamw import update_triton
    from zeroadam.update.dispatch import grads_sq_sum

    gen = torch.Generator().manual_seed(6)
    shapes = [(64, 65) if i % 2 == 0 else (17 + i,) for i in range(200)]
    init = [torch.randn(s, generator=gen) * 0.3 for s in shapes]
    multi = [torch.nn.Parameter(t.cuda()) for t in init]
    single = [torch.nn.Parameter(t.cuda()) for t in init]
    opt = ZeroAdam(multi, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype)
    ref = ZeroAdam(single, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype)

    def one_by_one(runs, sc, prefer=None):  # noqa: ANN001, ANN202
        for run in runs:
            update_triton(run, sc)

    for _ in range(3):
        grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
        for p, g in zip(multi, grads):
            p.grad = g.clone()
        for p, g in zip(single, grads):
            p.grad = g.clone()
        want = sum(float(g.double().square().sum()) for g in grads)
        assert abs(float(grads_sq_sum([p.grad for p in multi])) - want) <= 1e-5 * want
        opt.step()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(local, "fused_updates", one_by_one)
            ref.step()
        torch.cuda.synchronize()
        for a, b in zip(multi, single):
            assert torch.equal(a.detach(), b.detach())


def test_offload_state_mapping_stays_on_the_host_when_moved_to_the_gpu() -> None:
    """What Lightning's optimizer_to_device does with the model's device: ``st[k] = v.to("cuda")``. The values go
    back into the pinned host buffers ([Note: state views]); the state is unchanged and the optimizer still steps."""
    params = _params(SHAPES, torch.bfloat16, seed=6)
    opt = ZeroAdam(params, lr=LR, state_dtype="int8", offload="cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    for st in opt.state.values():
        for k, v in list(st.items()):
            if k != "step":
                st[k] = v.to(_dev())
    for p in params:
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[id(p)][k]), k
            assert v.device.type == "cpu" and (k == "step" or v.is_pinned())
    opt.step()
    assert all(float(st["step"]) == 2 for st in opt.state.values())


def test_gradient_norm_on_cuda_is_the_fp64_sum_in_two_launches() -> None:
    """grads_sq_sum on CUDA gradients takes the multi-tensor Triton kernel (fp64, one launch per dtype plus one
    sum) and equals the per-tensor fp64 sum; non-finite values reach it; values whose fp32 squares overflow do not
    make it inf."""
    from zeroadam.update.dispatch import grads_sq_sum

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(17 + 999 * i, generator=gen).cuda() for i in range(200)]
    want = sum(float(g.double().square().sum()) for g in grads)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = grads_sq_sum(grads)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name]
    assert len(kernels) <= 2, [e.name for e in kernels]
    assert got.dtype == torch.float64 and float(got) == pytest.approx(want, rel=1e-12)
    assert float(grads_sq_sum([torch.full((300,), 3.0e38, device="cuda")])) == pytest.approx(300 * 9e76, rel=1e-6)
    grads[150][7] = float("inf")
    assert not torch.isfinite(grads_sq_sum(grads))
