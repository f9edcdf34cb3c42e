"""offload="cpu": the same numbers as no offload, state on the host (pinned where a GPU makes that possible)."""
from __future__ import annotations

import copy

import pytest
import torch

from distributed import run_ranks
from helpers import force_host_copies, make_model
from test_zero import groups, train_zero
from zeroadam import ZeroAdam, _compat


def offload_pairs(rank: int, world: int) -> dict:
    out = {}
    for fmt in ("fp32", "int8"):
        for stage in ((1, 2) if world > 1 else (0,)):
            plain = train_zero(rank, world, stage, fmt, 6, 2, 0.5, 3000)[0]
            out[(fmt, stage)] = (plain, _offload_run(rank, world, stage, fmt))
    return out


def _offload_run(rank: int, world: int, stage: int, fmt: str) -> list[torch.Tensor]:
    from test_zero import GLOBAL_BATCH, batches

    model = make_model()
    opt = ZeroAdam(
        groups(model), lr=1e-2, weight_decay=0.0, state_dtype=fmt, stage=stage, max_grad_norm=0.5,
        bucket_size=3000, offload="cpu",
    )
    assert opt.engine.offload == "cpu"
    per = GLOBAL_BATCH // world
    for mbs in batches(6, 2):
        opt.zero_grad()
        for x, y in mbs:
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            (torch.nn.functional.mse_loss(model(xs), ys) / 2).backward()
        opt.step()
    for sp in opt.engine.spaces:
        for t in list(sp.moments.tensors().values()) + list(sp.master.tensors().values()) + [sp.grad_shard]:
            assert t.device.type == "cpu"
            if _compat.pin_memory_available() and sp.flat.device.type == "cuda":
                assert t.is_pinned()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("world", [1, 2])
def test_offload_equals_no_offload(world: int) -> None:
    results = run_ranks(offload_pairs, world)
    for res in results:
        for (fmt, stage), (plain, off) in res.items():
            for a, b in zip(off, plain):
                assert float((a - b).norm() / b.norm()) <= 1e-6, (fmt, stage)


def offload_chunked_pairs(rank: int, world: int) -> dict:
    # The GPU path on CPU tensors, with every chunk boundary inside the shard.
    shard_sizes = force_host_copies(512)
    out: dict = {}
    for fmt in ("fp32", "int8"):
        for stage in (1, 2):
            plain = train_zero(rank, world, stage, fmt, 6, 2, 0.5, 3000)[0]
            out[(fmt, stage)] = (plain, _offload_run(rank, world, stage, fmt))
    out["largest_shard"] = max(shard_sizes)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_offload_host_copies_in_chunks_equal_no_offload(world: int) -> None:
    for res in run_ranks(offload_chunked_pairs, world):
        assert res.pop("largest_shard") > 2 * 512  # several chunks per shard
        for (fmt, stage), (plain, off) in res.items():
            for a, b in zip(off, plain):
                assert float((a - b).norm() / b.norm()) <= 1e-6, (fmt, stage)


def test_offload_rejects_unknown_device() -> None:
    with pytest.raises(ValueError, match="offload"):
        ZeroAdam(make_model().parameters(), offload="nvme")


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_stage0_offload_leaves_frozen_parameters_alone_like_adamw(fmt: str) -> None:
    """A requires_grad=False layer under offload="cpu" (stage 0) gets no weight decay, as with AdamW."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    ref = copy.deepcopy(model)
    opt = ZeroAdam(model.parameters(), lr=1e-2, weight_decay=0.1, state_dtype=fmt, offload="cpu")
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(10):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        for m, o in ((model, opt), (ref, adamw)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    if fmt == "fp32":
        for p, q in zip(model.parameters(), ref.parameters()):
            assert float((p - q).norm() / q.norm()) <= 1e-5
