"""Accelerate on 2 gloo CPU processes: an ordinary loop with only the optimizer swapped for ZeroAdam (the model
DDP-wrapped), and ZeroAccelerator (no DDP, ZeroAdam averages itself), against torch.optim.AdamW on the global batch:
accumulation, clipping, GradScaler skips, save_state / load_state."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("accelerate")

from distributed import run_ranks  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 12
STEPS, MICRO, CLIP, SAVE_AT = 6, 2, 0.5, 3
LR = 1e-2


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 67*97 = 6499 and 97*13 = 1261 elements: shards end inside parameters and blocks need padding.
    return torch.nn.Sequential(torch.nn.Linear(67, 97), torch.nn.Tanh(), torch.nn.Linear(97, 13))


def groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": decay, "weight_decay": 0.1},
        {"params": no_decay, "weight_decay": 0.0, "lr": LR * 2, "betas": (0.8, 0.99)},
    ]


def batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1234)
    return [
        [(torch.randn(GLOBAL_BATCH, 67, generator=g), torch.randn(GLOBAL_BATCH, 13, generator=g)) for _ in range(MICRO)]
        for _ in range(STEPS)
    ]


def reference() -> tuple[list[torch.Tensor], list[float]]:
    """torch.optim.AdamW in one process on the global batch: parameters after STEPS steps, and the clip norms."""
    model = make_model()
    opt = torch.optim.AdamW(groups(model), lr=LR)
    norms = []
    for mbs in batches():
        for x, y in mbs:
            (torch.nn.functional.mse_loss(model(x), y) / MICRO).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], norms


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- ranks
def _accelerator(kind: str, **kwargs):
    from accelerate import Accelerator

    from zeroadam.integrations.accelerate import ZeroAccelerator

    return (ZeroAccelerator if kind == "zero" else Accelerator)(gradient_accumulation_steps=MICRO, **kwargs)


def _train(rank: int, kind: str, stage: int, ckpt: str, start: int) -> dict:
    """The ordinary loop from step ``start`` (loading ``ckpt`` if start > 0) to STEPS, saving at SAVE_AT."""
    from zeroadam import ZeroAdam

    acc = _accelerator(kind)
    model = make_model()
    opt = ZeroAdam(groups(model), lr=LR, state_dtype="fp32", stage=stage, bucket_size=3000)
    model, opt = acc.prepare(model, opt)
    if start > 0:
        acc.load_state(ckpt)
    per = GLOBAL_BATCH // WORLD
    norms, grads_after_backward = [], []
    for step, mbs in enumerate(batches()):
        if step < start:
            continue
        for x, y in mbs:
            with acc.accumulate(model):
                out = model(x[rank * per : (rank + 1) * per])
                acc.backward(torch.nn.functional.mse_loss(out, y[rank * per : (rank + 1) * per]))
                if acc.sync_gradients:
                    grads_after_backward.append(sum(p.grad is not None for p in model.parameters()))
                    norms.append(float(acc.clip_grad_norm_(model.parameters(), CLIP)))
                opt.step()
                opt.zero_grad()
        if step + 1 == SAVE_AT and start == 0:
            acc.save_state(ckpt)
    inner = acc.unwrap_model(model)
    return {
        "params": [p.detach().clone() for p in inner.parameters()],
        "norms": norms,
        "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
        "comm": opt.optimizer.comm_stats(),
        "grads_after_backward": grads_after_backward,
    }


def _scaler_run(rank: int, make_opt) -> dict:
    """The ordinary loop with an fp16-style GradScaler (Accelerate refuses fp16 on CPU, so the scaler is handed
    over directly: backward scales the loss, the optimizer steps through scaler.step). Step 2 overflows on rank 0."""
    acc = _accelerator("plain")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    model = make_model()
    opt = make_opt(model)
    model, opt = acc.prepare(model, opt)
    per = GLOBAL_BATCH // WORLD
    skipped, scales = [], []
    for step, mbs in enumerate(batches()):
        for x, y in mbs:
            with acc.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per])
                if step == 2 and rank == 0:
                    loss = loss * float("inf")
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
        skipped.append(acc.optimizer_step_was_skipped)
        scales.append(float(acc.scaler.get_scale()))
    return {"params": [p.detach().clone() for p in acc.unwrap_model(model).parameters()], "skipped": skipped, "scales": scales}


def _refusals() -> dict:
    from zeroadam import ZeroAdam

    out = {}
    acc = _accelerator("zero")
    acc.scaler = torch.amp.GradScaler("cpu")
    model = make_model()
    try:
        acc.prepare(model, ZeroAdam(model.parameters(), stage=2))
        out["fp16"] = None
    except ValueError as e:
        out["fp16"] = str(e)
    acc = _accelerator("zero")
    model = make_model()
    opt = ZeroAdam(model[0].parameters(), stage=1)  # the last layer is trainable but not in the optimizer
    try:
        acc.prepare(model, opt)
        out["partial"] = None
    except ValueError as e:
        out["partial"] = str(e)
    return out


def suite(rank: int, world: int, ckpt_dir: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "true"
    from zeroadam import ZeroAdam

    warnings.filterwarnings("ignore", category=FutureWarning)
    out: dict = {}
    for kind in ("plain", "zero"):
        for stage in (1, 2):
            ckpt = os.path.join(ckpt_dir, f"{kind}{stage}")
            out[kind, stage] = _train(rank, kind, stage, ckpt, 0)
            out[kind, stage, "resumed"] = _train(rank, kind, stage, ckpt, SAVE_AT)
    out["scaler", "zeroadam"] = _scaler_run(
        rank, lambda m: ZeroAdam(groups(m), lr=LR, state_dtype="fp32", stage=2, bucket_size=3000)
    )
    out["scaler", "adamw"] = _scaler_run(rank, lambda m: torch.optim.AdamW(groups(m), lr=LR))
    out["refusals"] = _refusals()
    return out


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(suite, WORLD, d, timeout=240)


@pytest.fixture(scope="module")
def ref() -> tuple[list[torch.Tensor], list[float]]:
    return reference()


@pytest.mark.parametrize("kind", ["plain", "zero"])
@pytest.mark.parametrize("stage", [1, 2])
def test_trains_like_adamw_on_the_global_batch(ranks: list[dict], ref, kind: str, stage: int) -> None:
    ref_params, ref_norms = ref
    for r in ranks:
        res = r[kind, stage]
        assert rel_err(res["params"], ref_params) <= 1e-5
        # accelerator.clip_grad_norm_ returns (and clips by) the global norm of the averaged gradients.
        assert max(abs(a - b) / b for a, b in zip(res["norms"], ref_norms)) <= 1e-5
    assert max(ref_norms) > CLIP  # clipping is active
    assert rel_err(ranks[1][kind, stage]["params"], ranks[0][kind, stage]["params"]) == 0.0


@pytest.mark.parametrize("kind", ["plain", "zero"])
@pytest.mark.parametrize("stage", [1, 2])
def test_save_state_load_state_resumes_exactly(ranks: list[dict], kind: str, stage: int) -> None:
    for r in ranks:
        assert rel_err(r[kind, stage, "resumed"]["params"], r[kind, stage]["params"]) == 0.0


@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_wrapped_model_no_gradient_is_communicated_twice(ranks: list[dict], stage: int) -> None:
    for r in ranks:
        res = r["plain", stage]
        assert res["ddp"]  # Accelerate wrapped the model: DDP averaged every gradient once
        elements = res["comm"]["elements"]
        assert "reduce" not in elements and "reduce_scatter" not in elements, elements
        assert res["grads_after_backward"] == [4] * STEPS  # p.grad kept for DDP


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_accelerator_leaves_the_model_to_zeroadam(ranks: list[dict], stage: int) -> None:
    psi = sum(p.numel() for p in make_model().parameters())
    for r in ranks:
        res = r["zero", stage]
        assert not res["ddp"]
        elements = res["comm"]["elements"]
        reduced = elements.get("reduce", 0) + elements.get("reduce_scatter", 0)
        assert psi <= reduced <= psi + 4 * 256 * WORLD  # one gradient reduction per step, plus block padding
        # Stage 2 frees every p.grad during backward (ZeRO-2's gradient memory); stage 1 keeps them to step().
        assert res["grads_after_backward"] == [0 if stage == 2 else 4] * STEPS


def test_grad_scaler_skips_are_reported_to_accelerate(ranks: list[dict]) -> None:
    for r in ranks:
        ours, adamw = r["scaler", "zeroadam"], r["scaler", "adamw"]
        assert ours["skipped"] == adamw["skipped"] == [False, False, True, False, False, False]
        assert ours["scales"] == adamw["scales"]
        assert rel_err(ours["params"], adamw["params"]) <= 1e-5


def test_zero_accelerator_refuses_what_it_cannot_do(ranks: list[dict]) -> None:
    for r in ranks:
        assert "mixed_precision='fp16' is not supported" in r["refusals"]["fp16"]
        assert "trainable parameters that its sharded ZeroAdam does not optimize" in r["refusals"]["partial"]
