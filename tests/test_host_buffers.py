"""Pooled host gradient buffers (zeroadam.engines.offload.HostBuffers): reused bytes never leak one step's gradients
into the next. A parameter with a gradient in one step and none in the next must count as a zero gradient at
stages 2 and 3, though its bucket / unit buffer held its previous gradient."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zeroadam
from distributed import run_ranks
from helpers import max_rel_err
from zeroadam import ZeroAdam
from zeroadam.engines.offload import HostBuffers

STEPS, BATCH = 6, 4


def test_buffers_are_reused_smallest_first_and_never_shared() -> None:
    pool = HostBuffers()
    a = pool.take(1000)
    b = pool.take(4000)
    pool.give(a.view(torch.float32))  # a dtype view goes back as its bytes
    pool.give(b)
    c = pool.take(800)
    assert c.data_ptr() == a.data_ptr()  # the smallest that fits
    d = pool.take(3000)
    assert d.data_ptr() == b.data_ptr()
    e = pool.take(100)  # nothing free: a new buffer, not one in use
    assert e.data_ptr() not in (c.data_ptr(), d.data_ptr())
    assert pool.nbytes() == 0


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(40, 40)
        self.b = nn.Linear(40, 40)  # used in even steps only
        self.head = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if use_b:
            h = h + torch.tanh(self.b(x))
        return self.head(h)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 40, generator=g), torch.randn(BATCH, 5, generator=g)


def reference() -> list[torch.Tensor]:
    """torch AdamW with a missing gradient given as zeros (ZeroAdam's stage 1-3 rule)."""
    model = TwoBranches()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _data(step)
        nn.functional.mse_loss(model(x, step % 2 == 0), y).backward()
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train(rank: int, world: int, stage: int) -> list[torch.Tensor]:
    model = TwoBranches()
    if stage == 3:
        model = zeroadam.shard_model(model, units=[nn.Linear])
    opt = ZeroAdam(model.parameters(), lr=1e-2, stage=stage, bucket_size=1700)  # buckets split across the branches
    per = BATCH // world
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _data(step)
        sl = slice(rank * per, (rank + 1) * per)
        nn.functional.mse_loss(model(x[sl], step % 2 == 0), y[sl]).backward()
        opt.step()
    if stage == 3:
        full = zeroadam.full_state_dict(model)
        return [full[n].clone() for n, _ in TwoBranches().named_parameters()]
    return [p.detach().clone() for p in model.parameters()]


def suite(rank: int, world: int) -> dict:
    return {stage: train(rank, world, stage) for stage in (2, 3)}


@pytest.mark.parametrize("stage", [2, 3])
def test_a_gradient_missing_after_a_step_with_one_counts_as_zero(stage: int) -> None:
    ref = reference()
    for r in run_ranks(suite, 2, timeout=300):
        assert max_rel_err(r[stage], ref) <= 1e-5


def test_empty_buffers_are_not_kept() -> None:
    pool = HostBuffers()
    a, b = pool.take(0), pool.take(0)
    pool.give(a)
    pool.give(b.view(torch.float32))
    assert pool.free == []
