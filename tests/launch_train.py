"""A training script for tests/test_launchers.py, run by ``torchrun`` or ``accelerate launch`` (not a test itself).

    torchrun --nproc_per_node 2 tests/launch_train.py OUT_DIR torchrun
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/launch_train.py OUT_DIR accelerate

Each rank trains the same small model on its half of every global batch with ZeroAdam(stage=2) and writes its
final parameters to OUT_DIR/rank<r>.pt. With torchrun the model is unwrapped (ZeroAdam averages the gradients);
with Accelerate it is prepared (DDP), and ZeroAdam's gradient_sync="auto" leaves the averaging to DDP.
"""
import os
import sys

import torch
import torch.distributed as dist

from helpers import GLOBAL_BATCH, batch, make_model  # the script's folder is on sys.path

STEPS, LR = 5, 1e-2


def main(out_dir: str, launcher: str) -> None:
    from zeroadam import ZeroAdam

    torch.set_num_threads(1)
    if launcher == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator()
        model = make_model()
        opt = ZeroAdam(model.parameters(), lr=LR, state_dtype="fp32", stage=2, bucket_size=3000)
        net, opt = accelerator.prepare(model, opt)
        backward = accelerator.backward
    else:
        dist.init_process_group("gloo")
        model = make_model()
        opt = ZeroAdam(model.parameters(), lr=LR, state_dtype="fp32", stage=2, bucket_size=3000)
        net, backward = model, torch.Tensor.backward
    rank, world = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // world
    for s in range(STEPS):
        x, y = batch(s)
        backward(torch.nn.functional.mse_loss(net(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]))
        opt.step()
        opt.zero_grad()
    inner = getattr(opt, "optimizer", opt)
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "comm": inner.comm_stats()["elements"],
            "world": world,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
