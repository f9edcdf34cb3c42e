"""A training script for tests/test_mesh.py, run by two ``torchrun --nnodes 2`` launches (not a test itself).

    mesh_train.py OUT_DIR STAGE [STAGE ...]

Each of the 4 ranks (2 "nodes" × 2) trains the test MLP on its quarter of every global batch with ZeroAdam on a
2×2 ("replicate", "shard") mesh, two param groups, accumulation 2 and clipping, and writes its final parameters and
the step's collective counts to OUT_DIR/stage<S>_rank<r>.pt.
"""
import os
import sys

import torch
import torch.distributed as dist

from test_zero import CLIP, GLOBAL_BATCH, batches, groups  # the script's folder is on sys.path
from helpers import make_model

STEPS, MICRO, SAVE_AT = 10, 2, 5


def build(stage: int, mesh, state_dtype: str = "fp32"):
    import zeroadam

    model = make_model()
    if stage == 3:
        zeroadam.shard_model(model, mesh=mesh, units=[torch.nn.Linear])
    opt = zeroadam.ZeroAdam(
        groups(model), lr=1e-2, weight_decay=0.0, state_dtype=state_dtype, stage=stage, max_grad_norm=CLIP,
        bucket_size=3000, mesh=mesh,
    )
    return model, opt


def run_steps(model, opt, rank: int, world: int, first: int, last: int) -> None:
    per = GLOBAL_BATCH // world
    for mbs in batches(STEPS, MICRO)[first:last]:
        opt.zero_grad()
        for x, y in mbs:
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            (torch.nn.functional.mse_loss(model(xs), ys) / MICRO).backward()
        opt.step()


def params_of(model, stage: int) -> list[torch.Tensor]:
    import zeroadam

    if stage == 3:
        return list(zeroadam.full_state_dict(model).values())
    return [p.detach().clone() for p in model.parameters()]


def train(stage: int, mesh, rank: int, world: int, out_dir: str) -> dict:
    """Ten steps; a checkpoint after five (OUT_DIR/ckpt_stage<S>, loaded elsewhere by tests/test_mesh.py)."""
    from zeroadam import checkpoint

    model, opt = build(stage, mesh)
    run_steps(model, opt, rank, world, 0, SAVE_AT)
    checkpoint.save(os.path.join(out_dir, f"ckpt_stage{stage}"), model, opt)
    run_steps(model, opt, rank, world, SAVE_AT, STEPS)
    shard = {str(i): {k: v.clone() for k, v in e.items() if isinstance(v, torch.Tensor)} for i, e in enumerate(opt.engine.shard_entries().values())}
    return {"params": params_of(model, stage), "comm": opt.comm_stats(), "memory": opt.memory_stats(), "shard": shard,
            "coordinate": mesh.get_coordinate()}


def main(out_dir: str, stages: list[int]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    for stage in stages:
        torch.save(train(stage, mesh, rank, world, out_dir), os.path.join(out_dir, f"stage{stage}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]])
