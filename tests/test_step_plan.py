"""The stage-0 step plan (engines/local.py, [Note: the stage-0 step plan]): after the first step the CPU step runs
from argument tables kept between steps; every change to what they were built from sends the step down the general
path. Each scenario runs the same events on two optimizers, one of them with the plan turned off, and wants the same
bits after every step (parameters, every state tensor, step counts, skipped steps)."""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from zeroadam import ZeroAdam
from zeroadam.kernels import cpu as cpu_kernels

SHAPES = [(33, 17), (300,), (257,), (4, 4, 4), (1,), (5000,)]
Event = Callable[[ZeroAdam, list[torch.nn.Parameter], int], None]


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if cpu_kernels.compiled_kernel() is None:
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler or ninja)")


def make(params: list[torch.nn.Parameter], planned: bool, **options) -> ZeroAdam:
    opt = ZeroAdam(
        [{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.05,  # below the gradients' norm: every step clips, so the norm is used
        **options,
    )
    opt.engine.plan_steps = planned
    return opt


def same(a: ZeroAdam, b: ZeroAdam, pa: list[torch.nn.Parameter], pb: list[torch.nn.Parameter], where: str) -> None:
    assert a.skipped_steps == b.skipped_steps, where
    for i, (p, q) in enumerate(zip(pa, pb)):
        assert torch.equal(p, q), f"{where}: parameter {i}"
        sa, sb = a.state.get(p), b.state.get(q)
        assert (sa is None) == (sb is None), f"{where}: state of {i}"
        if sa is None:
            continue
        assert list(sa) == list(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{where}: parameter {i} {key}"


def run(events: dict[int, Event], steps: int = 7, dtype: torch.dtype = torch.float32, **options) -> list[bool]:
    """Both optimizers through ``steps`` steps with ``events[k]`` applied to both before step k; whether the planned
    one had a plan after each step."""
    torch.manual_seed(0)
    base = [torch.randn(s) for s in SHAPES]
    pa = [torch.nn.Parameter(t.clone().to(dtype)) for t in base]
    pb = [torch.nn.Parameter(t.clone().to(dtype)) for t in base]
    a, b = make(pa, True, **options), make(pb, False, **options)
    planned = []
    for k in range(1, steps + 1):
        gen = torch.Generator().manual_seed(k)
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in pa]
        for opt, params in ((a, pa), (b, pb)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if k in events:
                events[k](opt, params, k)
            opt.step()
        same(a, b, pa, pb, f"after step {k}")
        planned.append(a.engine._plan is not None)
    return planned


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
def test_plan_equals_general_path(state_dtype: str) -> None:
    planned = run({}, state_dtype=state_dtype)
    assert planned == [False] + [True] * 6  # the first step makes the state; every later one is planned


def test_plan_with_bf16_parameters_and_masters() -> None:
    for master in ("fp32", "compact", "none"):
        assert run({}, dtype=torch.bfloat16, state_dtype="int8", master_weights=master)[-1], master


def _no_grad_on_one(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    params[2].grad = None


def _replace_param_data(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    params[1].data = params[1].data.clone()  # the same values at a new address


def _shrink_param_data(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    params[0].data = params[0].data.t()  # the same address, no longer contiguous


def _write_step(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    opt.state[params[3]]["step"].fill_(40.0)


def _replace_step_storage(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    opt.state[params[3]]["step"].data = torch.tensor(40.0)  # a new address, no version bump


def _assign_step(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    opt.state[params[3]]["step"] = torch.tensor(40.0)


def _assign_moment(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    st = opt.state[params[5]]
    key = next(key for key in st if key != "step" and st[key].numel() == params[5].numel())
    st[key] = st[key].clone().flip(0)  # new values in a new tensor, of the same dtype


def _reload(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    opt.load_state_dict(opt.state_dict())


def _nan_grad(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    params[4].grad[0] = float("nan")


def _grad_in_place(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    params[5].grad.mul_(3.0)  # the same tensor, new values: the norm must see them


def _grad_not_contiguous(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    g = params[0].grad
    params[0].grad = g.t().contiguous().t()


def _clip_then_replace_param(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    opt.clip_grad_norm_(0.02)  # the norm alone, then user code before the step: the step must check again
    _replace_param_data(opt, params, k)


def _new_group(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
    extra = torch.nn.Parameter(torch.full((70,), 0.5))
    extra.grad = torch.full((70,), 0.25)
    params.append(extra)
    opt.add_param_group({"params": [extra]})


EVENTS = {
    "no grad on one": {3: _no_grad_on_one},
    "param data replaced": {3: _replace_param_data},
    "param no longer contiguous": {3: _shrink_param_data},
    "step written": {3: _write_step},
    "step storage replaced": {3: _replace_step_storage},
    "step assigned": {3: _assign_step},
    "moment assigned": {3: _assign_moment},
    "state reloaded": {3: _reload, 5: _reload},
    "nan gradient": {3: _nan_grad},
    "gradient scaled in place": {3: _grad_in_place, 4: _grad_in_place},
    "gradient not contiguous": {3: _grad_not_contiguous},
    "param group added": {3: _new_group},
    "clipped, then param data replaced": {3: _clip_then_replace_param},
}


@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
@pytest.mark.parametrize("name", list(EVENTS))
def test_changes_between_steps(name: str, state_dtype: str) -> None:
    run(EVENTS[name], state_dtype=state_dtype)


def test_scale_storage_replaced() -> None:
    def replace(opt: ZeroAdam, params: list[torch.nn.Parameter], k: int) -> None:
        st = opt.state[params[5]]
        st["exp_avg_scale"].data = st["exp_avg_scale"].clone()  # per-block tensors are handed out as they are

    run({3: replace}, state_dtype="int8")


def test_plan_comes_back_after_a_change() -> None:
    planned = run({3: _replace_param_data}, steps=6)
    assert planned == [False, True, True, True, True, True]  # rebuilt at once on the changed step


def test_no_plan_off_the_compiled_kernel() -> None:
    planned = run({}, steps=3, backend="torch")
    assert planned == [False, False, False]
