"""Run every CPU benchmark in ``benchmarks/``, each in its own process, then draw the charts from their JSON.

    python benchmarks/run_all.py                 # run what exists, then plot
    python benchmarks/run_all.py --plots-only    # redraw the PNGs from the JSON already in results/
    python benchmarks/run_all.py --skip offload.py

Benchmarks run in the order of ``BENCHMARKS``; a file that does not exist yet is reported and skipped. Each
runs as a subprocess with its defaults (so one that crashes, or leaks threads or memory, does not change the
next one's numbers), and its output passes through. A summary goes to ``results/run_all_cpu.json``. The exit
status is 1 if any benchmark that exists failed, 0 otherwise; charts are drawn either way, from whatever JSON
is there. ``gpu_suite.py`` is not run here: it needs CUDA and is run by hand on a GPU machine.

Charts (``results/*.png``) are drawn by the functions in ``PLOTTERS``, one per result file pattern.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from _common import BENCH_DIR, RESULTS_DIR, describe_machine, write_json

__all__ = ["BENCHMARKS", "PLOTTERS", "run_benchmarks", "plot_step_speed", "make_plots", "main"]

BENCHMARKS: tuple[str, ...] = (
    "step_speed.py",
    "state_memory.py",
    "zero_scaling.py",
    "offload.py",
    "checkpoint_size.py",
    "quant_maps.py",
)
"""CPU benchmarks, in run order; each writes its own JSON under results/."""

REPO = BENCH_DIR.parent


def run_benchmarks(names: Sequence[str], timeout_s: int) -> list[dict[str, Any]]:
    """Run each existing benchmark file; one record per name (status ok / failed / timeout / absent)."""
    records = []
    for name in names:
        path = BENCH_DIR / name
        if not path.exists():
            print(f"## {name}: not present, skipped", flush=True)
            records.append({"benchmark": name, "status": "absent"})
            continue
        print(f"## {name}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(path)], cwd=REPO, timeout=timeout_s, check=False)
            status, rc = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
        wall = time.perf_counter() - t0
        print(f"## {name}: {status} ({wall:.0f} s)", flush=True)
        records.append({"benchmark": name, "status": status, "returncode": rc, "wall_s": wall})
    return records


# ---------------------------------------------------------------------------------------------- charts
def plot_step_speed(data: dict[str, Any], out: Path) -> None:
    """Bars of each optimizer's speed relative to torch's fused AdamW, one group of bars per size."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the benchmark machines
    import matplotlib.pyplot as plt

    rows = data["rows"]
    sizes = data["config"]["sizes"]
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    width = 0.8 / max(1, len(sizes))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(names)), 4.8))
    top, notes = 1.0, False
    for si, size in enumerate(sizes):
        by_name = {r["candidate"]: r for r in rows if r["size"] == size}
        xs, hs = [], []
        for ni, name in enumerate(names):
            x = ni + (si - (len(sizes) - 1) / 2) * width
            r = by_name.get(name)
            ratio = None if r is None or r["status"] != "ok" else r.get("ratio_vs_torch_fused")
            if ratio is None:
                # A missing competitor keeps its place on the axis, with the reason's first words.
                label = "missing" if r is None or r["status"] == "ok" else f"missing\n({r['stage']})"
                ax.text(x, 0.02, label, ha="center", va="bottom", fontsize=7, rotation=90, color="0.4")
                continue
            xs.append(x)
            hs.append(ratio)
            fell_back = bool(r.get("note"))
            notes |= fell_back
            ax.text(x, ratio, f"{ratio:.2f}" + ("*" if fell_back else ""), ha="center", va="bottom", fontsize=7)
        top = max([top, *hs])
        ax.bar(xs, hs, width=width, label=f"{size:,} elements")
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(f"params/s relative to {data['config'].get('baseline', 'torch-fused')} (higher is faster)")
    m = data["machine"]
    where = m.get("gpu_name") or f"{m['cpu_model']}, {m['cpu_usable']} cores"
    ax.set_title(
        f"One AdamW step, fp32 parameter on {data['config']['device']}\n{where}, torch {m['torch']}, "
        f"{data['created_utc'][:10]}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    if notes:
        fig.text(
            0.01, 0.01, "* kept another state format than its nominal one (see the row's note in the JSON)", fontsize=7
        )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "step_speed_*.json": plot_step_speed,
}
"""Result file pattern (under results/) -> function drawing ``<same name>.png`` from its JSON."""


def make_plots(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Draw every chart whose JSON exists; a chart that fails is reported, not raised."""
    records = []
    for pattern, plot in PLOTTERS.items():
        for src in sorted(results_dir.glob(pattern)):
            out = src.with_suffix(".png")
            try:
                plot(json.loads(src.read_text()), out)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the other charts
                print(f"## chart from {src.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                records.append({"source": src.name, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
                continue
            print(f"## wrote {out}")
            records.append({"source": src.name, "status": "ok", "png": out.name})
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--plots-only", action="store_true", help="only redraw the charts from existing JSON")
    ap.add_argument("--skip", action="append", default=[], help="benchmark file to leave out (repeatable)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds allowed to each benchmark")
    args = ap.parse_args(argv)
    unknown = set(args.skip) - set(BENCHMARKS)
    if unknown:
        ap.error(f"invalid --skip {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")

    records: list[dict[str, Any]] = []
    if not args.plots_only:
        records = run_benchmarks([b for b in BENCHMARKS if b not in args.skip], args.timeout)
    charts = make_plots()
    if not args.plots_only:
        write_json(
            "run_all_cpu.json",
            {"benchmark": "run_all", "machine": describe_machine("cpu"), "runs": records, "charts": charts},
        )
    failed = [r["benchmark"] for r in records if r["status"] in ("failed", "timeout")]
    if failed:
        print(f"## failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
