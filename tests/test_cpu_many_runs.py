"""zeroadam.kernels.cpu on many runs or tensors in one call ([Note: many runs in one call] in adamw.cpp): the same
bits as one call per run, whatever the thread count, and one kernel call per step for a model of many tensors."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from test_cpu_kernels import GRAD_DTYPES, PARAM_MASTERS, State, make_state
from zeroadam import ZeroAdam
from zeroadam.kernels import cpu as cpu_kernels
from zeroadam.options import GroupHyper
from zeroadam.update.contract import Run, StepScalars, update_torch

SIZES = [0, 1, 255, 257, 4097, 70_003]  # 70_003 alone is over the kernel's threading threshold (64 blocks)
HYPER = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if cpu_kernels.compiled_kernel() is None:
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler or ninja)")


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def storage(s: State) -> list[torch.Tensor]:
    return [s.param, *s.moments.tensors().values(), *s.master.tensors().values()]


def mixed_states(seed: int) -> list[tuple[State, torch.Tensor, int]]:
    """(state, gradient, index_base) for every format combination, at every size in turn."""
    gen = torch.Generator().manual_seed(seed)
    combos = list(itertools.product(["fp32", "bf16", "int8"], PARAM_MASTERS, GRAD_DTYPES))
    out = []
    for i, (fmt, (param_dtype, kind), grad_dtype) in enumerate(combos):
        n = SIZES[i % len(SIZES)]
        grad = (torch.randn(n, generator=gen) * 2.0).to(grad_dtype)
        out.append((make_state(n, fmt, param_dtype, kind, gen), grad, 256 * i))
    return out


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_runs_together_equal_runs_one_by_one(threads: int) -> None:
    cases = mixed_states(seed=threads)
    apart = [(s.clone(), g, base) for s, g, base in cases]
    for step in (1, 2, 3):
        sc = StepScalars(HYPER, step, 0.37 if step == 2 else 1.0, group_index=1)
        for s, g, base in apart:
            assert cpu_kernels.update_compiled(Run(s.param, g, s.moments, s.master, base), sc)
        rest = cpu_kernels.update_compiled_runs([Run(s.param, g, s.moments, s.master, base) for s, g, base in cases], sc)
        assert rest == []
    for (got, _, _), (want, _, _) in zip(cases, apart):
        for a, b in zip(storage(got), storage(want)):
            assert torch.equal(a, b), (got.moments.fmt, got.master.kind, a.dtype, a.numel())


def test_runs_the_kernel_does_not_take_come_back_untouched() -> None:
    gen = torch.Generator().manual_seed(7)
    s_ok, s_odd = make_state(300, "int8", torch.float32, "param", gen), make_state(300, "bf16", torch.float32, "param", gen)
    odd_grad = torch.randn(300, dtype=torch.float64, generator=gen)  # no kernel for fp64 gradients
    want = s_odd.clone()
    sc = StepScalars(HYPER, 1, 1.0, group_index=0)
    odd = Run(s_odd.param, odd_grad, s_odd.moments, s_odd.master, 0)
    rest = cpu_kernels.update_compiled_runs([Run(s_ok.param, torch.randn(300), s_ok.moments, s_ok.master, 0), odd], sc)
    assert rest == [odd]
    assert all(torch.equal(a, b) for a, b in zip(storage(s_odd), storage(want)))
    # update_cpu_runs hands it to the fallback: update_torch, the definition.
    update_torch(Run(want.param, odd_grad, want.moments, want.master, 0), sc)
    cpu_kernels.update_cpu_runs([odd], sc)
    assert all(torch.equal(a, b) for a, b in zip(storage(s_odd), storage(want)))


def test_run_with_a_wrong_length_is_refused() -> None:
    gen = torch.Generator().manual_seed(8)
    s = make_state(300, "fp32", torch.float32, "param", gen)
    with pytest.raises(RuntimeError, match="grad holds 299"):
        cpu_kernels.update_compiled_runs([Run(s.param, torch.randn(299), s.moments, s.master, 0)], StepScalars(HYPER, 1, 1.0, 0))


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_sq_sums_of_many_tensors(threads: int) -> None:
    gen = torch.Generator().manual_seed(threads)
    tensors = [(torch.randn(n, generator=gen) * 3.0).to(dtype) for n, dtype in zip(SIZES * 3, GRAD_DTYPES * 6)]
    want = sum(float(torch.sum(t.double() ** 2)) for t in tensors)
    got, rest = cpu_kernels.sq_sums_compiled(tensors)
    assert rest == [] and got == pytest.approx(want, rel=1e-12)
    assert cpu_kernels.sq_sums_compiled(tensors)[0] == got  # the same order every call
    # One tensor: the same partition, so the same bits, as sq_sum_compiled.
    assert cpu_kernels.sq_sums_compiled(tensors[5:6])[0] == cpu_kernels.sq_sum_compiled(tensors[5])
    odd = [torch.randn(8, 8).t(), torch.randn(10, dtype=torch.float64)]
    got_odd, rest = cpu_kernels.sq_sums_compiled([tensors[4], *odd])
    assert rest == odd and got_odd == pytest.approx(float(torch.sum(tensors[4].double() ** 2)), rel=1e-12)
    for i in (0, 7, len(tensors) - 1):  # a non-finite value in any tensor, whichever thread sums it
        for bad, check in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
            spoiled = [t.clone() for t in tensors]
            if spoiled[i].numel() == 0:
                continue
            spoiled[i][-1] = bad
            assert check(cpu_kernels.sq_sums_compiled(spoiled)[0]), (i, bad)


def test_one_kernel_call_per_step_for_many_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = cpu_kernels.compiled_kernel()
    calls = {"steps": 0, "sq_sums": 0}

    def counted(name: str):
        fn = getattr(kernel, name)

        def call(*args):
            calls[name] += 1
            return fn(*args)

        return call

    monkeypatch.setattr(cpu_kernels, "compiled_kernel", lambda: kernel._replace(**{n: counted(n) for n in calls}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(100)])  # 200 tensors
    ref = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(100)])
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = ZeroAdam(model.parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x = torch.randn(4, 8)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert calls == {"steps": 3, "sq_sums": 3}  # one of each per step, the planned ones included
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
