"""update_triton_runs (zeroadam.triton_kernels.adamw_multi): many runs in one launch per storage combination, the
same bits as one update_triton per run; stage 0 steps in a constant number of launches; the gradient norm's
pre-pass in a constant number of torch ops.

Kernels run on CPU tensors in Triton's interpreter, as in tests/test_triton_kernels.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or any kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

tl = pytest.importorskip("triton.language")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(tl.sum, InterpretedFunction):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set; run this file in its own pytest process",
        allow_module_level=True,
    )

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from zeroadam import ZeroAdam  # noqa: E402
from zeroadam.engines import local  # noqa: E402
from zeroadam.formats.state import Master, Moments  # noqa: E402
from zeroadam.options import GroupHyper  # noqa: E402
from zeroadam.update.contract import Run, StepScalars  # noqa: E402
from zeroadam.update.dispatch import accelerator_sq_sum, foreach_sq_sum  # noqa: E402
from zeroadam.triton_kernels import adamw, adamw_multi  # noqa: E402

CPU = torch.device("cpu")
HYPER = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# Awkward sizes: under a block, block edges, partial blocks, and one run over several interpreter programs.
SIZES = [1, 17, 255, 256, 257, 4097, 20_000, 3]


def _runs(fmt: str, param_dtype: torch.dtype, kind: str, grad_dtype: torch.dtype, seed: int) -> list[Run]:
    gen = torch.Generator().manual_seed(seed)
    runs, base = [], 5 * 256
    for n in SIZES:
        param = (torch.randn(n, generator=gen) * 0.5).to(param_dtype)
        runs.append(
            Run(
                param=param,
                grad=(torch.randn(n, generator=gen) * 10.0 ** (torch.rand(n, generator=gen) * 4 - 3)).to(grad_dtype),
                moments=Moments.zeros(fmt, n, CPU),  # type: ignore[arg-type]
                master=Master.create(kind, param),  # type: ignore[arg-type]
                index_base=base,
            )
        )
        base += -(-n // 256) * 256
    return runs


def _clone(run: Run) -> Run:
    mom = Moments(run.moments.fmt, *(t.clone() for t in run.moments.tensors().values()))
    master = Master.of(run.master.kind, {k: t.clone() for k, t in run.master.tensors().items()})
    return Run(run.param.clone(), run.grad, mom, master, run.index_base)


def _assert_same(got: Run, want: Run) -> None:
    """Bit for bit: the parameter and every storage tensor."""
    assert torch.equal(got.param, want.param)
    theirs = {**want.moments.tensors(), **want.master.tensors()}
    for key, t in {**got.moments.tensors(), **got.master.tensors()}.items():
        assert torch.equal(t, theirs[key]), key


COMBOS = [
    ("fp32", torch.float32, "param", torch.float32),
    ("bf16", torch.bfloat16, "none", torch.bfloat16),
    ("bf16", torch.float16, "fp32", torch.float32),
    ("int8", torch.bfloat16, "compact", torch.bfloat16),
    ("int8", torch.float32, "param", torch.bfloat16),
    ("int8", torch.float16, "none", torch.float16),
]


@pytest.mark.parametrize("fmt, param_dtype, kind, grad_dtype", COMBOS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in COMBOS])
def test_same_bits_as_one_launch_per_run(fmt: str, param_dtype: torch.dtype, kind: str, grad_dtype: torch.dtype) -> None:
    runs = _runs(fmt, param_dtype, kind, grad_dtype, seed=len(kind) + 7 * len(fmt))
    for step in (1, 2):
        sc = StepScalars(HYPER, step, 0.37, group_index=1)
        singles = [_clone(r) for r in runs]
        for r in singles:
            adamw.update_triton(r, sc)
        adamw_multi.update_triton_runs(runs, sc)
        for got, want in zip(runs, singles):
            _assert_same(got, want)


def test_mixed_formats_and_empty_runs() -> None:
    """One call with runs of several storage combinations (and an empty one) updates each like update_triton."""
    runs = _runs("int8", torch.bfloat16, "compact", torch.bfloat16, 1)[:4] + _runs("fp32", torch.float32, "param", torch.float32, 2)[2:5]
    runs.append(Run(torch.zeros(0), torch.zeros(0), Moments.zeros("fp32", 0, CPU), Master.create("param", torch.zeros(0)), 0))
    sc = StepScalars(HYPER, 3, 1.0, group_index=0)
    singles = [_clone(r) for r in runs]
    for r in singles:
        adamw.update_triton(r, sc)
    adamw_multi.update_triton_runs(runs, sc)
    for got, want in zip(runs, singles):
        _assert_same(got, want)


class _Counting:
    """Stands in for a jit kernel: counts ``kernel[grid]`` launches and forwards them."""

    def __init__(self, kernel, counter: list[int]) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter[0] += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counter = [0]
    for module in (adamw, adamw_multi):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Counting(getattr(module, name), counter))
    return counter


def _model(count: int, gen: torch.Generator) -> list[torch.nn.Parameter]:
    """count tensors: matrices over MIN_QUANT_NUMEL (quantized moments), vectors under it (fp32 moments), one
    transposed (non-contiguous) matrix."""
    params = []
    for i in range(count):
        shape = (64, 65) if i % 2 == 0 else (17 + i,)
        params.append(torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.3))
    params[0] = torch.nn.Parameter((torch.randn(65, 64, generator=gen) * 0.3).t())
    return params


def _one_by_one(runs: list[Run], sc: StepScalars, prefer: object = None) -> None:
    for run in runs:
        adamw.update_triton(run, sc)


@pytest.mark.parametrize("state_dtype", ["int8", "bf16"])
def test_stage0_step_in_a_few_launches(state_dtype: str, launches: list[int]) -> None:
    """A 200-tensor model: at most 4 update launches per step, and the same parameters and state as the per-run
    path (each parameter by update_triton)."""
    gen = torch.Generator().manual_seed(4)
    init = _model(200, gen)
    multi = [torch.nn.Parameter(p.detach().clone()) for p in init]
    single = [torch.nn.Parameter(p.detach().clone()) for p in init]
    multi[0] = torch.nn.Parameter(init[0].detach().clone().t().contiguous().t())  # keep the first non-contiguous
    opt = ZeroAdam(multi, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, backend="triton")
    ref = ZeroAdam(single, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, backend="triton")
    assert not multi[0].is_contiguous()
    for step in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in init]
        for p, g in zip(multi, grads):
            p.grad = g.clone()
        launches[0] = 0
        opt.step()
        assert launches[0] <= 4, f"step {step}: {launches[0]} update launches"
        # The per-run path: update_triton on each parameter's run.
        for p, g in zip(single, grads):
            p.grad = g.clone()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(local, "fused_updates", _one_by_one)
            ref.step()
        for a, b in zip(multi, single):
            assert torch.equal(a.detach(), b.detach())
    st_a, st_b = opt.state[multi[2]], ref.state[single[2]]
    assert st_a.moments.fmt == state_dtype
    for key in st_a:
        assert torch.equal(st_a[key], st_b[key]), key


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_norm_prepass_in_a_constant_number_of_ops() -> None:
    """The accelerator pre-pass is one multi-tensor norm, a stack and a dot for 200 gradients, and equals the
    per-tensor sum of squares."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(17 + i, generator=gen) for i in range(200)]
    with _CountOps() as mode:
        got = foreach_sq_sum(grads)
    assert len(mode.ops) <= 3, mode.ops
    assert sum("_foreach_norm" in op for op in mode.ops) == 1
    want = sum(float(g.double().square().sum()) for g in grads)
    assert abs(float(got) - want) <= 1e-5 * want
    # Non-finite values still reach the flag.
    grads[100][3] = float("inf")
    assert torch.isinf(foreach_sq_sum(grads))
    grads[50][0] = float("nan")
    assert torch.isnan(foreach_sq_sum(grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_prepass_in_two_launches(dtype: torch.dtype, launches: list[int]) -> None:
    """The CUDA pre-pass (sq_sum_triton): 200 gradients of one dtype in one kernel launch plus one torch.sum over
    its per-program partials, fp64, the same bits every call; the per-tensor sum of squares; non-finite values and
    values whose fp32 squares overflow."""
    gen = torch.Generator().manual_seed(3)
    grads = [(torch.randn(17 + 40 * i, generator=gen) * 10.0 ** (i % 5 - 2)).to(dtype) for i in range(200)]
    grads.insert(7, torch.zeros(0, dtype=dtype))
    with _CountOps() as mode:
        got = accelerator_sq_sum(grads, prefer="triton")
    assert launches[0] == 1, launches[0]
    # torch ops besides the interpreter's own buffer handling (empty / set_ / copies): the one sum
    compute = [op for op in mode.ops if any(k in op for k in ("sum", "norm", "dot", "mul", "pow", "add", "stack", "cat"))]
    assert compute == ["aten.sum.default"], compute
    want = sum(float(g.double().square().sum()) for g in grads)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(want, rel=1e-12)
    assert torch.equal(accelerator_sq_sum(grads, prefer="triton"), got)
    mixed = grads[:50] + [g.float() for g in grads[50:]]
    assert float(accelerator_sq_sum(mixed, prefer="triton")) == pytest.approx(
        sum(float(g.double().square().sum()) for g in mixed), rel=1e-12)
    if dtype == torch.float32:
        big = [torch.full((300,), 3.0e38)]
        assert float(accelerator_sq_sum(big, prefer="triton")) == pytest.approx(300 * 9e76, rel=1e-6)
    grads[100][3] = float("nan")
    assert not torch.isfinite(accelerator_sq_sum(grads, prefer="triton"))
    grads[100][3] = float("inf")
    assert not torch.isfinite(accelerator_sq_sum(grads, prefer="triton"))
