"""Bytes on disk per parameter: zeroadam checkpoints in each state format against a plain torch.optim.AdamW
checkpoint of the same model after the same step.

    python benchmarks/checkpoint_size.py                      # a 9.4M-parameter MLP stack, one process
    python benchmarks/checkpoint_size.py --hidden 1024 --layers 4

Each row trains the model one step on CPU and writes a checkpoint: ``zeroadam.checkpoint.save`` for ZeroAdam (a
torch.distributed.checkpoint directory), ``torch.save({"model": ..., "optimizer": ...})`` for AdamW (what a
training script does). Reported per parameter: every byte of the directory or file, and the split into model,
moments (exp_avg + exp_avg_sq), int8 block scales and master weights, as DCP stored them (each tensor with its
serialization framing, about 1 KB, which is why the split does not reach the total exactly for tiny models).

Expected, per parameter, for an fp32 model: AdamW 4 (model) + 8 (moments) = 12; ZeroAdam fp32 12, bf16 8, int8
4 + 2 + 8/256 = 6.03 (codes stay codes on disk). Tensors under 4096 elements (biases) keep fp32 moments in every
format, which adds a little. With bf16 parameters and the compact master: 2 + 2.03 + 1 (int8 residual) = 5.03.

Results go to ``benchmarks/results/checkpoint_size.json`` and, with matplotlib, ``checkpoint_size.png``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from _common import RESULTS_DIR, describe_machine, format_table, write_json

__all__ = ["make_model", "measure_zeroadam", "measure_adamw", "plot", "main"]


def make_model(hidden: int, layers: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Transformer-MLP-shaped blocks: hidden -> 4 hidden -> hidden, with biases."""
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(), torch.nn.Linear(4 * hidden, hidden)]
    return torch.nn.Sequential(*blocks).to(dtype)


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, hidden: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, hidden, generator=g).to(next(model.parameters()).dtype)
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    opt.step()


def measure_zeroadam(
    root: Path, hidden: int, layers: int, state_dtype: str, param_dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    from zeroadam import ZeroAdam, checkpoint

    model = make_model(hidden, layers, param_dtype)
    opt = ZeroAdam(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    _one_step(model, opt, hidden)
    path = root / f"zeroadam-{state_dtype}-{str(param_dtype).removeprefix('torch.')}"
    t0 = time.perf_counter()
    checkpoint.save(path, model, opt)
    save_s = time.perf_counter() - t0
    d = checkpoint.describe(path)
    n = d["numel"]
    b = d["bytes"]
    return {
        "numel": n,
        "total_bytes": b["total_on_disk"],
        "bytes_per_param": b["total_on_disk"] / n,
        "model_per_param": b["model"] / n,
        "moments_per_param": b["moments"] / n,
        "scales_per_param": b["scales"] / n,
        "master_per_param": b["master"] / n,
        "optimizer_per_param": (b["total_on_disk"] - b["model"]) / n,
        "save_s": save_s,
    }


def measure_adamw(root: Path, hidden: int, layers: int) -> dict[str, Any]:
    model = make_model(hidden, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _one_step(model, opt, hidden)
    n = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, root / "adamw.pt")
    save_s = time.perf_counter() - t0
    torch.save(model.state_dict(), root / "adamw-model-only.pt")  # for the split only
    total = (root / "adamw.pt").stat().st_size
    model_bytes = (root / "adamw-model-only.pt").stat().st_size
    return {
        "numel": n,
        "total_bytes": total,
        "bytes_per_param": total / n,
        "model_per_param": model_bytes / n,
        "moments_per_param": (total - model_bytes) / n,
        "scales_per_param": 0.0,
        "master_per_param": 0.0,
        "optimizer_per_param": (total - model_bytes) / n,
        "save_s": save_s,
    }


def plot(data: dict[str, Any], out: Path) -> None:
    """Stacked bars of bytes per parameter on disk, split into model, moments, scales, master and the rest."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the benchmark machines
    import matplotlib.pyplot as plt

    rows = data["rows"]
    names = [r["name"] for r in rows]
    parts = [("model_per_param", "model"), ("moments_per_param", "moments"), ("scales_per_param", "int8 scales"),
             ("master_per_param", "master")]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bottom = [0.0] * len(rows)
    for key, label in parts:
        hs = [r[key] for r in rows]
        ax.bar(names, hs, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, hs)]
    rest = [r["bytes_per_param"] - b for r, b in zip(rows, bottom)]
    ax.bar(names, rest, bottom=bottom, label="metadata, framing", color="0.7")
    for i, r in enumerate(rows):
        ax.text(i, r["bytes_per_param"], f"{r['bytes_per_param']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bytes per parameter on disk")
    ax.set_ylim(0, max(r["bytes_per_param"] for r in rows) * 1.15)
    c = data["config"]
    ax.set_title(f"Checkpoint size, {c['numel']:,}-parameter MLP stack after one step\n"
                 f"torch {data['machine']['torch']}, {data['created_utc'][:10]}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768, help="width of each block (default 768)")
    ap.add_argument("--layers", type=int, default=2, help="number of hidden -> 4 hidden -> hidden blocks (default 2)")
    ap.add_argument("--out", default="checkpoint_size.json", help="result file name under benchmarks/results")
    args = ap.parse_args(argv)
    if args.hidden < 1 or args.layers < 1:
        ap.error("--hidden and --layers must be >= 1")

    rows = []
    root = Path(tempfile.mkdtemp(prefix="zeroadam-ckpt-size-"))
    try:
        for name, fn in [
            ("zeroadam int8", lambda: measure_zeroadam(root, args.hidden, args.layers, "int8")),
            ("zeroadam bf16", lambda: measure_zeroadam(root, args.hidden, args.layers, "bf16")),
            ("zeroadam fp32", lambda: measure_zeroadam(root, args.hidden, args.layers, "fp32")),
            ("zeroadam int8,\nbf16 params + compact master",
             lambda: measure_zeroadam(root, args.hidden, args.layers, "int8", torch.bfloat16)),
            ("torch AdamW\n(torch.save)", lambda: measure_adamw(root, args.hidden, args.layers)),
        ]:
            rows.append({"name": name, **fn()})
            shutil.rmtree(root)  # one checkpoint on disk at a time
            root.mkdir()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    headers = ["checkpoint", "B/param", "model", "moments", "scales", "master", "optimizer", "save s"]
    table = [
        [r["name"].replace("\n", " "), f"{r['bytes_per_param']:.3f}", f"{r['model_per_param']:.3f}",
         f"{r['moments_per_param']:.3f}", f"{r['scales_per_param']:.3f}", f"{r['master_per_param']:.3f}",
         f"{r['optimizer_per_param']:.3f}", f"{r['save_s']:.2f}"]
        for r in rows
    ]
    print(format_table(headers, table))
    payload = {
        "benchmark": "checkpoint_size",
        "machine": describe_machine("cpu"),
        "config": {"hidden": args.hidden, "layers": args.layers, "numel": rows[0]["numel"]},
        "rows": rows,
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    try:
        import json

        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
