"""Step time over a model's many tensors: what an optimizer costs per parameter tensor, besides its arithmetic.

    python benchmarks/step_overhead.py                        # both layouts, every optimizer of step_speed's table
    python benchmarks/step_overhead.py --layouts tiny --only zeroadam-fp32,torch-fused --repeats 200

``step_speed.py`` times one large tensor: memory bound, a call per step. A model is tens to hundreds of tensors
(nanoGPT's GPT-2 124M: 148, a 7B Llama: 291), and a stage-0 step that pays a few microseconds of Python, a
ctypes call and an OpenMP fork per tensor loses to torch's fused AdamW on small and mid-sized models whatever its
kernel does. The layouts:

* ``gpt``: the parameter shapes of nanoGPT's character-level config (6 layers, 6 heads, 384 wide, block 256,
  vocabulary 65, no biases): 39 tensors, 10.7M elements.
* ``tiny``: 200 tensors of 4,096 elements (819K): almost nothing but per-tensor cost.

Each optimizer steps its own copy of the same parameters with fixed gradients, in interleaved rounds
(``_common`` [Note: interleaved timing]); the table gives ms per step, the ratio of its speed to torch's fused
AdamW in the same rounds, and the extra microseconds per tensor over fused AdamW. Results go to
``benchmarks/results/step_overhead_cpu.json`` with the machine's CPU model.
"""
from __future__ import annotations

import argparse
import gc
import sys
import traceback
from typing import Any, Optional, Sequence

import torch

from _common import describe_machine, error_text, format_table, paired_ratio, probe_import, time_interleaved, write_json
from step_speed import BASELINE, Candidate, _select, build_candidates

__all__ = ["LAYOUTS", "layout_shapes", "run", "main"]

LAYOUTS = ("gpt", "tiny")


def layout_shapes(layout: str) -> list[tuple[int, ...]]:
    """The parameter shapes of one layout (see the module docstring)."""
    if layout == "tiny":
        return [(4096,)] * 200
    if layout == "gpt":
        n_layer, n_embd, block, vocab = 6, 384, 256, 65
        per_layer = [(n_embd,), (3 * n_embd, n_embd), (n_embd, n_embd), (n_embd,), (4 * n_embd, n_embd), (n_embd, 4 * n_embd)]
        return [(vocab, n_embd), (block, n_embd), *per_layer * n_layer, (n_embd,)]
    raise ValueError(f"invalid layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _params(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def run(
    cands: Sequence[Candidate], layout: str, *, warmup: int, repeats: int
) -> list[dict[str, Any]]:
    """One row per candidate for one layout (a candidate that fails is a row with its reason)."""
    shapes = layout_shapes(layout)
    numel = sum(torch.Size(s).numel() for s in shapes)
    rows: dict[str, dict[str, Any]] = {}
    steps = {}
    for cand in cands:
        try:
            opt = cand.make(_params(shapes))
            opt.step()
            steps[cand.name] = opt.step
        except Exception as exc:  # noqa: BLE001 - one failing competitor does not stop the others
            traceback.print_exc(file=sys.stderr)
            rows[cand.name] = {"candidate": cand.name, "status": "missing", "reason": error_text(exc)}
    print(f"# {layout}: {len(shapes)} tensors, {numel:,} elements; {', '.join(steps)} in {repeats} rounds", flush=True)
    timings = time_interleaved(steps, warmup=warmup, repeats=repeats)
    base = timings.get(BASELINE)
    for name, t in timings.items():
        if isinstance(t, Exception):
            rows[name] = {"candidate": name, "status": "missing", "reason": error_text(t)}
            continue
        row: dict[str, Any] = {"candidate": name, "status": "ok", "median_s": t.median_s, "samples_s": t.samples_s}
        if base is not None and not isinstance(base, Exception):
            row["ratio_vs_torch_fused"] = paired_ratio(base.samples_s, t.samples_s)
            row["extra_us_per_tensor"] = (t.median_s - base.median_s) / len(shapes) * 1e6
        rows[name] = row
    steps.clear()
    gc.collect()
    out = [rows[c.name] for c in cands if c.name in rows]
    for r in out:
        r.update(layout=layout, tensors=len(shapes), elements=numel)
    return out


def table(rows: Sequence[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["candidate"], "-", "-", "-", f"missing: {r['reason'][:90]}"])
            continue
        ratio, extra = r.get("ratio_vs_torch_fused"), r.get("extra_us_per_tensor")
        out.append(
            [
                r["candidate"],
                f"{r['median_s'] * 1e3:.3f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if extra is None else f"{extra:+.1f}",
                "",
            ]
        )
    return format_table(["optimizer", "ms/step", "vs fused", "us/tensor vs fused", "note"], out, left=(0, -1))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--repeats", type=int, default=60, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    ap.add_argument("--only", help="comma-separated optimizer names (step_speed.py's) to run")
    ap.add_argument("--skip", help="comma-separated optimizer names to leave out")
    ap.add_argument("--out", default="step_overhead_cpu.json", help="result file name under benchmarks/results")
    args = ap.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        ap.error(f"invalid --layouts entries {bad}; expected some of {', '.join(LAYOUTS)}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    try:
        cands = _select(build_candidates(), args.only, args.skip)
    except ValueError as exc:
        ap.error(str(exc))
    available = {}
    for cand in cands:
        if cand.family not in available:
            available[cand.family] = probe_import(cand.module)
    missing = [
        {"candidate": c.name, "status": "missing", "reason": available[c.family].reason or "import failed"}
        for c in cands
        if not available[c.family].ok
    ]
    cands = [c for c in cands if available[c.family].ok and "cpu" in c.devices]

    machine = describe_machine("cpu")
    print(f"# {machine['cpu_model']}, {machine['cpu_usable']} cores, torch {machine['torch']}, load {machine['loadavg_1_5_15']}")
    rows = []
    for layout in layouts:
        layout_rows = run(cands, layout, warmup=args.warmup, repeats=args.repeats)
        rows += layout_rows
        print(f"\none step of every tensor, layout {layout!r}, median of {args.repeats} interleaved rounds")
        print(table(layout_rows + missing))
    machine["loadavg_after"] = describe_machine("cpu")["loadavg_1_5_15"]
    path = write_json(
        args.out,
        {
            "benchmark": "step_overhead",
            "machine": machine,
            "config": {"layouts": layouts, "repeats": args.repeats, "warmup": args.warmup, "baseline": BASELINE},
            "rows": rows,
            "missing": missing,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
