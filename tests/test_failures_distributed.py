"""Ranks that disagree never hang: every rank gets the same clear error, in bounded time.

One spawn of 2 gloo ranks runs every scenario in turn (starting ranks dominates the cost); each scenario records
the error each rank saw and how long it took. Before these checks existed each scenario hung until gloo's timeout
(or aborted); the outer timeout of ``run_ranks`` turns a hang into a failure.

* stages 1-2: ``gradient_sync`` differs between ranks (rank 0 "auto", rank 1 "wrapper");
* stage 3: rank 1's model has one extra layer, or one layer wider (checked in shard_model); rank 1 builds
  ZeroAdam(stage=3) with another lr, or another state_dtype;
* a checkpoint whose data file only rank 1 reads is corrupted (DCP raises a BaseException there);
* sparse gradients at stages 1, 2 and 3.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run_ranks

SECONDS = 20.0  # every scenario must end on every rank within this (a hang hits gloo's 60 s timeout)


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fn()
        error = None
    except Exception as e:  # noqa: BLE001 - the test inspects it
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": time.monotonic() - t0}


def _mlp(rank: int, *, extra: bool = False, wider: bool = False) -> nn.Module:
    torch.manual_seed(0)
    h = 33 if wider else 32
    layers: list[nn.Module] = [nn.Linear(16, h), nn.Tanh(), nn.Linear(h, 8)]
    if extra:
        layers += [nn.Tanh(), nn.Linear(8, 8)]
    return nn.Sequential(*layers)


def _train_step(model: nn.Module, opt: Any, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    opt.zero_grad()
    model(torch.randn(4, 16, generator=g)).square().mean().backward()
    opt.step()


class _SparseLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, sparse=True)
        self.head = nn.Linear(16, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


def scenarios(rank: int, world: int, root: str) -> dict[str, dict[str, Any]]:
    import zeroadam
    from zeroadam import ZeroAdam, checkpoint

    out: dict[str, dict[str, Any]] = {}

    # Item 2: who averages gradients changes the collectives of a step.
    def gradient_sync() -> None:
        model = _mlp(rank)
        opt = ZeroAdam(model.parameters(), stage=2, gradient_sync="auto" if rank == 0 else "wrapper")
        _train_step(model, opt, rank)

    out["gradient_sync"] = _outcome(gradient_sync)

    # Item 1: stage 3 checks the model in shard_model and the options in ZeroAdam(stage=3).
    out["extra_layer"] = _outcome(lambda: zeroadam.shard_model(_mlp(rank, extra=rank == 1)))
    out["wider_layer"] = _outcome(lambda: zeroadam.shard_model(_mlp(rank, wider=rank == 1)))

    def stage3_option(**kw: Any) -> Callable[[], None]:
        def run() -> None:
            model = zeroadam.shard_model(_mlp(rank))
            opt = ZeroAdam(model.parameters(), stage=3, **(kw if rank == 1 else {}))
            _train_step(model, opt, rank)

        return run

    out["stage3_lr"] = _outcome(stage3_option(lr=5e-3))
    out["stage3_state_dtype"] = _outcome(stage3_option(state_dtype="fp32"))
    out["stage3_same"] = _outcome(stage3_option())

    # Item 6: a corrupted data file that only rank 1 reads.
    def corrupted_on_rank_1() -> None:
        model = _mlp(0)
        opt = ZeroAdam(model.parameters(), stage=2, state_dtype="fp32")
        _train_step(model, opt, rank)
        path = Path(root) / "ck"
        checkpoint.save(path, model, opt)
        dist.barrier()
        if rank == 1:
            victim = path / "__1_0.distcp"
            data = bytearray(victim.read_bytes())
            data[:64] = bytes(64)
            victim.write_bytes(bytes(data))
        dist.barrier()
        checkpoint.load(path, model, opt)

    out["corrupted_on_rank_1"] = _outcome(corrupted_on_rank_1)
    out["corrupted_on_rank_1"]["type_ok"] = (out["corrupted_on_rank_1"]["error"] or "").startswith("CheckpointError")

    # Item 8: sparse gradients, stages 1-3 (last: a refused backward may leave a bucket's reduce in flight).
    out["sparse_stage3"] = _outcome(lambda: zeroadam.shard_model(_SparseLM()))

    def sparse(stage: int) -> Callable[[], None]:
        def run() -> None:
            torch.manual_seed(0)
            model = _SparseLM()
            opt = ZeroAdam(model.parameters(), stage=stage, gradient_sync="optimizer")
            opt.zero_grad()
            model(torch.tensor([[1, 2, 3]])).sum().backward()
            opt.step()

        return run

    out["sparse_stage1"] = _outcome(sparse(1))
    out["sparse_stage2"] = _outcome(sparse(2))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    return run_ranks(scenarios, 2, str(tmp_path_factory.mktemp("failures")), timeout=240)


def _same_error_on_both(results: list[dict[str, dict[str, Any]]], name: str, *needles: str) -> str:
    r0, r1 = results[0][name], results[1][name]
    assert r0["error"] is not None and r1["error"] is not None, (r0, r1)
    for r in (r0, r1):
        assert r["seconds"] < SECONDS, r
        for needle in needles:
            assert needle in r["error"], r["error"]
    return r0["error"]


def test_gradient_sync_mismatch_is_refused_on_every_rank(results: list) -> None:
    msg = _same_error_on_both(results, "gradient_sync", "ValueError", "ranks disagree", "gradient_sync")
    assert msg == results[1]["gradient_sync"]["error"]


@pytest.mark.parametrize("name, needle", [("extra_layer", "rank 1 has parameter '4.weight'"), ("wider_layer", "'0.weight'")])
def test_stage3_model_mismatch_is_refused_in_shard_model(results: list, name: str, needle: str) -> None:
    msg = _same_error_on_both(results, name, "ValueError", "zeroadam.shard_model: ranks disagree on the model", needle)
    assert msg == results[1][name]["error"]


@pytest.mark.parametrize("name, needle", [("stage3_lr", "param_groups[0] options"), ("stage3_state_dtype", "state_dtype")])
def test_stage3_option_mismatch_is_refused_in_zeroadam(results: list, name: str, needle: str) -> None:
    msg = _same_error_on_both(results, name, "ValueError", "ZeroAdam: ranks disagree", needle)
    assert msg == results[1][name]["error"]


def test_stage3_same_everywhere_trains(results: list) -> None:
    assert results[0]["stage3_same"]["error"] is None and results[1]["stage3_same"]["error"] is None


def test_corrupted_file_read_by_one_rank_fails_every_rank(results: list) -> None:
    _same_error_on_both(results, "corrupted_on_rank_1", "CheckpointError", "corrupted")
    assert results[0]["corrupted_on_rank_1"]["type_ok"] and results[1]["corrupted_on_rank_1"]["type_ok"]
    assert "rank 1" in results[0]["corrupted_on_rank_1"]["error"]  # rank 0 learns where it failed


@pytest.mark.parametrize("name", ["sparse_stage1", "sparse_stage2", "sparse_stage3"])
def test_sparse_gradients_are_refused_at_every_stage(results: list, name: str) -> None:
    msg = _same_error_on_both(results, name, "sparse", "sparse=False")
    assert "reshape is not implemented" not in msg
