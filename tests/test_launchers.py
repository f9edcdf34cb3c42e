"""ZeroAdam under the launchers users start it with: ``torchrun`` and ``accelerate launch`` (2 CPU processes, gloo).

The other distributed tests spawn ranks themselves; these run the real command lines on tests/launch_train.py and
compare each rank's parameters with one torch.optim.AdamW process on the global batch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch_train
from distributed import free_port

HERE = Path(__file__).resolve().parent

WORLD = 2


def reference() -> list[torch.Tensor]:
    model = launch_train.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=launch_train.LR)
    for s in range(launch_train.STEPS):
        x, y = launch_train.batch(s)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def launch(argv: list[str], out: Path, env_extra: dict[str, str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def check(results: list[dict], sent_gradients: bool) -> None:
    ref = reference()
    for r in results:
        assert r["world"] == WORLD
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(r["params"], ref))
        assert err <= 1e-5, f"relative error {err:.2e} against AdamW on the global batch"
        # Unwrapped, ZeroAdam reduces the gradients itself; under DDP it sends none of its own.
        assert ("reduce" in r["comm"] or "reduce_scatter" in r["comm"]) == sent_gradients, r["comm"]


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_torchrun(tmp_path: Path) -> None:
    argv = [
        _tool("torchrun"), "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / "launch_train.py"), str(tmp_path), "torchrun",
    ]  # fmt: skip
    check(launch(argv, tmp_path, {}), sent_gradients=True)


def test_accelerate_launch(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    # `accelerate launch --cpu` starts one process; two CPU processes come from --multi_gpu with ACCELERATE_USE_CPU.
    argv = [
        _tool("accelerate"), "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(HERE / "launch_train.py"), str(tmp_path), "accelerate",
    ]  # fmt: skip
    check(launch(argv, tmp_path, {"ACCELERATE_USE_CPU": "true"}), sent_gradients=False)
