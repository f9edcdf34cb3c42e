"""Who averages gradients in stages 1-2 (zeroadam/grad_sync.py): a DDP wrapper or ZeroAdam, on 2 gloo ranks without
Accelerate; and parameters that stay views of the flat buffers through Module.to() and safetensors."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

from distributed import run_ranks
from helpers import GLOBAL_BATCH, batch, make_model, max_rel_err
from zeroadam import ZeroAdam

WORLD, STEPS = 2, 4


def reference() -> list[torch.Tensor]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(STEPS):
        x, y = batch(s)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _train(rank: int, stage: int, sync: str, wrap: bool, move: bool = False) -> dict:
    model = make_model()
    opt = ZeroAdam(model.parameters(), lr=1e-2, state_dtype="fp32", stage=stage, bucket_size=3000, gradient_sync=sync)
    if move:
        model.to(torch.device("cpu:0"))  # new storage on the same device, as Accelerate's device placement does
    net = torch.nn.parallel.DistributedDataParallel(model) if wrap else model
    per = GLOBAL_BATCH // WORLD
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(STEPS):
            x, y = batch(s)
            torch.nn.functional.mse_loss(net(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]).backward()
            grads_kept = sum(p.grad is not None for p in model.parameters())
            opt.step()
            opt.zero_grad()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "comm": opt.comm_stats()["elements"],
        "grads_kept": grads_kept,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }


def suite(rank: int, world: int, tmp: str) -> dict:
    from safetensors.torch import load_file, save_model

    out = {
        "ddp_wrapper_1": _train(rank, 1, "wrapper", wrap=True),
        "ddp_wrapper_2": _train(rank, 2, "wrapper", wrap=True),
        "unwrapped_wrapper": _train(rank, 1, "wrapper", wrap=False),
        "auto": _train(rank, 2, "auto", wrap=False),
        "ddp_auto_1": _train(rank, 1, "auto", wrap=True),
        "ddp_auto_2": _train(rank, 2, "auto", wrap=True),
        "moved": _train(rank, 2, "optimizer", wrap=False, move=True),
    }
    model = make_model()
    opt = ZeroAdam(model.parameters(), stage=1)
    save_model(model, os.path.join(tmp, f"rank{rank}.safetensors"))
    out["saved_keys"] = sorted(load_file(os.path.join(tmp, f"rank{rank}.safetensors")))
    model.double()  # another dtype: ZeroAdam cannot follow, and says so
    model(torch.ones(2, 67, dtype=torch.float64)).sum().backward()
    try:
        opt.step()
        out["moved_dtype"] = None
    except RuntimeError as e:
        out["moved_dtype"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(suite, WORLD, d)


@pytest.fixture(scope="module")
def ref() -> list[torch.Tensor]:
    return reference()


@pytest.mark.parametrize("sync", ["wrapper", "auto"])
@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_wrapper_averages_and_zeroadam_sends_no_gradient(
    ranks: list[dict], ref: list[torch.Tensor], stage: int, sync: str
) -> None:
    # "auto" sees the DistributedDataParallel forward over its parameters (no Accelerate here).
    for r in ranks:
        res = r[f"ddp_{sync}_{stage}"]
        assert max_rel_err(res["params"], ref) <= 1e-5
        assert set(res["comm"]) == {"all_reduce", "all_gather"}  # the check, the norm, the parameters
        assert res["grads_kept"] == 4 and not res["warnings"]


def test_wrapper_mode_without_a_wrapper_reduces_and_warns(ranks: list[dict], ref: list[torch.Tensor]) -> None:
    for r in ranks:
        res = r["unwrapped_wrapper"]
        assert max_rel_err(res["params"], ref) <= 1e-5
        assert "reduce_scatter" in res["comm"]
        assert len(res["warnings"]) == 1 and "p.grad differs between ranks" in res["warnings"][0]


def test_auto_without_a_ddp_framework_reduces_itself(ranks: list[dict], ref: list[torch.Tensor]) -> None:
    for r in ranks:
        res = r["auto"]
        assert max_rel_err(res["params"], ref) <= 1e-5
        assert "reduce" in res["comm"] and res["grads_kept"] == 0


def test_parameters_moved_by_module_to_are_rebound(ranks: list[dict], ref: list[torch.Tensor]) -> None:
    for r in ranks:
        assert max_rel_err(r["moved"]["params"], ref) <= 1e-5
        assert "build the optimizer after moving the model" in r["moved_dtype"]


def test_safetensors_saves_every_parameter_of_a_flat_buffer(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["saved_keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_ddp_watch_hook_goes_with_close_or_with_the_watch() -> None:
    import gc

    from torch.nn.modules import module as nn_module

    from zeroadam.engines.grad_sync import DDPWatch

    hooks = nn_module._global_forward_pre_hooks
    before = len(hooks)
    model = make_model()
    watch = DDPWatch(model.parameters())
    assert len(hooks) == before + 1
    model(torch.ones(1, 67))  # not DistributedDataParallel: nothing seen
    assert not watch.seen
    watch.close()
    watch.close()
    assert len(hooks) == before
    DDPWatch(model.parameters())  # dropped before any decision: the hook leaves with it
    gc.collect()
    assert len(hooks) == before
