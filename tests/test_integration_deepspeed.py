"""DeepSpeed configs on 2 gloo CPU processes: zeroadam.integrations.deepspeed.initialize (ZeroAdam shards, stages 1-3)
and a plain deepspeed.initialize with "type": "ZeroAdam" (DeepSpeed's ZeRO shards), against torch.optim.AdamW on the
global batch.

`make test` installs deepspeed (see the Makefile). The first DeepSpeed run on a machine JIT-compiles DeepSpeed's CPU
shared-memory communication op (30-60 s on 2 cores); later runs load it from ~/.cache/torch_extensions. No other
DeepSpeed op is built: offload_optimizer runs ZeroAdam, not DeepSpeedCPUAdam."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed (make test installs it; see the Makefile)")

from distributed import run_ranks  # noqa: E402

WORLD, PER_RANK, ACCUM, STEPS, CLIP, LR = 2, 6, 2, 4, 0.5, 1e-2


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 67*97 = 6499 and 97*13 = 1261 elements: shards end inside parameters and blocks need padding.
    return torch.nn.Sequential(torch.nn.Linear(67, 97), torch.nn.Tanh(), torch.nn.Linear(97, 13))


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
        "fp16": config({"stage": 2}, fp16={"enabled": True}),
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


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


@pytest.mark.parametrize("variant", [1, 2, "offload"])
def test_zeroadam_initialize_trains_like_adamw(ranks: list[dict], variant) -> None:
    ref = reference()
    for r in ranks:
        res = r["ours", variant]
        assert rel_err(res["params"], ref) <= 1e-5
        assert res["optimizer"] == "ZeroAdam"
        assert res["ds_allreduces"] == 0  # ZeroAdam averages; DeepSpeed's all-reduce is off
        reduced = res["comm"].get("reduce", 0) + res["comm"].get("reduce_scatter", 0)
        assert reduced > 0


@pytest.mark.parametrize("variant", [3, "3-sharded-offload"])
def test_zeroadam_initialize_stage3_trains_like_adamw(ranks: list[dict], variant) -> None:
    ref = reference()
    for r in ranks:
        res = r["ours", variant]
        assert rel_err(res["params"], ref) <= 1e-5
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


def test_bf16_casts_the_model_and_zeroadam_keeps_master_weights(ranks: list[dict]) -> None:
    ref = reference()
    for r in ranks:
        res = r["ours", "bf16"]
        assert all(p.dtype == torch.bfloat16 for p in res["params"])
        # bf16 forward and backward, fp32-accurate update (compact master weights): close to fp32 AdamW.
        assert rel_err([p.float() for p in res["params"]], ref) <= 2e-2


@pytest.mark.parametrize("variant", [1, 2, "offload"])
def test_plain_deepspeed_with_zeroadam_type_trains_like_adamw(ranks: list[dict], variant) -> None:
    ref = reference()
    for r in ranks:
        res = r["ds", variant]
        assert rel_err(res["params"], ref) <= 1e-5
        assert res["inner"] == "DeepSpeedZeroAdam"  # inside DeepSpeed's ZeRO optimizer


def test_keys_that_cannot_be_honoured_are_named(ranks: list[dict]) -> None:
    for r in ranks:
        assert "zero_optimization.overlap_comm" in r["ignored_warning"][0]
        assert "fp16.enabled" in r["errors"]["fp16"]
        assert "zero_optimization.offload_optimizer.device='nvme'" in r["errors"]["nvme"]
        assert "optimizer.params.adam_w_mode=False" in r["errors"]["adam_l2"]
        assert "zero_optimization.offload_param" in r["errors"]["offload_param"]
        assert "zero_optimization.stage=2" in r["errors"]["sharded_stage2"]
        assert "bf16.enabled=True" in r["errors"]["sharded_fp32_bf16"]
