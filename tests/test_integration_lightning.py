"""Lightning Fabric (DDP strategy) on 2 gloo CPU processes: ZeroAdam checkpoints through consolidate_state_dict
(Fabric calls it on every rank, then writes rank 0's state_dict), and training like torch.optim.AdamW."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("lightning")

from distributed import run_ranks  # noqa: E402
from helpers import moment_tensors, GLOBAL_BATCH, batch, make_model, max_rel_err  # noqa: E402

WORLD, STEPS, SAVE_AT, LR = 2, 5, 3, 1e-2


def _run(rank: int, make_opt, ckpt: str, start: int) -> tuple[list[torch.Tensor], dict]:
    """The parameters after training, and what the optimizer communicated in its last step."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp")
    fabric.launch()
    model = make_model()
    opt = make_opt(model)
    model, opt = fabric.setup(model, opt)
    if start:
        fabric.load(ckpt, {"model": model, "optimizer": opt})
    per = GLOBAL_BATCH // WORLD
    for s in range(start, STEPS):
        x, y = batch(s)
        fabric.backward(torch.nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]))
        fabric.clip_gradients(model, opt, max_norm=0.5)
        opt.step()
        opt.zero_grad()
        if s + 1 == SAVE_AT and not start:
            fabric.save(ckpt, {"model": model, "optimizer": opt})
    inner = getattr(opt, "optimizer", opt)  # Fabric's optimizer wrapper
    comm = inner.comm_stats()["elements"] if hasattr(inner, "comm_stats") else {}
    return [p.detach().clone() for p in model.parameters()], comm


def suite(rank: int, world: int, tmp: str) -> dict:
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.chdir(tmp)  # Fabric's atomic save leaves a temporary file in the working directory
    from zeroadam import ZeroAdam

    warnings.filterwarnings("ignore")
    # Fabric wraps the model in DDP, which averages the gradients; gradient_sync="auto" notices its forward.
    zero = lambda m: ZeroAdam(m.parameters(), lr=LR, state_dtype="fp32", stage=2)  # noqa: E731
    ckpt = os.path.join(tmp, "fabric.ckpt")
    out = {"adamw": _run(rank, lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.01), "", 0)[0]}
    out["zero"], out["zero_comm"] = _run(rank, zero, ckpt, 0)
    out["resumed"] = _run(rank, zero, ckpt, SAVE_AT)[0]
    if rank == 0:
        out["saved"] = torch.load(ckpt, weights_only=False)["optimizer"]
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(suite, WORLD, d, timeout=240)


def test_trains_like_adamw_under_fabric_ddp(ranks: list[dict]) -> None:
    for r in ranks:
        assert max_rel_err(r["zero"], r["adamw"]) <= 1e-5
        # DDP averaged the gradients: ZeroAdam only checks them (all-reduce) and gathers parameters.
        assert set(r["zero_comm"]) == {"all_reduce", "all_gather"}


def test_fabric_checkpoint_holds_the_whole_state_and_resumes_exactly(ranks: list[dict]) -> None:
    saved = ranks[0]["saved"]
    shapes = sorted(tuple(p.shape) for p in make_model().parameters())
    assert sorted(tuple(moment_tensors(e)[0].shape) for e in saved["state"].values()) == shapes
    assert all("shard_elements" not in e and float(e["step"]) == SAVE_AT for e in saved["state"].values())
    for r in ranks:
        assert max_rel_err(r["resumed"], r["zero"]) == 0.0
