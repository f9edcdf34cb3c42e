"""Resident memory of the optimizer state, per parameter, against what ``memory_stats()`` reports.

For each state format, a fresh process builds one large fp32 parameter, takes a first optimizer step (which
allocates the state), and reads its resident set size (``/proc/self/status`` VmRSS) before and after. The
difference, divided by the parameter count, is the state's real cost in host memory; ``memory_stats()`` gives the
bytes the optimizer believes it holds. torch.optim.AdamW is measured the same way.

    python benchmarks/state_memory.py [--numel 50000000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

from _common import describe_machine, format_table, write_json

FORMATS = ["int8", "bf16", "fp32", "torch-adamw"]


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(fmt: str, numel: int) -> dict[str, Any]:
    """Runs in a child process: RSS growth of the first step (state allocation) for one format."""
    import torch

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    if fmt == "torch-adamw":
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    else:
        from zeroadam import ZeroAdam

        opt = ZeroAdam([p], lr=1e-3, state_dtype=fmt)
    # One step on a tiny parameter first, so that libraries and kernels are loaded before the measurement.
    warm = torch.nn.Parameter(torch.randn(8192))
    warm.grad = torch.randn(8192)
    (torch.optim.AdamW([warm], fused=True) if fmt == "torch-adamw" else type(opt)([warm], state_dtype=fmt)).step()
    before = _rss_bytes()
    opt.step()
    after = _rss_bytes()
    stats = opt.memory_stats() if hasattr(opt, "memory_stats") else {
        "state_bytes": sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1)
    }
    return {
        "format": fmt,
        "numel": numel,
        "rss_bytes_per_param": (after - before) / numel,
        "reported_state_bytes_per_param": stats["state_bytes"] / numel,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import json

        print(json.dumps(measure(args.child, args.numel)))
        return 0
    rows = []
    import json

    for fmt in FORMATS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", fmt, "--numel", str(args.numel)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        format_table(
            ["state", "RSS bytes/param", "memory_stats bytes/param"],
            [[r["format"], f"{r['rss_bytes_per_param']:.3f}", f"{r['reported_state_bytes_per_param']:.3f}"] for r in rows],
        )
    )
    write_json("state_memory.json", {"machine": describe_machine("cpu"), "numel": args.numel, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
