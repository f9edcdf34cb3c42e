"""skip_nonfinite=False: the step updates through non-finite gradients as torch.optim.AdamW does, takes no norm it
does not need, and every rank still agrees (see [Note: the non-finite skip] in zeroadam/optimizer.py)."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from distributed import run_ranks
from helpers import max_rel_err
from zeroadam import ZeroAdam

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
SHAPES = [(64, 96), (5000,), (33,)]  # int8 and bf16 moments for the first two, fp32 below 4096 elements


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _poison(grads: list[torch.Tensor], bad: float) -> None:
    grads[0][3, 5] = bad
    grads[2][7] = bad


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, bad_at: int, bad: float,
         clip: Optional[float] = None) -> None:
    for step in range(steps):
        grads = _grads(step)
        if step == bad_at:
            _poison(grads, bad)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if clip is not None and not isinstance(opt, ZeroAdam):
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()


def _same_nonfinite(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(b)
        assert torch.allclose(a[finite], b[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_updates_through_a_nonfinite_gradient_as_adamw(backend: Optional[str], bad: float) -> None:
    ours, theirs = _params(), _params()
    opt = ZeroAdam(ours, **HYPER, state_dtype="fp32", skip_nonfinite=False, backend=backend)
    ref = torch.optim.AdamW(theirs, **HYPER)
    _run(opt, ours, 4, 2, bad)
    _run(ref, theirs, 4, 2, bad)
    assert opt.skipped_steps == 0 and not opt.overflow
    _same_nonfinite([p.detach() for p in ours], [p.detach() for p in theirs])
    assert any(not torch.isfinite(p).all() for p in ours)  # the bad values reached the parameters
    for p, q in zip(ours, theirs):
        _same_nonfinite([opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]], [ref.state[q]["exp_avg"], ref.state[q]["exp_avg_sq"]])


def test_finite_steps_equal_the_default_bit_for_bit() -> None:
    """Without a bad gradient the option changes nothing, whatever the format."""
    for state_dtype in ("fp32", "bf16", "int8"):
        a, b = _params(), _params()
        on = ZeroAdam(a, **HYPER, state_dtype=state_dtype)
        off = ZeroAdam(b, **HYPER, state_dtype=state_dtype, skip_nonfinite=False)
        _run(on, a, 5, -1, 0.0)
        _run(off, b, 5, -1, 0.0)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), state_dtype


def _count_norms(opt: ZeroAdam, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at every read of the gradients for the norm."""
    calls: list[int] = []
    norm = opt.engine.local_grad_sq_sum
    monkeypatch.setattr(opt.engine, "local_grad_sq_sum", lambda: calls.append(1) or norm())
    return calls


def test_one_process_without_clipping_takes_no_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params()
    plain = ZeroAdam(params, **HYPER, skip_nonfinite=False)
    calls = _count_norms(plain, monkeypatch)
    _run(plain, params, 3, -1, 0.0)
    assert calls == []
    clipped = ZeroAdam(params, **HYPER, skip_nonfinite=False, max_grad_norm=1.0)
    calls = _count_norms(clipped, monkeypatch)
    _run(clipped, params, 2, -1, 0.0)
    assert calls == [1, 1]  # clipping needs the norm
    checked = ZeroAdam(params, **HYPER)
    calls = _count_norms(checked, monkeypatch)
    _run(checked, params, 2, -1, 0.0)
    assert calls == [1, 1]  # the default's check


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clipping_a_nonfinite_norm_as_clip_grad_norm(bad: float) -> None:
    """The norm's inf or NaN reaches the clip coefficient, as torch.nn.utils.clip_grad_norm_ applies it."""
    ours, theirs = _params(), _params()
    opt = ZeroAdam(ours, **HYPER, state_dtype="fp32", skip_nonfinite=False, max_grad_norm=1.0)
    ref = torch.optim.AdamW(theirs, **HYPER)
    _run(opt, ours, 3, 1, bad, clip=1.0)
    _run(ref, theirs, 3, 1, bad, clip=1.0)
    assert opt.skipped_steps == 0
    _same_nonfinite([p.detach() for p in ours], [p.detach() for p in theirs])


def test_grad_scaler_found_inf_still_skips() -> None:
    params = _params()
    opt = ZeroAdam(params, **HYPER, state_dtype="fp32", skip_nonfinite=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    coeffs = _grads(0)
    coeffs[1][10] = math.inf
    loss = sum((c * p).sum() for c, p in zip(coeffs, params))
    before = [p.detach().clone() for p in params]
    scaler.scale(loss).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        scaler.step(opt)
    scaler.update()
    assert opt.skipped_steps == 1 and scaler.get_scale() == 2.0**7
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_release_grads_updates_a_nonfinite_unit() -> None:
    ours, theirs = _params(), _params()
    opt = ZeroAdam(ours, **HYPER, state_dtype="fp32", release_grads=True, skip_nonfinite=False)
    ref = torch.optim.AdamW(theirs, **HYPER)
    for step in range(3):
        grads = _grads(step)
        if step == 1:
            _poison(grads, math.nan)
        for params, optimizer in ((ours, opt), (theirs, ref)):
            sum((g * p).sum() for g, p in zip(grads, params)).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert opt.skipped_units == 0
    _same_nonfinite([p.detach() for p in ours], [p.detach() for p in theirs])


def test_bad_value_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"invalid skip_nonfinite='no'; expected True or False"):
        ZeroAdam(_params(), skip_nonfinite="no")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- ranks
def _ranks(rank: int, world: int, stage: int, skip: bool) -> dict:
    params = _params()
    opt = ZeroAdam(params, **HYPER, state_dtype="fp32", stage=stage, skip_nonfinite=skip)
    for step in range(3):
        grads = _grads(10 * rank + step)
        if step == 1 and rank == world - 1:
            _poison(grads, math.nan)  # on one rank only: the average is NaN there on every rank
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return {"params": [p.detach().clone() for p in params], "skipped": opt.skipped_steps}


@pytest.mark.parametrize("stage", [1, 2])
def test_ranks_update_through_nan_alike_and_match_one_process(stage: int) -> None:
    world = 2
    results = run_ranks(_ranks, world, stage, False)
    # One process on the global batch: the ranks' gradients averaged.
    params = _params()
    ref = torch.optim.AdamW(params, **HYPER)
    for step in range(3):
        per_rank = []
        for r in range(world):
            grads = _grads(10 * r + step)
            if step == 1 and r == world - 1:
                _poison(grads, math.nan)
            per_rank.append(grads)
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in per_rank) / world
        ref.step()
    for res in results:
        assert res["skipped"] == 0
        _same_nonfinite(res["params"], [p.detach() for p in params])
    for a, b in zip(results[0]["params"], results[1]["params"]):  # the ranks hold the same parameters, NaNs alike
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _disagree(rank: int, world: int) -> None:
    ZeroAdam(_params(), stage=2, skip_nonfinite=rank == 0)


def test_ranks_that_disagree_on_the_skip_are_refused() -> None:
    with pytest.raises(RuntimeError, match="skip_nonfinite"):
        run_ranks(_disagree, 2, timeout=60)


def _stage3(rank: int, world: int, skip: bool) -> dict:
    import zeroadam
    from test_zero3 import BATCH, data, groups, loss_of, make, whole_params

    model = zeroadam.shard_model(make())
    opt = ZeroAdam(groups(model), lr=1e-2, state_dtype="fp32", stage=3, skip_nonfinite=skip)
    per = BATCH // world
    for step, mbs in enumerate(data(3, 1)):
        x, y = mbs[0]
        loss = loss_of(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        if step == 1 and rank == world - 1:
            loss = loss * math.nan  # every gradient of this rank, and so every averaged one, is NaN
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {"skipped": opt.skipped_steps, "finite": [bool(torch.isfinite(p).all()) for p in whole_params(model)]}


def test_stage3_skips_or_updates_through_a_nan_on_one_rank_alike_on_every_rank() -> None:
    for skip in (True, False):
        for res in run_ranks(_stage3, 2, skip):
            assert res["skipped"] == (1 if skip else 0)
            assert all(res["finite"]) if skip else not any(res["finite"])
