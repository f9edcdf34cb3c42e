"""Hybrid sharding on a 2-D ("replicate", "shard") mesh (zeroadam/comm/mesh.py), against one process of
torch.optim.AdamW on the global batch; two torchrun launches on loopback stand in for two machines."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_ranks, run_two_nodes
from helpers import max_rel_err
from test_zero import CLIP, GLOBAL_BATCH, reference

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mesh")
    run_two_nodes(str(HERE / "mesh_train.py"), [str(out), "1", "2", "3"])
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_2x2_mesh_matches_adamw_on_global_batch(two_nodes: Path, stage: int) -> None:
    ref = reference(10, 2, CLIP)
    results = [torch.load(two_nodes / f"stage{stage}_rank{r}.pt") for r in range(4)]
    for res in results:
        assert max_rel_err(res["params"], ref) <= 1e-5
    for res in results[1:]:
        assert max_rel_err(res["params"], results[0]["params"]) == 0.0
    comm = results[0]["comm"]
    assert set(comm["by_dim"]) == {"shard", "replicate"}
    assert comm["by_dim"]["replicate"]["bytes"]["all_reduce"] > 0


def test_replicas_hold_the_same_state(two_nodes: Path) -> None:
    """Ranks with the same "shard" coordinate hold the same shards, bit for bit; the others hold other shards."""
    for stage in (1, 2, 3):
        results = [torch.load(two_nodes / f"stage{stage}_rank{r}.pt") for r in range(4)]
        by_shard: dict[int, list[dict]] = {}
        for res in results:
            by_shard.setdefault(res["coordinate"][1], []).append(res["shard"])
        assert sorted(len(v) for v in by_shard.values()) == [2, 2]
        for a, b in by_shard.values():
            assert a.keys() == b.keys()
            for i in a:
                for k in a[i]:
                    assert torch.equal(a[i][k], b[i][k]), (stage, i, k)


def resume(rank: int, world: int, shape, out_dir: str) -> dict[int, list[torch.Tensor]]:
    """Load the 2x2 run's checkpoints (stages 1-3) on ``world`` ranks (a mesh of ``shape`` or none) and run their
    last steps; every stage in one spawn (starting ranks dominates the cost)."""
    import mesh_train
    from zeroadam import checkpoint

    mesh = None
    if shape is not None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    out = {}
    for stage in (1, 2, 3):
        model, opt = mesh_train.build(stage, mesh)
        checkpoint.load(f"{out_dir}/ckpt_stage{stage}", model, opt)
        mesh_train.run_steps(model, opt, rank, world, mesh_train.SAVE_AT, mesh_train.STEPS)
        out[stage] = mesh_train.params_of(model, stage)
    return out


@pytest.mark.parametrize("world,shape", [(1, None), (2, None), (4, None), (4, (4, 1))])
def test_checkpoint_of_a_2x2_mesh_loads_anywhere(two_nodes: Path, world: int, shape) -> None:
    """Saved on a 2x2 mesh at stages 1-3; loaded on 1, 2 and 4 ranks and on a 4x1 mesh, the resumed run ends where
    the uninterrupted one did."""
    got = run_ranks(resume, world, shape, str(two_nodes))
    for stage in (1, 2, 3):
        final = torch.load(two_nodes / f"stage{stage}_rank0.pt")["params"]
        for by_stage in got:
            assert max_rel_err(by_stage[stage], final) <= 1e-5, stage


def bad_meshes(rank: int, world: int) -> dict[str, str]:
    """The error of each misuse (every rank raises the same, before any collective of the step)."""
    from torch.distributed.device_mesh import init_device_mesh

    import zeroadam
    from helpers import make_model

    def error_of(fn) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no error"

    params = lambda: make_model().parameters()  # noqa: E731
    unnamed = init_device_mesh("cpu", (2, 2))
    wrong_names = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    good = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {
        "unnamed": error_of(lambda: zeroadam.ZeroAdam(params(), stage=2, mesh=unnamed)),
        "wrong_names": error_of(lambda: zeroadam.ZeroAdam(params(), stage=2, mesh=wrong_names)),
        "not_a_mesh": error_of(lambda: zeroadam.ZeroAdam(params(), stage=2, mesh=[[0, 1], [2, 3]])),
        "both": error_of(lambda: zeroadam.ZeroAdam(params(), stage=2, mesh=good, process_group=torch.distributed.group.WORLD)),
        "stage0": error_of(lambda: zeroadam.ZeroAdam(params(), stage=0, mesh=good)),
        "quantized_stage0": error_of(lambda: zeroadam.ZeroAdam(params(), stage=0, quantized_gradients=True)),
        "quantized_not_bool": error_of(lambda: zeroadam.ZeroAdam(params(), stage=2, quantized_weights="yes")),
        "shard_model_unnamed": error_of(lambda: zeroadam.shard_model(make_model(), mesh=unnamed)),
    }
    # A mesh over part of the world: ranks 0-1 of 4.
    from torch.distributed.device_mesh import DeviceMesh

    half = DeviceMesh("cpu", [[0, 1]], mesh_dim_names=("replicate", "shard"))
    out["part_of_world"] = error_of(lambda: zeroadam.ZeroAdam(params(), stage=1, mesh=half))
    return out


def test_bad_meshes_say_what_to_do() -> None:
    errors = run_ranks(bad_meshes, 4)[0]
    assert "mesh_dim_names=('replicate', 'shard')" in errors["unnamed"]
    assert "mesh_dim_names=('dp', 'tp')" in errors["wrong_names"]
    assert "invalid mesh=[[0, 1], [2, 3]]" in errors["not_a_mesh"] and "init_device_mesh" in errors["not_a_mesh"]
    assert "not both" in errors["both"]
    assert "stage=0" in errors["stage0"] and "stage=1, 2 or 3" in errors["stage0"]
    assert "quantized_gradients=True" in errors["quantized_stage0"] and "stage=1, 2 or 3" in errors["quantized_stage0"]
    assert "quantized_weights='yes'" in errors["quantized_not_bool"]
    assert "zeroadam.shard_model" in errors["shard_model_unnamed"]
    assert "covers 2 ranks but the world has 4" in errors["part_of_world"]


def accelerate_hsdp(rank: int, world: int, out_dir: str) -> dict:
    """ZeroAccelerator(mesh=...) on CPU processes (Accelerate refuses a ParallelismConfig on MULTI_CPU; on GPUs
    ZeroAccelerator(parallelism_config=ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)) gives the same mesh)."""
    import os

    os.environ.update(LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="true")
    from torch.distributed.device_mesh import init_device_mesh

    import mesh_train
    import zeroadam
    from zeroadam.integrations.accelerate import ZeroAccelerator

    acc = ZeroAccelerator(mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    out = {}
    for stage in (2, 3):
        model = mesh_train.make_model()
        if stage == 3:
            model = acc.shard_model(model, units=[torch.nn.Linear])
        opt = zeroadam.ZeroAdam(mesh_train.groups(model), lr=1e-2, weight_decay=0.0, state_dtype="fp32", stage=stage,
                                max_grad_norm=mesh_train.CLIP, bucket_size=3000, mesh=acc.zero_mesh)
        model, opt = acc.prepare(model, opt)
        mesh_train.run_steps(model, opt, rank, world, 0, mesh_train.STEPS)
        out[stage] = {"params": mesh_train.params_of(acc.unwrap_model(model), stage), "shape": opt.optimizer.engine.topology.shape}
    bare = zeroadam.ZeroAdam(mesh_train.make_model().parameters(), stage=2)
    try:
        acc.prepare(bare)
        out["refusal"] = "no error"
    except ValueError as e:
        out["refusal"] = str(e)
    return out


def test_zero_accelerator_with_a_mesh_gives_hybrid_sharding(tmp_path: Path) -> None:
    got = run_ranks(accelerate_hsdp, 4, str(tmp_path), timeout=300)
    for stage in (2, 3):
        for r in got:
            assert r[stage]["shape"] == (2, 2)
            assert max_rel_err(r[stage]["params"], got[0][stage]["params"]) == 0.0
        assert max_rel_err(got[0][stage]["params"], reference(10, 2, CLIP)) <= 1e-5
    assert "mesh=accelerator.zero_mesh" in got[0]["refusal"]



def zds_hybrid(rank: int, world: int) -> dict:
    """zds.initialize on a 2x2 mesh: zero_hpz_partition_size 2, with and without ZeRO++'s 8-bit collectives."""
    import os

    os.environ.update(LOCAL_RANK=str(rank))
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    import mesh_train
    import zeroadam
    from zeroadam.integrations import deepspeed as zds

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    per = GLOBAL_BATCH // world
    out = {}
    for quantized in (False, True):
        cfg = {
            "train_micro_batch_size_per_gpu": per, "gradient_accumulation_steps": mesh_train.MICRO,
            "gradient_clipping": CLIP, "steps_per_print": 10**9,
            "optimizer": {"type": "ZeroAdam", "params": {"lr": 1e-2, "weight_decay": 0.0, "state_dtype": "fp32"}},
            "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2, "zero_quantized_weights": quantized,
                                  "zero_quantized_gradients": quantized},
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine, opt, _, _ = zds.initialize(model=mesh_train.make_model(), config=cfg, mesh=mesh)
        for mbs in mesh_train.batches(mesh_train.STEPS, mesh_train.MICRO):
            for x, y in mbs:
                engine.backward(torch.nn.functional.mse_loss(engine(x[rank * per : (rank + 1) * per]),
                                                             y[rank * per : (rank + 1) * per]))
                engine.step()
        full = zeroadam.full_state_dict(engine.module)
        out[quantized] = {"params": [full[n] for n, _ in engine.module.named_parameters()],
                          "shape": opt.engine.topology.shape, "quantized": opt.options.quantized_gradients}
    return out


def test_deepspeed_config_with_hpz_trains_on_the_mesh() -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (make test installs it)")
    got = run_ranks(zds_hybrid, 4, timeout=600)
    import mesh_train

    model = mesh_train.make_model()  # one param group: what zds builds from a config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for mbs in mesh_train.batches(mesh_train.STEPS, mesh_train.MICRO):
        for x, y in mbs:
            (torch.nn.functional.mse_loss(model(x), y) / mesh_train.MICRO).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    ref = [p.detach() for p in model.parameters()]
    for r in got:
        assert r[False]["shape"] == (2, 2) and r[True]["quantized"]
        assert max_rel_err(r[False]["params"], ref) <= 1e-5
        assert max_rel_err(r[True]["params"], ref) <= 0.05
        assert max_rel_err(r[True]["params"], got[0][True]["params"]) == 0.0


def disagreeing_quantization(rank: int, world: int) -> str:
    """Rank 1 asks for 8-bit gradients, rank 0 does not: refused on every rank at construction, no collective hangs."""
    import zeroadam
    from helpers import make_model

    try:
        zeroadam.ZeroAdam(make_model().parameters(), stage=2, quantized_gradients=rank == 1)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_that_disagree_on_quantization_are_refused() -> None:
    for msg in run_ranks(disagreeing_quantization, 2, timeout=60, pg_timeout=20):
        assert "quantized_gradients" in msg


def skipping_replica(rank: int, world: int) -> str:
    """On a 2x2 mesh, rank 3 (replica 1) skips the second step(): the others must fail in bounded time, not hang."""
    import os

    os.environ["ZEROADAM_COLLECTIVE_TIMEOUT"] = "5"
    from torch.distributed.device_mesh import init_device_mesh

    import zeroadam
    from helpers import batch, make_model

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    opt = zeroadam.ZeroAdam(model.parameters(), stage=2, state_dtype="fp32", mesh=mesh)
    try:
        for step in range(3):
            x, y = batch(step)
            torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
            if not (rank == 3 and step == 1):
                opt.step()
            opt.zero_grad()
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_a_replica_that_skips_a_step_fails_in_bounded_time() -> None:
    results = run_ranks(skipping_replica, 4, timeout=120, pg_timeout=30)
    assert all(r != "no error" for r in results[:3]), results
