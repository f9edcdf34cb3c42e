"""Ranks that disagree are told so, on every rank, in bounded time: a rank that skips a step() the others make
(caught by the step counter carried in the norm's all-reduce), or a backward (caught by the collective timeout,
ZEROADAM_COLLECTIVE_TIMEOUT, set short here so that nothing waits long)."""
from __future__ import annotations

import time

import pytest
import torch

from distributed import run_ranks
from zeroadam import ZeroAdam


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4))


def skip_one_step(rank: int, world: int, stage: int) -> dict:
    model = _model()
    if stage == 3:
        import zeroadam

        model = zeroadam.shard_model(model, units=[torch.nn.Linear])
        opt = ZeroAdam(model.parameters(), stage=3)
    else:
        opt = ZeroAdam(model.parameters(), stage=stage, bucket_size=2000, gradient_sync="optimizer")
    t0 = time.monotonic()
    try:
        for step in range(3):
            model(torch.randn(4, 16)).sum().backward()
            if rank == 1 and step == 1:
                opt.zero_grad()  # rank 1 skips this step (a data-dependent branch)
                continue
            opt.step()
            opt.zero_grad()
        return {"error": "", "seconds": time.monotonic() - t0}
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_rank_that_skips_a_step_is_an_error_on_every_rank(stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEROADAM_COLLECTIVE_TIMEOUT", "5")
    results = run_ranks(skip_one_step, 2, stage, timeout=90)
    for r in results:
        # Stage 1 pairs rank 1's next step with rank 0's: the step counter in the norm's all-reduce tells them
        # apart at once. Stage 2 meets a bucket reduce against the norm's all-reduce, stage 3 a unit's gather: the
        # timeout ends the wait.
        assert any(m in r["error"] for m in ("out of step", "did not complete", "skipped one of them")), r
        assert r["seconds"] < 30, r


def test_collective_timeout_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroadam.comm.collectives import Group, collective_timeout

    monkeypatch.setenv("ZEROADAM_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="ZEROADAM_COLLECTIVE_TIMEOUT='soon'"):
        collective_timeout(Group(None, 0, 1))
