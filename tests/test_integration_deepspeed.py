"""DeepSpeed configs on 2 gloo CPU processes: zeroadam.integrations.deepspeed.initialize (ZeroAdam shards, stages 1-3)
and a plain deepspeed.initialize with "type": "ZeroAdam" (DeepSpeed's ZeRO shards), against torch.optim.AdamW on the
global batch; fp16 configs against ZeroAdam stage 0 + zeroadam.GradScaler on the global batch.

`make test` installs deepspeed (see the Makefile). The first DeepSpeed run on a machine JIT-compiles DeepSpeed's CPU
shared-memory communication op (30-60 s on 2 cores); later runs load it from ~/.cache/torch_extensions. No other
DeepSpeed op is built: offload_optimizer runs ZeroAdam, not DeepSpeedCPUAdam."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Optional

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed (make test installs it; see the Makefile)")

from distributed import run_ranks  # noqa: E402
from helpers import make_model, max_rel_err  # noqa: E402

WORLD, PER_RANK, ACCUM, STEPS, CLIP, LR = 2, 6, 2, 4, 0.5, 1e-2


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(PER_RANK * WORLD, 67, generator=g), torch.randn(PER_RANK * WORLD, 13, generator=g)) for _ in range(ACCUM)]


def reference() -> list[torch.Tensor]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    for s in range(STEPS):
        for x, y in micro_batches(s):
            (torch.nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def config(zero: dict, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": ACCUM,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "ZeroAdam", "params": {"lr": LR, "weight_decay": 0.1, "state_dtype": "fp32"}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        **extra,
    }


def _train(rank: int, initialize, cfg: dict, model: Optional[torch.nn.Module] = None) -> dict:
    import zeroadam

    engine, optimizer, _, _ = initialize(model=model if model is not None else make_model(), config=cfg)
    allreduces = []
    original = engine.allreduce_gradients
    engine.allreduce_gradients = lambda *a, **k: (allreduces.append(1), original(*a, **k))[1]
    for s in range(STEPS):
        for x, y in micro_batches(s):
            dtype = next(engine.module.parameters()).dtype  # a bf16 config casts the model; inputs follow
            xs, ys = (t[rank * PER_RANK : (rank + 1) * PER_RANK].to(dtype) for t in (x, y))
            engine.backward(torch.nn.functional.mse_loss(engine(xs), ys))
            engine.step()
    inner = getattr(optimizer, "optimizer", optimizer)
    sharded = getattr(engine.module, "_zeroadam_sharded", None)
    if sharded is None:
        params = [p.detach().clone() for p in engine.module.parameters()]
    else:  # stage 3: the parameters' storage is released between steps
        full = zeroadam.full_state_dict(engine.module)
        params = [full[n] for n, _ in engine.module.named_parameters()]
    return {
        "params": params,
        "sharded": None if sharded is None else {
            "flat_elements": sum(f.layout.total for u in sharded.units for f in u.flats),
            "units": len(sharded.units),
            "released": not any(f.is_materialized() for u in sharded.units for f in u.flats),
            "grads_left": sum(p.grad is not None for p in engine.module.parameters()),
        },
        "optimizer": type(optimizer).__name__,
        "inner": type(inner).__name__,
        "ds_allreduces": len(allreduces),
        "comm": optimizer.comm_stats()["elements"] if hasattr(optimizer, "comm_stats") else None,
    }


def _skip_seen_by_engine(rank: int, zds, bf16: Optional[dict] = None) -> dict:
    """fp32 state, stage 2: an inf input on rank 0 in step 1 makes every gradient non-finite; ZeroAdam skips the
    step on every rank and says so in ``optimizer.overflow``, which DeepSpeed's engine reads. ``bf16``: the config's
    bf16 section (``check_grad_overflow: false`` turns the skip off)."""
    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)

    cfg = config({"stage": 2}, **({} if bf16 is None else {"bf16": bf16}))
    engine, optimizer, _, sched = zds.initialize(model=make_model(), config=cfg, lr_scheduler=scheduler)
    dtype = next(engine.module.parameters()).dtype
    out = []
    for s in range(3):
        for i, (x, y) in enumerate(micro_batches(s)):
            xs, ys = (t[rank * PER_RANK : (rank + 1) * PER_RANK].to(dtype) for t in (x, y))
            if s == 1 and i == 0 and rank == 0:
                xs[0, 0] = float("inf")
            engine.backward(torch.nn.functional.mse_loss(engine(xs), ys))
            engine.step()
        out.append((bool(optimizer.overflow), engine.skipped_steps, sched.last_epoch, engine.was_step_applied()))
    return {"per_step": out, "finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())}


def _stage3_checkpoint(rank: int, zds, path: str) -> dict:
    """Steps 0-3 in one run, saved after step 1 with zeroadam.checkpoint; steps 2-3 again from the checkpoint."""
    import zeroadam
    from zeroadam import checkpoint

    def run(steps: range, load: bool) -> tuple[dict, Optional[str]]:
        engine, optimizer, _, _ = zds.initialize(model=make_model(), config=config({"stage": 3}))
        refused = None
        if load:
            checkpoint.load(path, engine.module, optimizer)
        else:
            try:
                engine.save_checkpoint(path + "-deepspeed")
            except RuntimeError as e:
                refused = str(e)
        for s in steps:
            for x, y in micro_batches(s):
                xs, ys = (t[rank * PER_RANK : (rank + 1) * PER_RANK] for t in (x, y))
                engine.backward(torch.nn.functional.mse_loss(engine(xs), ys))
                engine.step()
            if s == 1 and not load:
                checkpoint.save(path, engine.module, optimizer)
        return zeroadam.full_state_dict(engine.module), refused

    straight, refused = run(range(STEPS), load=False)
    resumed, _ = run(range(2, STEPS), load=True)
    return {"max_diff": max(float((straight[k] - resumed[k]).abs().max()) for k in straight), "refused": refused}


def suite(rank: int, world: int, ckpt_dir: str) -> dict:
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed

    import zeroadam
    from zeroadam.integrations import deepspeed as zds

    warnings.filterwarnings("ignore", category=FutureWarning)
    out: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out["ours", 1] = _train(rank, zds.initialize, config({"stage": 1, "overlap_comm": True}))
    out["ignored_warning"] = [str(w.message) for w in caught if "have no effect" in str(w.message)]
    out["ours", 2] = _train(rank, zds.initialize, config({"stage": 2, "reduce_bucket_size": 3000}))
    out["ours", "offload"] = _train(rank, zds.initialize, config({"stage": 2, "offload_optimizer": {"device": "cpu"}}))
    out["ours", "bf16"] = _train(rank, zds.initialize, config({"stage": 2}, bf16={"enabled": True}))
    out["ours", 3] = _train(rank, zds.initialize, config({"stage": 3}))
    out["ours", "3-checkpoint"] = _stage3_checkpoint(rank, zds, os.path.join(ckpt_dir, "stage3"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ZeroAdam's one warning about the skipped step
        out["skip"] = _skip_seen_by_engine(rank, zds)
        out["no skip"] = _skip_seen_by_engine(rank, zds, {"enabled": True, "check_grad_overflow": False})
    # Units chosen by the caller (one per Linear, an empty root), and the optimizer state offloaded.
    out["ours", "3-sharded-offload"] = _train(
        rank,
        zds.initialize,
        config({"stage": 3, "offload_optimizer": {"device": "cpu"}}),
        model=zeroadam.shard_model(make_model(), units=[torch.nn.Linear]),
    )
    out["ds", 1] = _train(rank, deepspeed.initialize, config({"stage": 1}))
    out["ds", 2] = _train(rank, deepspeed.initialize, config({"stage": 2}))
    out["ds", "offload"] = _train(rank, deepspeed.initialize, config({"stage": 2, "offload_optimizer": {"device": "cpu"}}))
    errors = {}
    for name, cfg in {
        "fp16_and_bf16": config({"stage": 2}, fp16={"enabled": True}, bf16={"enabled": True}),
        "nvme": config({"stage": 2, "offload_optimizer": {"device": "nvme"}}),
        "adam_l2": {**config({"stage": 1}), "optimizer": {"type": "Adam", "params": {"lr": LR, "adam_w_mode": False}}},
        "offload_param": config({"stage": 3, "offload_param": {"device": "cpu"}}),
    }.items():
        try:
            zds.translate(cfg)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    for name, cfg in {
        "sharded_stage2": config({"stage": 2}),
        "sharded_fp32_bf16": config({"stage": 3}, bf16={"enabled": True}),
    }.items():
        try:
            zds.initialize(model=zeroadam.shard_model(make_model()), config=cfg)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(suite, WORLD, str(tmp_path_factory.mktemp("ckpt")), timeout=600)


@pytest.mark.parametrize("variant", [1, 2, "offload"])
def test_zeroadam_initialize_trains_like_adamw(ranks: list[dict], variant) -> None:
    ref = reference()
    for r in ranks:
        res = r["ours", variant]
        assert max_rel_err(res["params"], ref) <= 1e-5
        assert res["optimizer"] == "ZeroAdam"
        assert res["ds_allreduces"] == 0  # ZeroAdam averages; DeepSpeed's all-reduce is off
        reduced = res["comm"].get("reduce", 0) + res["comm"].get("reduce_scatter", 0)
        assert reduced > 0


@pytest.mark.parametrize("variant", [3, "3-sharded-offload"])
def test_zeroadam_initialize_stage3_trains_like_adamw(ranks: list[dict], variant) -> None:
    ref = reference()
    for r in ranks:
        res = r["ours", variant]
        assert max_rel_err(res["params"], ref) <= 1e-5
        assert res["optimizer"] == "ZeroAdam"
        assert res["ds_allreduces"] == 0
        sharded = res["sharded"]
        assert sharded["units"] == (1 if variant == 3 else 3)  # the root alone, or 2 Linear units and the root
        assert sharded["released"] and sharded["grads_left"] == 0
        # Each micro-batch reduce-scatters every unit once into the gradient shards (as DeepSpeed's ZeRO-3).
        assert res["comm"]["reduce_scatter"] == ACCUM * sharded["flat_elements"]


def test_stage3_checkpoints_go_through_zeroadam_checkpoint(ranks: list[dict]) -> None:
    for r in ranks:
        res = r["ours", "3-checkpoint"]
        assert res["max_diff"] == 0.0  # resuming from the checkpoint retraces the uninterrupted run exactly
        assert "zeroadam.checkpoint.save(path, engine.module, optimizer)" in res["refused"]


def test_a_step_zeroadam_skips_is_seen_by_the_engine(ranks: list[dict]) -> None:
    # (overflow, engine.skipped_steps, scheduler steps, step applied) after each step: the bad step 1 is skipped on
    # both ranks, the engine counts it and holds the scheduler, and training goes on with finite parameters.
    for r in ranks:
        assert r["skip"]["per_step"] == [(False, 0, 1, True), (True, 1, 1, False), (False, 1, 2, True)]
        assert r["skip"]["finite"]


def test_check_grad_overflow_false_updates_through_the_bad_step(ranks: list[dict]) -> None:
    # As DeepSpeed's own bf16 optimizer with check_grad_overflow: false: no step skipped, the NaN reaches the weights.
    for r in ranks:
        assert r["no skip"]["per_step"] == [(False, 0, 1, True), (False, 0, 2, True), (False, 0, 3, True)]
        assert not r["no skip"]["finite"]


def test_bf16_casts_the_model_and_zeroadam_keeps_master_weights(ranks: list[dict]) -> None:
    ref = reference()
    for r in ranks:
        res = r["ours", "bf16"]
        assert all(p.dtype == torch.bfloat16 for p in res["params"])
        # bf16 forward and backward, fp32-accurate update (compact master weights): close to fp32 AdamW.
        assert max_rel_err([p.float() for p in res["params"]], ref) <= 2e-2


@pytest.mark.parametrize("variant", [1, 2, "offload"])
def test_plain_deepspeed_with_zeroadam_type_trains_like_adamw(ranks: list[dict], variant) -> None:
    ref = reference()
    for r in ranks:
        res = r["ds", variant]
        assert max_rel_err(res["params"], ref) <= 1e-5
        assert res["inner"] == "DeepSpeedZeroAdam"  # inside DeepSpeed's ZeRO optimizer


def test_keys_that_cannot_be_honoured_are_named(ranks: list[dict]) -> None:
    for r in ranks:
        assert "zero_optimization.overlap_comm" in r["ignored_warning"][0]
        assert "fp16.enabled=True and bf16.enabled=True" in r["errors"]["fp16_and_bf16"]
        assert "zero_optimization.offload_optimizer.device='nvme'" in r["errors"]["nvme"]
        assert "optimizer.params.adam_w_mode=False" in r["errors"]["adam_l2"]
        assert "zero_optimization.offload_param" in r["errors"]["offload_param"]
        assert "zero_optimization.stage=2" in r["errors"]["sharded_stage2"]
        assert "bf16.enabled=True" in r["errors"]["sharded_fp32_bf16"]


# ---------------------------------------------------------------------------------------------- fp16
# Scale 2**10: far from overflow for this model (gradients x 2**10 stay well under fp16's 65504), so the only
# skipped step is the forced one. hysteresis 1: that overflow halves the scale at once (DeepSpeed's default 2 would
# hold it for one more overflow, see test_fp16_loss_scale_follows_deepspeeds_policy).
POWER = 10
INF_AT = 1  # the step whose first micro-batch gets an inf in rank 1's gradient
# [Note: fp16 data parallelism is not bit for bit]
# With a different half of the batch on each rank, the averaged gradient is not the reference's: each rank's fp16
# backward rounds its own partial sum, and the fp32 average of two roundings is not the one rounding of the
# full-batch backward. Mostly that is a fraction of an fp16 ulp, but where the halves cancel it is everything: one
# element of the first bias gets +-2.939 (fp16 ulp 0.002) on the two ranks, which average to exactly 0, against
# -3.7e-4 in the full-batch gradient; Adam's first step, about lr * sign(g), then moves it by 0.0096 in the reference
# and only by the weight decay here. So the math is checked bit for bit with the same half on both ranks (the
# average of two equal tensors is exact), and the run on distinct halves by the mean deviation, which such an
# element barely moves: 7e-5 of the mean |parameter| measured (a rank updating with its own half's gradient alone,
# unaveraged, deviates by 0.14).
SAME_BATCH = slice(0, PER_RANK)


def fp16_config(stage: int = 2, **fp16: Any) -> dict:
    return config({"stage": stage}, fp16={"enabled": True, "initial_scale_power": POWER, "hysteresis": 1, **fp16})


def decay(step: int) -> float:
    return 1.0 / (1.0 + step)  # an lr that changes every step: a scheduler step taken on a skipped step shows


def with_inf(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[0, 0] = math.inf
    return grad


def reference_fp16(rows: slice = slice(None), inf_at: Optional[int] = None) -> dict:
    """ZeroAdam stage 0 + zeroadam.GradScaler on the global batch (``rows`` of each micro-batch), with the fp16
    model and the same hyperparameters; the scheduler steps when the optimizer did, as DeepSpeed's engine does."""
    import zeroadam

    model = make_model().half()
    opt = zeroadam.ZeroAdam(model.parameters(), lr=LR, weight_decay=0.1, state_dtype="fp32", max_grad_norm=CLIP)
    scaler = zeroadam.GradScaler("cpu", init_scale=2.0**POWER)  # backoff 0.5; no growth within STEPS steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ZeroAdam's "step skipped"
        for s in range(STEPS):
            for i, (x, y) in enumerate(micro_batches(s)):
                hook = model[0].weight.register_hook(with_inf) if (s, i) == (inf_at, 0) else None
                loss = torch.nn.functional.mse_loss(model(x[rows].half()), y[rows].half())
                scaler.scale(loss / ACCUM).backward()
                if hook is not None:
                    hook.remove()
            skipped = opt.skipped_steps
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if opt.skipped_steps == skipped:
                scheduler.step()
    params = [p.detach().clone() for p in model.parameters()]
    return {"params": params, "scale": scaler.get_scale(), "skipped": opt.skipped_steps}


def _tensors(x: Any) -> list:
    """Every tensor and number in a (nested) state dict, in a fixed order."""
    if isinstance(x, dict):
        return [v for k in sorted(x, key=str) for v in _tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _tensors(item)]
    return [x.clone() if isinstance(x, torch.Tensor) else x]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def _train_fp16(rank: int, zds, cfg: dict, same_batch: bool, inf_at: Optional[int] = None) -> dict:
    import zeroadam

    auto_cast = cfg["fp16"].get("auto_cast", False)
    engine, optimizer, _, scheduler = zds.initialize(
        model=make_model(), config=cfg, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, decay)
    )
    rows = SAME_BATCH if same_batch else slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    out: dict = {"trace": [], "dtypes": {p.dtype for p in engine.module.parameters()}}
    for s in range(STEPS):
        if s == inf_at:  # collective (state_dict gathers at stage >= 1): every rank takes it
            before = [p.detach().clone() for p in engine.module.parameters()] + _tensors(optimizer.state_dict())
        for i, (x, y) in enumerate(micro_batches(s)):
            hook = engine.module[0].weight.register_hook(with_inf) if (s, i, rank) == (inf_at, 0, 1) else None
            # auto_cast casts the forward's inputs (fp32 here); the targets are ours to cast.
            loss = torch.nn.functional.mse_loss(engine(x[rows] if auto_cast else x[rows].half()), y[rows].half())
            engine.backward(loss)
            engine.step()
            if hook is not None:
                hook.remove()
        if s == inf_at:
            after = [p.detach().clone() for p in engine.module.parameters()] + _tensors(optimizer.state_dict())
            out["unchanged"] = _same(before, after)
        out["trace"].append({
            "scale": optimizer.scaler.get_scale(),
            "overflow": optimizer.overflow,
            "applied": engine.was_step_applied(),
            "engine_skipped": engine.skipped_steps,
            "skipped": optimizer.skipped_steps,
            "scheduler_steps": scheduler.last_epoch,
        })
    sharded = getattr(engine.module, "_zeroadam_sharded", None)
    if sharded is None:
        out["params"] = [p.detach().clone() for p in engine.module.parameters()]
    else:
        full = zeroadam.full_state_dict(engine.module)
        out["params"] = [full[n] for n, _ in engine.module.named_parameters()]
    out["scaler_in_engine"] = engine.torch_autocast_z0_gradscaler is optimizer.scaler
    try:  # a backward that bypasses the engine's loss scaling
        torch.nn.functional.mse_loss(engine(x[rows].half()), y[rows].half()).backward()
    except RuntimeError as e:
        out["unscaled_backward"] = str(e)
    return out


def _loss_scale_policy(zds) -> dict:
    """DeepSpeedGradScaler alone on a stage-0 ZeroAdam: the scale after each step of a run of overflows (True) and
    clean steps, with DeepSpeed's default hysteresis 2, min_loss_scale 4 and window 2."""
    import zeroadam

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).half()
    opt = zeroadam.ZeroAdam(model.parameters(), lr=1e-3)
    policy = zds.Fp16Config(initial_scale_power=4, loss_scale_window=2, min_loss_scale=4)
    scaler = zds.DeepSpeedGradScaler(policy, device="cpu")
    scales, raised = [], None
    for overflow in (True, False, True, True, True, False, False, False, True):
        loss = model(torch.randn(4, 5).half()).float().pow(2).mean() * (math.inf if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        try:
            scaler.update()
        except Exception as e:  # DeepSpeed's own: an overflow at min_loss_scale
            raised = str(e)
        opt.zero_grad()
        scales.append(scaler.get_scale())
    state = scaler.state_dict()
    again = zds.DeepSpeedGradScaler(zds.Fp16Config(), device="cpu")
    again.load_state_dict(state)
    static = zds.DeepSpeedGradScaler(zds.Fp16Config(loss_scale=128), device="cpu")
    static.scale(model(torch.randn(4, 5).half()).float().sum() * math.inf).backward()
    skipped = opt.skipped_steps
    static.step(opt)
    static.update()
    return {
        "scales": scales,
        "raised": raised,
        "skipped": skipped,
        "restored": again.state_dict() == state,
        "static": (static.get_scale(), opt.skipped_steps - skipped),
    }


def fp16_suite(rank: int, world: int) -> dict:
    os.environ["LOCAL_RANK"] = str(rank)
    from zeroadam.integrations import deepspeed as zds

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="ZeroAdam: non-finite")
    out = {("same", stage): _train_fp16(rank, zds, fp16_config(stage), same_batch=True) for stage in (1, 2, 3)}
    out["distinct", 2] = _train_fp16(rank, zds, fp16_config(2), same_batch=False)
    out["inf"] = _train_fp16(rank, zds, fp16_config(auto_cast=True), same_batch=True, inf_at=INF_AT)
    out["policy"] = _loss_scale_policy(zds)
    return out


@pytest.fixture(scope="module")
def fp16_ranks() -> list[dict]:
    return run_ranks(fp16_suite, WORLD, timeout=300)


def _check_fp16_run(res: dict) -> None:
    assert res["dtypes"] == {torch.float16}
    assert res["scaler_in_engine"]
    assert "engine.backward(loss)" in res["unscaled_backward"]  # a loss.backward() without the scale is refused


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_trains_like_zeroadam_with_gradscaler(fp16_ranks: list[dict], stage: int) -> None:
    """The same half-batch on both ranks (see [Note: fp16 data parallelism is not bit for bit])."""
    ref = reference_fp16(SAME_BATCH)
    for r in fp16_ranks:
        res = r["same", stage]
        _check_fp16_run(res)
        assert all(t["scale"] == 2.0**POWER and not t["overflow"] and t["applied"] for t in res["trace"])
        assert [t["scheduler_steps"] for t in res["trace"]] == list(range(1, STEPS + 1))
        if stage < 3:
            assert all(torch.equal(p, q) for p, q in zip(res["params"], ref["params"]))
        else:
            # Stage 3 reduce-scatters each micro-batch and sums them in the fp32 shards; the reference sums them
            # in fp16 p.grad. The first step (about lr * sign(g)) is still exact; 8e-5 after 4 steps.
            assert max_rel_err([p.float() for p in res["params"]], [p.float() for p in ref["params"]]) <= 2.0**-12


def test_fp16_distinct_batches_track_the_global_batch(fp16_ranks: list[dict]) -> None:
    ref = torch.cat([p.float().reshape(-1) for p in reference_fp16()["params"]])
    for r in fp16_ranks:
        res = r["distinct", 2]
        _check_fp16_run(res)
        ours = torch.cat([p.float().reshape(-1) for p in res["params"]])
        # [Note: fp16 data parallelism is not bit for bit]: a quarter of an fp16 ulp on average.
        assert float((ours - ref).abs().mean() / ref.abs().mean()) <= 2.0**-12
    first, second = (r["distinct", 2]["params"] for r in fp16_ranks)
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # every rank holds the same parameters


def test_fp16_inf_on_one_rank_skips_the_step_everywhere(fp16_ranks: list[dict]) -> None:
    ref = reference_fp16(SAME_BATCH, inf_at=INF_AT)
    assert ref["skipped"] == 1 and ref["scale"] == 2.0 ** (POWER - 1)
    for r in fp16_ranks:
        res = r["inf"]
        _check_fp16_run(res)
        assert res["unchanged"]  # parameters and optimizer state, bit for bit, on both ranks
        trace = res["trace"]
        assert [t["overflow"] for t in trace] == [s == INF_AT for s in range(STEPS)]
        assert [t["applied"] for t in trace] == [s != INF_AT for s in range(STEPS)]
        assert [t["skipped"] for t in trace] == [int(s >= INF_AT) for s in range(STEPS)]
        assert [t["engine_skipped"] for t in trace] == [int(s >= INF_AT) for s in range(STEPS)]
        assert [t["scale"] for t in trace] == [2.0 ** (POWER - (s >= INF_AT)) for s in range(STEPS)]
        # DeepSpeed's engine does not step the lr scheduler on a skipped step.
        assert [t["scheduler_steps"] for t in trace] == [s + 1 - (s >= INF_AT) for s in range(STEPS)]
        # Training went on (auto_cast fed it fp32 inputs), bit for bit as the reference that skipped the same step.
        assert all(torch.equal(p, q) for p, q in zip(res["params"], ref["params"]))


def test_fp16_loss_scale_follows_deepspeeds_policy(fp16_ranks: list[dict]) -> None:
    for r in fp16_ranks:
        res = r["policy"]
        # hysteresis 2 absorbs the first overflow (16); a clean step (16) does not refill it; then 8, the floor 4,
        # and an overflow at the floor raises, as in DeepSpeed (the scale stays 4). The third clean step doubles
        # it: loss_scale_window steps after the one that follows the last overflow, as DeepSpeed's
        # DynamicLossScaler counts. The growth refills the hysteresis: the last overflow keeps 8.
        assert res["scales"] == [16.0, 16.0, 8.0, 4.0, 4.0, 4.0, 4.0, 8.0, 8.0]
        assert "minimum" in res["raised"]
        assert res["skipped"] == 5
        assert res["restored"]
        assert res["static"] == (128.0, 1)  # a static scale: the step is skipped, the scale kept


def test_fp16_keys_that_cannot_be_honoured_are_named() -> None:
    from zeroadam.integrations import deepspeed as zds

    t = zds.translate(fp16_config(loss_scale_window=7, min_loss_scale=2, consecutive_hysteresis=True))
    assert t.dtype == torch.float16 and "fp16" not in t.deepspeed and "bf16" not in t.deepspeed
    assert t.fp16 == zds.Fp16Config(
        initial_scale_power=POWER, hysteresis=1, loss_scale_window=7, min_loss_scale=2, consecutive_hysteresis=True
    )
    for section, named in [
        ({"fp16_master_weights_and_grads": True}, "fp16.fp16_master_weights_and_grads=True"),
        ({"hysteresis": 0}, "fp16.hysteresis=0"),
        ({"loss_scale": -1}, "fp16.loss_scale=-1"),
        ({"min_loss_scale": 0}, "fp16.min_loss_scale=0"),
        ({"loss_scale_window": 0}, "fp16.loss_scale_window=0"),
        ({"initial_scale_power": 2.5}, "fp16.initial_scale_power=2.5"),
        ({"auto_cast": "yes"}, "fp16.auto_cast='yes'"),
        ({"loss_scale": "dynamic"}, "fp16.loss_scale='dynamic'"),
        ({"fp16_opt_level": "O2"}, "fp16.fp16_opt_level='O2'"),
    ]:
        with pytest.raises(ValueError) as e:
            zds.translate(fp16_config(**section))
        assert named in str(e.value)



# ---------------------------------------------------------------------------------------------- engine checkpoints
SAVE_AT = 2  # steps before the checkpoint


def _resume(rank: int, zds, path: str, cfg: dict, half: bool) -> dict:
    """Train STEPS steps saving the engine's checkpoint after SAVE_AT; then a fresh engine loads it and trains the
    remaining steps. Step 0 overflows on rank 1 in fp16, so the saved loss scale is not the initial one."""
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    def train(engine, steps: range) -> None:
        for s in steps:
            for i, (x, y) in enumerate(micro_batches(s)):
                hook = None
                if half and (s, i, rank) == (0, 0, 1):
                    hook = engine.module[0].weight.register_hook(with_inf)
                xs, ys = (x[rows].half(), y[rows].half()) if half else (x[rows], y[rows])
                engine.backward(torch.nn.functional.mse_loss(engine(xs), ys))
                engine.step()
                if hook is not None:
                    hook.remove()

    out = {}
    for run in ("whole", "resumed"):
        engine, optimizer, _, _ = zds.initialize(model=make_model(), config=cfg)
        if run == "whole":
            train(engine, range(SAVE_AT))
            engine.save_checkpoint(path, tag="t")
            train(engine, range(SAVE_AT, STEPS))
        else:
            engine.load_checkpoint(path, tag="t")
            train(engine, range(SAVE_AT, STEPS))
        out[run] = {
            "params": [p.detach().clone() for p in engine.module.parameters()],
            "scale": optimizer.scaler.get_scale() if half else None,
            "skipped": optimizer.skipped_steps,
        }
    return out


def resume_suite(rank: int, world: int, ckpt_dir: str) -> dict:
    os.environ["LOCAL_RANK"] = str(rank)
    from zeroadam.integrations import deepspeed as zds

    warnings.filterwarnings("ignore")
    return {
        "fp32": _resume(rank, zds, os.path.join(ckpt_dir, "fp32"), config({"stage": 2}), half=False),
        "fp16": _resume(rank, zds, os.path.join(ckpt_dir, "fp16"), fp16_config(stage=2), half=True),
    }


@pytest.fixture(scope="module")
def resume_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(resume_suite, WORLD, str(tmp_path_factory.mktemp("resume")), timeout=300)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_checkpoints_resume_exactly(resume_ranks: list[dict], precision: str) -> None:
    # DeepSpeed's save_checkpoint calls ZeroAdam's state_dict on every rank (rank 0 gathers the whole state) and
    # writes rank 0's; load_checkpoint gives every rank that file, and each keeps its shard. fp16: the loss scaler
    # travels in client_state, so the resumed run keeps the scale the overflow at step 0 halved.
    for r in resume_ranks:
        whole, resumed = r[precision]["whole"], r[precision]["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(resumed["params"], whole["params"]))
        if precision == "fp16":
            assert whole["skipped"] == 1 and resumed["scale"] == whole["scale"] == 2.0 ** (POWER - 1)


# ---------------------------------------------------------------------------------------------- configs as people write them
def _zds():
    from zeroadam.integrations import deepspeed as zds

    return zds


def _refusal(cfg: dict, model: Optional[torch.nn.Module] = None) -> str:
    with pytest.raises(ValueError) as e:
        _zds().translate(cfg, model)
    return str(e.value)


def _non_default(annotation: Any, default: Any) -> Any:
    """A value of the field's type other than its default: what makes a refused key refuse."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return default + 1
    return {"enabled": True}  # Optional[section] (zenflow, offload_param, ...)


def test_every_field_of_deepspeeds_schema_is_classified() -> None:
    """Walks the installed DeepSpeed's pydantic models, names and aliases: a field a new release adds fails here."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig, DeepSpeedZeroOffloadParamConfig

    from zeroadam.integrations import deepspeed_keys as keys

    zds = _zds()

    def spellings(model: Any) -> dict[str, Any]:
        out = {}
        for name, f in model.model_fields.items():
            out[name] = f
            if f.alias:
                out[f.alias] = f
        return out

    for model, table in (
        (DeepSpeedZeroConfig, keys.ZERO),
        (DeepSpeedZeroOffloadOptimizerConfig, keys.OFFLOAD_OPTIMIZER),
        (DeepSpeedZeroOffloadParamConfig, keys.OFFLOAD_PARAM),
        (DeepSpeedBF16Config, keys.BF16),
    ):
        missing = set(spellings(model)) - set(table)
        assert not missing, f"{model.__name__} fields missing from integrations/deepspeed_keys.py: {sorted(missing)}"
    fp16_known = {f.name for f in dataclasses.fields(zds.Fp16Config)} | {"enabled", "fp16_master_weights_and_grads"}
    assert set(spellings(DeepSpeedFP16Config)) <= fp16_known

    # Each zero_optimization key does what its row says, with a value DeepSpeed would take.
    for key, f in spellings(DeepSpeedZeroConfig).items():
        entry = keys.ZERO[key]
        if entry.kind == "tuning":
            value = f.default if f.default is not None and not callable(f.default_factory) else True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = zds.translate({"zero_optimization": {"stage": 2, key: value}})
            assert f"zero_optimization.{key}" in t.ignored, key
        elif entry.kind == "refused":
            message = _refusal({"zero_optimization": {"stage": 3, key: _non_default(f.annotation, f.default)}})
            assert f"zero_optimization.{key}=" in message and entry.why in message
    for key, entry in keys.BF16.items():
        if entry.kind == "refused":
            default = DeepSpeedBF16Config.model_fields[key].default
            assert f"bf16.{key}=" in _refusal({"bf16": {"enabled": True, key: not default}})


def test_memory_efficient_linear_and_other_tuning_keys_are_one_warning() -> None:
    t = _zds().translate({"zero_optimization": {"stage": 2, "memory_efficient_linear": False, "overlap_comm": True}})
    assert t.ignored == ["zero_optimization.memory_efficient_linear", "zero_optimization.overlap_comm"]


def test_check_grad_overflow_is_the_non_finite_skip() -> None:
    translate = _zds().translate
    assert translate({"bf16": {"enabled": True, "check_grad_overflow": False}}).zeroadam["skip_nonfinite"] is False
    assert translate({"bf16": {"enabled": True, "check_grad_overflow": True}}).zeroadam["skip_nonfinite"] is True
    assert "skip_nonfinite" not in translate({"bf16": {"enabled": True}}).zeroadam  # ZeroAdam's default: skip
    assert translate({"optimizer": {"type": "ZeroAdam", "params": {"skip_nonfinite": False}}}).zeroadam["skip_nonfinite"] is False
    assert "bf16.check_grad_overflow='no'" in _refusal({"bf16": {"enabled": True, "check_grad_overflow": "no"}})


def test_keys_that_change_results_are_refused_by_name() -> None:
    assert "bf16.bf16_master_weights_and_grads=True" in _refusal({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}})
    assert "optimizer.params.state_dtype" in _refusal({"bf16": {"enabled": True, "bf16_optimizer_states": True}})
    assert "communication_data_type='fp16'" in _refusal({"zero_optimization": {"stage": 2}, "communication_data_type": "fp16"})
    assert "zero_quantized_nontrainable_weights=True" in _refusal(
        {"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}}
    )
    # Parameter offload needs the optimizer offloaded too (tests/test_param_offload.py trains it).
    assert "offload_optimizer" in _refusal({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    # Tuning of DeepSpeed's all-reduce, which does not run at stages 1-3; at stage 0 DeepSpeed's all-reduce gets them.
    zds = _zds()
    t = zds.translate({"zero_optimization": {"stage": 2}, "prescale_gradients": True, "gradient_predivide_factor": 2.0,
                       "communication_data_type": "fp32"})
    assert t.ignored == ["prescale_gradients", "gradient_predivide_factor"]
    assert not {"prescale_gradients", "gradient_predivide_factor", "communication_data_type"} & set(t.deepspeed)
    t = zds.translate({"prescale_gradients": True, "communication_data_type": "bf16"})
    assert t.ignored == [] and t.deepspeed["communication_data_type"] == "bf16" and t.deepspeed["prescale_gradients"]


def test_legacy_cpu_offload_is_offload_optimizer() -> None:
    zds = _zds()
    for value, offload in ((True, "cpu"), (False, None)):
        with pytest.warns(FutureWarning, match="cpu_offload is deprecated use offload_optimizer"):
            t = zds.translate({"zero_optimization": {"stage": 2, "cpu_offload": value}})
        assert t.zeroadam.get("offload") == offload


def test_deepspeeds_optimizer_types_keep_their_defaults() -> None:
    zds = _zds()
    for kind in ("Adam", "AdamW"):  # FusedAdam / DeepSpeedCPUAdam: weight_decay 0.0
        assert zds.translate({"optimizer": {"type": kind, "params": {"lr": 1.5e-4}}}).zeroadam["weight_decay"] == 0.0
    # torch_adam: torch.optim.AdamW, whose default is 0.01.
    assert zds.translate({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}).zeroadam["weight_decay"] == 0.01
    # "ZeroAdam" builds ZeroAdam: its own default, on both paths.
    assert "weight_decay" not in zds.translate({"optimizer": {"type": "ZeroAdam", "params": {"lr": 1e-3}}}).zeroadam
    assert "optimizer.params.betas='a'" not in _refusal({"optimizer": {"type": "AdamW", "params": {"betas": "ab"}}})


class _HFModel(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.config = type("Config", (), {"hidden_size": hidden})()
        self.linear = torch.nn.Linear(hidden, hidden)


def hf_config(stage: int) -> dict:
    """The shape of transformers' tests/deepspeed/ds_config_zero2.json / ds_config_zero3.json."""
    zero: dict = {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                  "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True)
    else:
        zero.update(sub_group_size=1e9, stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 2000,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_auto_values_are_resolved_or_refused_by_name(stage: int) -> None:
    zds = _zds()
    cfg = hf_config(stage)
    # The raw file: what needs the Trainer's arguments is refused, one key at a time, naming it.
    for key, set_to in [
        ("optimizer.params.lr", 3e-4),
        ("train_micro_batch_size_per_gpu and train_batch_size", 4),
        ("scheduler.params.warmup_num_steps", 10),
    ]:
        assert f"{key}='auto' cannot be resolved" in _refusal(cfg, _HFModel(64))
        if key.startswith("optimizer"):
            cfg["optimizer"]["params"]["lr"] = set_to
        elif key.startswith("scheduler"):
            cfg["scheduler"]["params"]["warmup_num_steps"] = set_to
        else:
            cfg["train_micro_batch_size_per_gpu"] = set_to
    t = zds.translate(cfg, _HFModel(64))
    assert t.zeroadam == {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "stage": stage,
                          "offload": "cpu", "max_grad_norm": 1.0, **({"bucket_size": 64 * 64} if stage == 2 else {})}
    assert t.dtype is None and t.fp16 is None  # fp16 / bf16 "auto": off, as the Trainer without --fp16 / --bf16
    assert t.deepspeed["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 10}
    assert t.deepspeed["train_micro_batch_size_per_gpu"] == 4
    assert "train_batch_size" not in t.deepspeed and "gradient_accumulation_steps" not in t.deepspeed
    assert not any(v == "auto" for v in t.deepspeed.values())
    assert "optimizer.params.betas: 'auto' -> (0.9, 0.999)" in t.resolved
    assert "bf16.enabled: 'auto' -> False" in t.resolved
    if stage == 3:
        assert t.gather_16bit_on_save
        assert "zero_optimization.stage3_prefetch_bucket_size" in t.ignored
    # No model.config: the bucket size is ZeroAdam's own.
    assert "bucket_size" not in zds.translate(cfg).zeroadam
    cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 10}}
    assert "scheduler.params.total_num_steps='auto' cannot be resolved" in _refusal(cfg)


@pytest.mark.skipif(
    "not __import__('deepspeed').accelerator.get_accelerator().device_name() == 'cpu' "
    "or torch.float16 in __import__('deepspeed').accelerator.get_accelerator().supported_dtypes()",
    reason="a device where DeepSpeed supports fp16",
)
def test_fp16_at_stage0_on_a_device_deepspeed_refuses_it_is_named() -> None:
    cfg = config({"stage": 0}, fp16={"enabled": True})
    with pytest.raises(ValueError) as e:
        _zds().initialize(model=make_model(), config=cfg)
    assert "Type fp16 is not supported on your device" in str(e.value) and "bf16" in str(e.value)


# ---------------------------------------------------------------------------------------------- runs of those configs
def _users_zeroadam_inside_deepspeed_zero(rank: int, stage: int) -> dict:
    import deepspeed

    import zeroadam

    cfg = config({"stage": stage})
    del cfg["optimizer"]

    def init(model: torch.nn.Module, config: dict) -> Any:
        opt = zeroadam.ZeroAdam(model.parameters(), lr=LR, weight_decay=0.1, state_dtype="fp32")
        return deepspeed.initialize(model=model, optimizer=opt, config=config)

    return _train(rank, init, cfg)


def _sharded_zeroadam_refused(rank: int) -> str:
    import deepspeed

    import zeroadam

    model = make_model()
    opt = zeroadam.ZeroAdam(model.parameters(), lr=LR, stage=2)
    with pytest.raises(ValueError) as e:
        cfg = config({"stage": 2})
        del cfg["optimizer"]
        deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return str(e.value)


def _save_16bit(rank: int, zds, path: str) -> dict:
    import zeroadam

    engine, _, _, _ = zds.initialize(
        model=make_model(),
        config=config({"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}, bf16={"enabled": True}),
    )
    for x, y in micro_batches(0):
        xs, ys = (t[rank * PER_RANK : (rank + 1) * PER_RANK].bfloat16() for t in (x, y))
        engine.backward(torch.nn.functional.mse_loss(engine(xs), ys))
        engine.step()
    saved = engine.save_16bit_model(path)
    full = zeroadam.full_state_dict(engine.module)
    loaded = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    off, _, _, _ = zds.initialize(model=make_model(), config=config({"stage": 3}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        not_saved = off.save_16bit_model(path, "other.bin")
    return {
        "saved": saved,
        "same": list(loaded) == list(full) and all(torch.equal(loaded[k], full[k]) for k in full),
        "dtypes": {str(t.dtype) for t in loaded.values()},
        "not_saved": (not_saved, os.path.exists(os.path.join(path, "other.bin")), [str(w.message) for w in caught]),
    }


def _scheduled_resume(rank: int, zds, path: str, scheduler: dict, fp16: bool) -> dict:
    """Stage 3 with a DeepSpeed scheduler: STEPS steps with zds.save_checkpoint after SAVE_AT, then a fresh engine
    loads it and trains the rest. fp16: rank 1 overflows at step 0, so the saved scale is not the initial one."""
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    cfg = fp16_config(stage=3) if fp16 else config({"stage": 3})
    cfg["scheduler"] = scheduler

    def train(engine: Any, steps: range) -> list[tuple[float, float, int]]:
        trace = []
        for s in steps:
            for i, (x, y) in enumerate(micro_batches(s)):
                hook = None
                if fp16 and (s, i, rank) == (0, 0, 1):
                    hook = engine.module[0].weight.register_hook(with_inf)
                xs, ys = (x[rows].half(), y[rows].half()) if fp16 else (x[rows], y[rows])
                loss = torch.nn.functional.mse_loss(engine(xs), ys)
                engine.backward(loss)
                engine.step()
                if hook is not None:
                    hook.remove()
            trace.append((float(loss), engine.get_lr()[0], engine.global_steps))
        return trace

    whole, _, _, _ = zds.initialize(model=make_model(), config=cfg)
    first = train(whole, range(SAVE_AT))
    zds.save_checkpoint(whole, path)
    rest = train(whole, range(SAVE_AT, STEPS))
    resumed, optimizer, _, _ = zds.initialize(model=make_model(), config=cfg)
    zds.load_checkpoint(resumed, path)
    again = train(resumed, range(SAVE_AT, STEPS))
    return {
        "first": first,
        "rest": rest,
        "again": again,
        "scale": (whole.optimizer.scaler.get_scale(), optimizer.scaler.get_scale()) if fp16 else None,
    }


def configs_suite(rank: int, world: int, ckpt_dir: str) -> dict:
    os.environ["LOCAL_RANK"] = str(rank)
    from zeroadam.integrations import deepspeed as zds

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="ZeroAdam: non-finite")
    warmup = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": LR, "warmup_num_steps": 3}}
    decay_lr = {"type": "WarmupDecayLR",
                "params": {"warmup_min_lr": 0, "warmup_max_lr": LR, "warmup_num_steps": 2, "total_num_steps": STEPS}}
    out: dict = {("users", s): _users_zeroadam_inside_deepspeed_zero(rank, s) for s in (1, 2)}
    out["users_sharded"] = _sharded_zeroadam_refused(rank)
    out["16bit"] = _save_16bit(rank, zds, os.path.join(ckpt_dir, "16bit"))
    out["resume", "WarmupLR"] = _scheduled_resume(rank, zds, os.path.join(ckpt_dir, "warmup"), warmup, fp16=False)
    out["resume", "WarmupDecayLR"] = _scheduled_resume(rank, zds, os.path.join(ckpt_dir, "decay"), decay_lr, fp16=True)
    return out


@pytest.fixture(scope="module")
def configs_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(configs_suite, WORLD, str(tmp_path_factory.mktemp("configs")), timeout=600)


@pytest.mark.parametrize("stage", [1, 2])
def test_users_zeroadam_inside_deepspeeds_zero_trains_like_adamw(configs_ranks: list[dict], stage: int) -> None:
    ref = reference()
    for r in configs_ranks:
        res = r["users", stage]
        assert res["inner"] == "ZeroAdam"  # the user's, inside DeepSpeed's ZeRO optimizer, no untested-optimizer flag
        assert max_rel_err(res["params"], ref) <= 1e-5


def test_users_sharded_zeroadam_inside_deepspeeds_zero_is_refused(configs_ranks: list[dict]) -> None:
    for r in configs_ranks:
        assert "ZeroAdam(stage=2) inside DeepSpeed's zero_optimization" in r["users_sharded"]
        assert '"type": "ZeroAdam"' in r["users_sharded"]


def test_stage3_save_16bit_model_writes_the_gathered_weights(configs_ranks: list[dict]) -> None:
    for r in configs_ranks:
        res = r["16bit"]
        assert res["saved"] and res["same"] and res["dtypes"] == {"torch.bfloat16"}
        # Without stage3_gather_16bit_weights_on_model_save, as DeepSpeed: nothing written, False.
        not_saved, exists, messages = res["not_saved"]
        assert not not_saved and not exists and any("stage3_gather_16bit_weights_on_model_save" in m for m in messages)


@pytest.mark.parametrize("scheduler", ["WarmupLR", "WarmupDecayLR"])
def test_zds_checkpoints_resume_scheduler_steps_and_scaler_exactly(configs_ranks: list[dict], scheduler: str) -> None:
    for r in configs_ranks:
        res = r["resume", scheduler]
        # (loss, lr, global_steps) per step: the resumed run retraces the uninterrupted one exactly.
        assert res["again"] == res["rest"]
        assert res["rest"][0][2] == SAVE_AT + 1 and res["first"][0][1] != res["rest"][0][1]
        if scheduler == "WarmupDecayLR":  # fp16: the scale halved by the overflow at step 0 came back
            assert res["scale"] == (2.0 ** (POWER - 1),) * 2


def test_zero_plus_plus_keys_map_to_eight_bit_collectives_and_the_mesh() -> None:
    zds = _zds()
    t = zds.translate({"zero_optimization": {"stage": 3, "zero_quantized_weights": True, "zero_quantized_gradients": True,
                                             "zero_hpz_partition_size": 2}})
    assert t.zeroadam["quantized_weights"] and t.zeroadam["quantized_gradients"] and t.hpz == 2
    assert "stage of 1-3" in _refusal({"zero_optimization": {"stage": 0, "zero_quantized_gradients": True}})
    assert "expected a number of ranks" in _refusal({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 0}})
    with pytest.raises(ValueError, match=r"zero_hpz_partition_size=2 needs a hybrid-sharding mesh .* got no mesh.*mesh_dim_names"):
        zds._check_hpz(2, None)
    zds._check_hpz(1, None)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_reduce_bucket_size_zero_is_refused_at_every_stage(stage: int) -> None:
    """An older HF ds_config_zero3.json has reduce_bucket_size 0, which DeepSpeed refuses ("must be > 0")."""
    assert "zero_optimization.reduce_bucket_size=0" in _refusal({"zero_optimization": {"stage": stage, "reduce_bucket_size": 0}})
