"""Accelerate on 2 gloo CPU processes: an ordinary loop with only the optimizer swapped for ZeroAdam (the model
DDP-wrapped), and ZeroAccelerator (no DDP, ZeroAdam averages itself; stage 3 through accelerator.shard_model), against
torch.optim.AdamW on the global batch: accumulation, clipping, GradScaler skips, save_state / load_state."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("accelerate")

from distributed import run_ranks  # noqa: E402
from helpers import make_model, max_rel_err  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 12
STEPS, MICRO, CLIP, SAVE_AT = 6, 2, 0.5, 3
LR = 1e-2
BAD_STEP = 2  # GradScaler runs: rank 0's loss is inf at this step, so every rank must skip it


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


def scaler_reference() -> tuple[list[torch.Tensor], list[float], list[float]]:
    """torch.optim.AdamW + torch.amp.GradScaler in one process on the global batch, unscaling before clipping, with
    a non-finite loss at BAD_STEP: parameters, loss scales after each step, clip norms."""
    model = make_model()
    opt = torch.optim.AdamW(groups(model), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    scales, norms = [], []
    for step, mbs in enumerate(batches()):
        for x, y in mbs:
            loss = torch.nn.functional.mse_loss(model(x), y) / MICRO
            scaler.scale(loss * float("inf") if step == BAD_STEP else loss).backward()
        scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(float(scaler.get_scale()))
    return [p.detach().clone() for p in model.parameters()], scales, norms


class Tied(torch.nn.Module):
    """Input and output embeddings tied (one parameter, two names), both in the root unit when ``body`` is a unit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(37, 24)
        self.body = torch.nn.Linear(24, 24)
        self.head = torch.nn.Linear(24, 37, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.emb(idx))))


# ---------------------------------------------------------------------------------------------- ranks
def _accelerator(kind: str, **kwargs):
    from accelerate import Accelerator

    from zeroadam.integrations.accelerate import ZeroAccelerator

    return (ZeroAccelerator if kind == "zero" else Accelerator)(gradient_accumulation_steps=MICRO, **kwargs)


def _full_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The whole parameters, in order, of a model sharded or not (collective for a sharded one)."""
    import zeroadam

    if getattr(model, "_zeroadam_sharded", None) is None:
        return [p.detach().clone() for p in model.parameters()]
    full = zeroadam.full_state_dict(model)
    return [full[n] for n, _ in model.named_parameters()]


def _train(rank: int, kind: str, stage: int, ckpt: str, start: int) -> dict:
    """The ordinary loop from step ``start`` (loading ``ckpt`` if start > 0) to STEPS, saving at SAVE_AT."""
    from zeroadam import ZeroAdam

    acc = _accelerator(kind)
    model = make_model()
    if stage == 3:
        model = acc.shard_model(model, units=[torch.nn.Linear])
    opt = ZeroAdam(groups(model), lr=LR, state_dtype="fp32", stage=stage, bucket_size=3000)
    model, opt = acc.prepare(model, opt)
    if start > 0:
        acc.load_state(ckpt)
    per = GLOBAL_BATCH // WORLD
    norms, grads_after_backward, grads_mid_accumulation = [], [], []
    for step, mbs in enumerate(batches()):
        if step < start:
            continue
        for x, y in mbs:
            with acc.accumulate(model):
                out = model(x[rank * per : (rank + 1) * per])
                acc.backward(torch.nn.functional.mse_loss(out, y[rank * per : (rank + 1) * per]))
                held = sum(p.grad is not None for p in model.parameters())
                if acc.sync_gradients:
                    grads_after_backward.append(held)
                    norms.append(float(acc.clip_grad_norm_(model.parameters(), CLIP)))
                else:
                    grads_mid_accumulation.append(held)
                opt.step()
                opt.zero_grad()
        if step + 1 == SAVE_AT and start == 0:
            acc.save_state(ckpt)
    return {
        "params": _full_params(acc.unwrap_model(model)),
        "norms": norms,
        "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
        "comm": opt.optimizer.comm_stats(),
        "mem": opt.optimizer.memory_stats(),
        "grads_after_backward": grads_after_backward,
        "grads_mid_accumulation": grads_mid_accumulation,
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


def _zero_scaler_run(rank: int, stage: int) -> dict:
    """ZeroAccelerator's loop with an fp16 GradScaler (handed over directly, as in _scaler_run), accumulation and
    clipping; rank 0's loss is inf at BAD_STEP."""
    from zeroadam import ZeroAdam

    acc = _accelerator("zero")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    model = make_model()
    if stage == 3:
        model = acc.shard_model(model, units=[torch.nn.Linear])
    opt = ZeroAdam(groups(model), lr=LR, state_dtype="fp32", stage=stage, bucket_size=3000)
    model, opt = acc.prepare(model, opt)
    mine = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    skipped, scales, norms, params = [], [], [], []
    for step, mbs in enumerate(batches()):
        for x, y in mbs:
            with acc.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
                acc.backward(loss * float("inf") if step == BAD_STEP and rank == 0 else loss)
                if acc.sync_gradients:
                    norms.append(float(acc.clip_grad_norm_(model.parameters(), CLIP)))
                opt.step()
                opt.zero_grad()
        skipped.append(acc.optimizer_step_was_skipped)
        scales.append(float(acc.scaler.get_scale()))
        params.append(_full_params(acc.unwrap_model(model)))
    return {
        "scaler": type(acc.scaler).__module__ + "." + type(acc.scaler).__name__,
        "skipped": skipped,
        "scales": scales,
        "norms": norms,
        "params": params[-1],
        "untouched": max_rel_err(params[BAD_STEP], params[BAD_STEP - 1]) == 0.0,
    }


def _stage3_tied_checkpoint(rank: int, ckpt: str) -> dict:
    """save_state with the root unit gathered (a no_grad forward keeps it), train on, load_state: the parameters and
    the next forward are the saved ones. safetensors keeps one name of the tied pair. Then the same through
    model.load_state_dict with a whole state dict (both names)."""
    import zeroadam
    from zeroadam import ZeroAdam
    from zeroadam.integrations.accelerate import ZeroAccelerator

    acc = ZeroAccelerator()
    model = acc.shard_model(Tied(), units=lambda name, m: name == "body")
    opt = ZeroAdam(model.parameters(), lr=LR, state_dtype="fp32", stage=3)
    model, opt = acc.prepare(model, opt)
    idx = torch.randint(0, 37, (4, 5), generator=torch.Generator().manual_seed(5 + rank))

    def train_step() -> None:
        acc.backward(model(idx).square().mean())
        opt.step()
        opt.zero_grad()

    train_step()
    train_step()
    with torch.no_grad():
        saved_out = model(idx)
    acc.save_state(ckpt)
    saved = _full_params(model)
    saved_sd = zeroadam.full_state_dict(model)
    train_step()
    with torch.no_grad():
        moved_out = model(idx)
    acc.load_state(ckpt)
    with torch.no_grad():
        loaded_out = model(idx)
    out = {
        "params_err": max_rel_err(_full_params(model), saved),
        "out_err": float((loaded_out - saved_out).abs().max()),
        "moved": float((moved_out - saved_out).abs().max()),
    }
    train_step()
    with torch.no_grad():
        model(idx)
    out["direct_keys"] = model.load_state_dict(saved_sd)
    with torch.no_grad():
        out["direct_out_err"] = float((model(idx) - saved_out).abs().max())
    return out


def _refusals(rank: int) -> dict:
    import torch.distributed as dist

    import zeroadam
    from zeroadam import ZeroAdam

    out = {}
    acc = _accelerator("zero")
    alone = [dist.new_group([0]), dist.new_group([1])][rank]  # new_group is collective: every rank makes both
    model = zeroadam.shard_model(make_model(), process_group=alone)
    try:
        acc.prepare(model, ZeroAdam(model.parameters(), stage=3))
        out["subgroup"] = None
    except ValueError as e:
        out["subgroup"] = str(e)
    acc = _accelerator("zero")
    model = make_model()
    opt = ZeroAdam(model[0].parameters(), stage=1)  # the last layer is trainable but not in the optimizer
    try:
        acc.prepare(model, opt)
        out["partial"] = None
    except ValueError as e:
        out["partial"] = str(e)
    return out


RUNS = [("plain", 1), ("plain", 2), ("zero", 1), ("zero", 2), ("zero", 3)]


def suite(rank: int, world: int, ckpt_dir: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "true"
    from zeroadam import ZeroAdam

    warnings.filterwarnings("ignore", category=FutureWarning)
    out: dict = {}
    for kind, stage in RUNS:
        ckpt = os.path.join(ckpt_dir, f"{kind}{stage}")
        out[kind, stage] = _train(rank, kind, stage, ckpt, 0)
        out[kind, stage, "resumed"] = _train(rank, kind, stage, ckpt, SAVE_AT)
    out["scaler", "zeroadam"] = _scaler_run(
        rank, lambda m: ZeroAdam(groups(m), lr=LR, state_dtype="fp32", stage=2, bucket_size=3000)
    )
    out["scaler", "adamw"] = _scaler_run(rank, lambda m: torch.optim.AdamW(groups(m), lr=LR))
    for stage in (1, 2, 3):
        out["zero scaler", stage] = _zero_scaler_run(rank, stage)
    out["tied"] = _stage3_tied_checkpoint(rank, os.path.join(ckpt_dir, "tied"))
    out["refusals"] = _refusals(rank)
    return out


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        return run_ranks(suite, WORLD, d, timeout=240)


@pytest.fixture(scope="module")
def ref() -> tuple[list[torch.Tensor], list[float]]:
    return reference()


@pytest.fixture(scope="module")
def scaler_ref() -> tuple[list[torch.Tensor], list[float], list[float]]:
    return scaler_reference()


@pytest.mark.parametrize(("kind", "stage"), RUNS)
def test_trains_like_adamw_on_the_global_batch(ranks: list[dict], ref, kind: str, stage: int) -> None:
    ref_params, ref_norms = ref
    for r in ranks:
        res = r[kind, stage]
        assert max_rel_err(res["params"], ref_params) <= 1e-5
        # accelerator.clip_grad_norm_ returns (and clips by) the global norm of the averaged gradients.
        assert max(abs(a - b) / b for a, b in zip(res["norms"], ref_norms)) <= 1e-5
    assert max(ref_norms) > CLIP  # clipping is active
    assert max_rel_err(ranks[1][kind, stage]["params"], ranks[0][kind, stage]["params"]) == 0.0


@pytest.mark.parametrize(("kind", "stage"), RUNS)
def test_save_state_load_state_resumes_exactly(ranks: list[dict], kind: str, stage: int) -> None:
    for r in ranks:
        assert max_rel_err(r[kind, stage, "resumed"]["params"], r[kind, stage]["params"]) == 0.0


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


def test_zero_accelerator_stage3_keeps_parameters_sharded(ranks: list[dict]) -> None:
    psi = sum(p.numel() for p in make_model().parameters())
    units = 3  # the two Linear layers and the (empty) root
    for r in ranks:
        res = r["zero", 3]
        assert not res["ddp"]
        # Every p.grad is reduce-scattered and freed in backward, on every micro-batch (ZeRO-3's gradient memory).
        assert res["grads_after_backward"] == [0] * STEPS
        assert res["grads_mid_accumulation"] == [0] * (STEPS * (MICRO - 1))
        elements = res["comm"]["elements"]
        # Per micro-batch: gathered in forward and again in backward, gradients reduce-scattered once.
        assert elements["all_gather"] >= 2 * MICRO * psi and elements["reduce_scatter"] >= MICRO * psi
        # Between steps each rank holds its shard of the parameters only (plus block padding).
        assert res["mem"]["param_bytes"] <= psi * 4 / WORLD + units * WORLD * 256 * 4 < psi * 4


def test_stage3_save_state_load_state_with_tied_weights_and_a_gathered_unit(ranks: list[dict]) -> None:
    for r in ranks:
        res = r["tied"]
        assert res["moved"] > 0  # the step after saving changed the model ...
        assert res["params_err"] == 0.0 and res["out_err"] == 0.0  # ... and load_state brought back the saved one
        assert res["direct_out_err"] == 0.0 and not res["direct_keys"].missing_keys  # so does model.load_state_dict


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_accelerator_fp16_skips_are_reported(ranks: list[dict], scaler_ref, stage: int) -> None:
    ref_params, ref_scales, ref_norms = scaler_ref
    for r in ranks:
        res = r["zero scaler", stage]
        assert res["scaler"] == "zeroadam.amp.GradScaler"
        assert res["skipped"] == [s == BAD_STEP for s in range(STEPS)]  # on every rank, from one global check
        assert res["untouched"]  # the skipped step left the parameters as they were
        assert res["scales"] == ref_scales
        assert max_rel_err(res["params"], ref_params) <= 1e-5
        # Clipping unscaled first: the norms are the true ones (inf at the skipped step).
        good = [i for i in range(STEPS) if i != BAD_STEP]
        assert max(abs(res["norms"][i] - ref_norms[i]) / ref_norms[i] for i in good) <= 1e-5
        assert not torch.isfinite(torch.tensor(res["norms"][BAD_STEP]))


def test_grad_scaler_skips_are_reported_to_accelerate(ranks: list[dict]) -> None:
    for r in ranks:
        ours, adamw = r["scaler", "zeroadam"], r["scaler", "adamw"]
        assert ours["skipped"] == adamw["skipped"] == [False, False, True, False, False, False]
        assert ours["scales"] == adamw["scales"]
        assert max_rel_err(ours["params"], adamw["params"]) <= 1e-5


def test_zero_accelerator_refuses_what_it_cannot_do(ranks: list[dict]) -> None:
    for r in ranks:
        assert "sharded over 1 of the 2 processes" in r["refusals"]["subgroup"]
        assert "trainable parameters that its sharded ZeroAdam does not optimize" in r["refusals"]["partial"]
