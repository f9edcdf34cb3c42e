"""zeroadam.GradScaler with sharded stages: one global skip decision, one loss scale on every rank, and the same
parameters as torch.amp.GradScaler + AdamW in one process on the global batch."""
from __future__ import annotations

import pytest
import torch

import zeroadam
from distributed import run_ranks
from helpers import make_model
from test_zero import GLOBAL_BATCH, batches, groups

STEPS, BAD_STEP = 6, 2  # at BAD_STEP rank 0's batch holds an inf: every rank must skip that step


def poisoned(step: int, x: torch.Tensor) -> torch.Tensor:
    if step == BAD_STEP:
        x = x.clone()
        x[0, 0] = float("inf")
    return x


def reference() -> tuple[list[torch.Tensor], float]:
    model = make_model()
    opt = torch.optim.AdamW(groups(model), lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for s, mbs in enumerate(batches(STEPS, 1)):
        x, y = mbs[0]
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(poisoned(s, x)), y)).backward()
        scaler.step(opt)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], scaler.get_scale()


def train(rank: int, world: int) -> dict:
    out = {}
    per = GLOBAL_BATCH // world
    for stage in (1, 2, 3):
        model = make_model()
        if stage == 3:
            model = zeroadam.shard_model(model, units=[torch.nn.Linear])
        opt = zeroadam.ZeroAdam(groups(model), lr=1e-2, weight_decay=0.0, state_dtype="fp32", stage=stage, bucket_size=3000)
        scaler = zeroadam.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
        for s, mbs in enumerate(batches(STEPS, 1)):
            x, y = mbs[0]
            x = poisoned(s, x) if rank == 0 else x
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        params = (
            list(zeroadam.full_state_dict(model).values()) if stage == 3 else [p.detach().clone() for p in model.parameters()]
        )
        out[stage] = (params, scaler.get_scale(), opt.skipped_steps)
    return out


def test_global_skip_and_one_loss_scale() -> None:
    ref_params, ref_scale = reference()
    results = run_ranks(train, 2)
    for stage in (1, 2, 3):
        for r in results:
            params, scale, skipped = r[stage]
            assert skipped == 1, stage
            assert scale == ref_scale, stage
            err = max(float((a - b).norm() / b.norm()) for a, b in zip(params, ref_params))
            assert err <= 1e-5, (stage, err)


def test_unscale_then_clip_on_shards() -> None:
    # One process: stage 0 keeps torch's own path (nothing to ask the optimizer for).
    model = make_model()
    opt = zeroadam.ZeroAdam(model.parameters(), state_dtype="fp32")
    scaler = zeroadam.GradScaler("cpu", init_scale=8.0)
    x, y = batches(1, 1)[0][0]
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(opt)
    assert not opt._amp_owns_gradients()
    scaler.step(opt)
    scaler.update()
    assert opt.skipped_steps == 0


def torch_scaler_on_stage2(rank: int, world: int) -> str:
    model = make_model()
    opt = zeroadam.ZeroAdam(groups(model), state_dtype="fp32", stage=2, bucket_size=3000)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    x, y = batches(1, 1)[0][0]
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    try:
        scaler.step(opt)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_torch_grad_scaler_on_sharded_gradients_names_ours() -> None:
    # torch's GradScaler finds no gradient in p.grad at stage 2 (reduced into shards): a clear error, not the
    # bare "No inf checks were recorded prior to update" AssertionError of its update().
    for msg in run_ranks(torch_scaler_on_stage2, 2):
        assert "use zeroadam.GradScaler" in msg
