"""Speed of ZeroAdam's CPU-offload update against DeepSpeedCPUAdam on the same tensors, and (on a GPU machine)
the GPU memory that offloading saves and the step time it costs.

    python benchmarks/offload.py                                   # CPU: ~30M elements in 7 parameters
    python benchmarks/offload.py --numels 2^25,2^24 --repeats 20 --threads 2
    python benchmarks/offload.py --device cuda                     # ~1B-parameter bf16 GPT on one GPU

CPU mode (``benchmarks/results/offload_cpu.json``)
    Every optimizer updates its own copy of the same fp32 parameters with the same fp32 gradients (a mix of
    sizes, by default large matrices, a mid-size one, and two under ``MIN_QUANT_NUMEL`` = 4096 elements that
    keep fp32 moments, one of them not a multiple of 256 so that padding runs). Rows: ZeroAdam with
    ``offload="cpu"`` at stage 0 on one process (fp32 and int8 state: the flat host buffers, the gradient copy
    into the host shard, the fused CPU kernel; with one process and CPU parameters the kernel reads each ``p.grad``
    in place, after the global norm's read of every gradient that finds non-finite ones), the same fp32 row with
    ``skip_nonfinite=False`` ("-noskip": no check and so no read before the update, DeepSpeedCPUAdam's
    semantics; context, not the figure), ``DeepSpeedCPUAdam(adamw_mode=True)`` (its AVX C++ op), and
    for context ZeroAdam fp32 without offload and torch's fused AdamW. Each row times ``optimizer.step()``
    (median of ``--repeats`` after ``--warmup``, see ``_common`` [Note: timing]) after one untimed first step
    that creates the state, in interleaved rounds whose paired ratios give the "vs DeepSpeed" column and the
    figures (``_common`` [Note: interleaved timing]). The issue's figures, reported as measured: ZeroAdam offload
    fp32 at least 1.0x DeepSpeedCPUAdam's speed, and int8 at least 0.5x the fp32 offload speed. After the same number of steps every
    row's parameters are compared with torch's fused AdamW (``max_rel_diff_vs_torch``), so a fast row that
    computes something else shows. For the offload rows, "grad intake" is the part of ``step()`` that moves the
    gradients into the host shard (the stage-1 reduction path, which at one rank is a copy into a zeroed flat
    buffer and an addition into the shard), timed alone through internal API.

CUDA mode (``benchmarks/results/offload_cuda.json``; needs a GPU, exits with status 2 without one)
    The ``GPT`` of ``zero_scaling.py`` at ``--params-m`` (default 1000) in bf16, trained on one GPU for
    ``--warmup`` + ``--repeats`` iterations (forward, backward, step) by ZeroAdam int8 on the GPU and by ZeroAdam
    int8 / fp32 with ``offload="cpu"``. Per mode: ``torch.cuda.max_memory_allocated`` over the run (reset once the
    bf16 model is built), the median iteration time and the median time of ``step()`` alone. The figure: the
    offloaded int8 iteration at most 1.3x the on-GPU int8 iteration. A size that does not fit is halved (up to
    three times) and the run says so.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch

from _common import (
    Availability,
    describe_machine,
    error_text,
    format_table,
    parse_sizes,
    paired_ratio,
    probe_import,
    Timing,
    time_fn,
    time_interleaved,
    write_json,
)

__all__ = ["CpuCandidate", "CPU_CANDIDATES", "run_cpu", "run_cuda", "main"]

# The same hyperparameters for every optimizer (step_speed.py's).
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

# ~30M elements: 2^24 + 2^23 + 2^22 + 2^20 + 2^16, plus 4095 and 1000 (fp32 moments; 1000 is not whole blocks).
DEFAULT_NUMELS = "2^24,2^23,2^22,2^20,2^16,4095,1000"

DEEPSPEED = "deepspeed-cpuadam"
REFERENCE = "torch-fused"


# ---------------------------------------------------------------------------------------------- CPU mode
@dataclass(frozen=True, kw_only=True)
class CpuCandidate:
    name: str
    module: str
    """What must import for the row to run (a missing package marks the row missing, with the reason)."""
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _zeroadam(
    state_dtype: str, offload: Optional[str], skip_nonfinite: bool = True
) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        from zeroadam import ZeroAdam

        return ZeroAdam(
            params, **HYPER, state_dtype=state_dtype, stage=0, offload=offload, skip_nonfinite=skip_nonfinite
        )

    return make


def _deepspeed(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    # Loads the cpu_adam op from ~/.cache/torch_extensions (a first build takes minutes; see step_speed.py).
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, **HYPER, adamw_mode=True)


def _torch_fused(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **HYPER, fused=True)


CPU_CANDIDATES: tuple[CpuCandidate, ...] = (
    CpuCandidate(name=REFERENCE, module="torch", make=_torch_fused),
    CpuCandidate(name=DEEPSPEED, module="deepspeed.ops.adam", make=_deepspeed),
    CpuCandidate(name="zeroadam-offload-fp32", module="zeroadam", make=_zeroadam("fp32", "cpu")),
    CpuCandidate(name="zeroadam-offload-int8", module="zeroadam", make=_zeroadam("int8", "cpu")),
    # skip_nonfinite=False: DeepSpeedCPUAdam's semantics (no check, no read of the gradients before the update);
    # context beside the figure, which is the default's.
    CpuCandidate(name="zeroadam-offload-fp32-noskip", module="zeroadam", make=_zeroadam("fp32", "cpu", False)),
    CpuCandidate(name="zeroadam-fp32", module="zeroadam", make=_zeroadam("fp32", None)),
)


def _state_bytes(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> int:
    stats = getattr(opt, "memory_stats", None)
    if callable(stats):
        s = stats()
        return int(s["state_bytes"]) + int(s["master_bytes"])
    return sum(
        t.numel() * t.element_size()
        for p in params
        for k, t in opt.state.get(p, {}).items()
        if k in ("exp_avg", "exp_avg_sq") and isinstance(t, torch.Tensor)
    )


def _grad_intake_s(opt: torch.optim.Optimizer, repeats: int) -> Optional[float]:
    """Median seconds ZeroAdam's offload engine spends taking the gradients into its host shards (part of every
    step()), timed alone through internal API; None where that API has changed or the optimizer is another."""
    engine = getattr(opt, "engine", None)
    if engine is None or not hasattr(engine, "ensure_reduced"):
        return None
    try:
        def intake() -> None:
            engine._reduced = False
            engine.ensure_reduced()
            engine._clear_grads()

        return time_fn(intake, warmup=1, repeats=repeats).median_s
    except Exception:  # noqa: BLE001 - informational only
        return None


def _missing(name: str, stage: str, reason: str) -> dict[str, Any]:
    return {"candidate": name, "status": "missing", "stage": stage, "reason": reason}


@dataclass
class _Prepared:
    """One candidate on its own copy of the parameters, after its first (state-creating) step."""

    cand: CpuCandidate
    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    construct_s: float
    first_step_s: float


def _prepare_cpu(
    cand: CpuCandidate, init: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> Union[_Prepared, dict[str, Any]]:
    """The candidate ready to be timed, or its missing row."""
    params = [torch.nn.Parameter(t.clone()) for t in init]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    t0 = time.perf_counter()
    try:
        opt = cand.make(params)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return _missing(cand.name, "construct", error_text(exc))
    construct_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        opt.step()  # creates the state
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return _missing(cand.name, "step", error_text(exc))
    return _Prepared(cand, opt, params, construct_s, time.perf_counter() - t0)


def _row_cpu(prep: _Prepared, timing: Timing, repeats: int) -> dict[str, Any]:
    total = sum(p.numel() for p in prep.params)
    return {
        "candidate": prep.cand.name,
        "status": "ok",
        **asdict(timing),
        "construct_s": prep.construct_s,
        "first_step_s": prep.first_step_s,
        "params_per_s": total / timing.median_s,
        "grad_intake_s": _grad_intake_s(prep.opt, max(3, repeats // 2)),
        "state_bytes_per_param": _state_bytes(prep.opt, prep.params) / total,
        "finite": all(bool(torch.isfinite(p.detach()).all()) for p in prep.params),
    }


def _max_rel_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest per-tensor ||a - b|| / ||b||."""
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b))


def run_cpu(
    candidates: Sequence[CpuCandidate], numels: Sequence[int], *, warmup: int, repeats: int, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Availability]]:
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen) * 0.02 for n in numels]
    grads = [torch.randn(n, generator=gen) * 1e-3 for n in numels]
    avail: dict[str, Availability] = {}
    rows: dict[str, dict[str, Any]] = {}
    preps: dict[str, _Prepared] = {}
    for cand in candidates:
        if cand.module not in avail:
            avail[cand.module] = a = probe_import(cand.module)
            print(
                f"# {cand.module}: "
                + (f"{a.version or 'ok'} ({a.import_s:.1f} s import)" if a.ok else f"missing: {a.reason}"),
                flush=True,
            )
        if not avail[cand.module].ok:
            rows[cand.name] = _missing(cand.name, "import", avail[cand.module].reason or "import failed")
            continue
        prep = _prepare_cpu(cand, init, grads)
        if isinstance(prep, _Prepared):
            preps[cand.name] = prep
        else:
            rows[cand.name] = prep
    print(f"# timing {', '.join(preps)} in {repeats} interleaved rounds", flush=True)
    timings = time_interleaved({name: prep.opt.step for name, prep in preps.items()}, warmup=warmup, repeats=repeats)
    finals: dict[str, list[torch.Tensor]] = {}
    for name, prep in preps.items():
        t = timings[name]
        if isinstance(t, Exception):
            rows[name] = _missing(name, "step", error_text(t))
            continue
        rows[name] = _row_cpu(prep, t, repeats)
        # Every candidate took 1 + warmup + repeats steps of the same gradients.
        finals[name] = [p.detach().clone() for p in prep.params]
        print(f"# {name}: {rows[name]['median_s'] * 1e3:.1f} ms", flush=True)
    preps.clear()
    gc.collect()
    by = {r["candidate"]: r for r in rows.values() if r["status"] == "ok"}
    for r in by.values():
        ds = by.get(DEEPSPEED)
        r["speed_vs_deepspeed"] = None if ds is None else paired_ratio(ds["samples_s"], r["samples_s"])
        ref = finals.get(REFERENCE)
        r["max_rel_diff_vs_torch"] = None if ref is None else _max_rel_diff(finals[r["candidate"]], ref)
    return [rows[c.name] for c in candidates], avail


def cpu_figures(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["candidate"]: r for r in rows if r["status"] == "ok"}
    out = []
    fp32, int8, ds = by.get("zeroadam-offload-fp32"), by.get("zeroadam-offload-int8"), by.get(DEEPSPEED)
    if fp32 and ds:
        v = paired_ratio(ds["samples_s"], fp32["samples_s"])
        out.append({"figure": "offload fp32 speed / DeepSpeedCPUAdam speed", "target": ">= 1.0", "value": v, "met": v >= 1.0})
    if fp32 and int8:
        v = paired_ratio(fp32["samples_s"], int8["samples_s"])
        out.append({"figure": "offload int8 speed / offload fp32 speed", "target": ">= 0.5", "value": v, "met": v >= 0.5})
    return out


def cpu_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = [
        "optimizer", "ms/step", "grad intake ms", "Mparams/s", "vs DeepSpeed", "state B/param", "rel diff vs torch",
        "note",
    ]
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["candidate"], "-", "-", "-", "-", "-", "-", f"missing ({r['stage']}): {r['reason'][:90]}"])
            continue
        vs, diff = r.get("speed_vs_deepspeed"), r.get("max_rel_diff_vs_torch")
        out.append(
            [
                r["candidate"],
                f"{r['median_s'] * 1e3:.1f}",
                "-" if r["grad_intake_s"] is None else f"{r['grad_intake_s'] * 1e3:.1f}",
                f"{r['params_per_s'] / 1e6:.1f}",
                "-" if vs is None else f"{vs:.2f}x",
                f"{r['state_bytes_per_param']:.3f}",
                "-" if diff is None else f"{diff:.1e}",
                "" if r["finite"] else "NON-FINITE PARAMETERS",
            ]
        )
    return format_table(headers, out, left=(0, -1))


# ---------------------------------------------------------------------------------------------- CUDA mode
CudaMode = Literal["gpu-int8", "offload-int8", "offload-fp32"]
CUDA_MODES: tuple[CudaMode, ...] = ("gpu-int8", "offload-int8", "offload-fp32")


def _cuda_mode(mode: CudaMode, params_m: float, *, batch: int, ctx: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Train the GPT in bf16 with one mode; raises torch.cuda.OutOfMemoryError when it does not fit."""
    import torch.nn.functional as F

    from zero_scaling import GPT, GPTConfig
    from zeroadam import ZeroAdam

    cfg = GPTConfig.for_params(params_m, ctx=ctx)
    gc.collect()
    torch.cuda.empty_cache()
    model = opt = None
    try:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = GPT(cfg).to(torch.bfloat16)
        # After the build: its fp32 initialisation (twice the bf16 model, briefly) is not what is compared.
        torch.cuda.reset_peak_memory_stats()
        state_dtype = "fp32" if mode == "offload-fp32" else "int8"
        opt = ZeroAdam(
            model.parameters(), **HYPER, state_dtype=state_dtype, offload="cpu" if mode.startswith("offload") else None
        )
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab, (batch, ctx + 1), generator=gen).cuda()
        x, y = tokens[:, :-1], tokens[:, 1:]

        def iteration() -> None:
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
            opt.step()

        it = time_fn(iteration, warmup=warmup, repeats=repeats, device="cuda")
        # The gradients of the last backward are still in place: step() alone re-applies them.
        st = time_fn(opt.step, warmup=1, repeats=repeats, device="cuda")
        return {
            "mode": mode,
            "status": "ok",
            "params": cfg.num_params(),
            "model": {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab": cfg.vocab, "ctx": cfg.ctx},
            "iteration_median_s": it.median_s,
            "iteration_samples_s": it.samples_s,
            "step_median_s": st.median_s,
            "step_samples_s": st.samples_s,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            "memory_stats": opt.memory_stats(),
        }
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()


def run_cuda(params_m: float, *, batch: int, ctx: int, warmup: int, repeats: int) -> tuple[list[dict[str, Any]], float]:
    """Every mode at the largest of params_m, params_m / 2, ... (three halvings at most) at which all fit."""
    size = params_m
    for attempt in range(4):
        rows: list[dict[str, Any]] = []
        try:
            for mode in CUDA_MODES:
                print(f"# {mode} @ {size:g}M ...", end="", flush=True)
                rows.append(_cuda_mode(mode, size, batch=batch, ctx=ctx, warmup=warmup, repeats=repeats))
                r = rows[-1]
                print(f" {r['iteration_median_s'] * 1e3:.0f} ms/iteration, peak {r['peak_gpu_bytes'] / 2**30:.2f} GiB", flush=True)
            return rows, size
        except torch.cuda.OutOfMemoryError as exc:
            print(f" out of memory ({error_text(exc, 160)})", flush=True)
            if attempt == 3:
                raise
            size /= 2
    raise AssertionError("unreachable")


def cuda_figures(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["mode"]: r for r in rows if r["status"] == "ok"}
    gpu, off = by.get("gpu-int8"), by.get("offload-int8")
    if not (gpu and off):
        return []
    v = off["iteration_median_s"] / gpu["iteration_median_s"]
    return [
        {
            "figure": "offload int8 iteration / on-GPU int8 iteration",
            "target": "<= 1.3",
            "value": v,
            "met": v <= 1.3,
            # step() alone: what offloading adds, without the forward and backward that it is compared against.
            "step_only_ratio": off["step_median_s"] / gpu["step_median_s"],
        }
    ]


def cuda_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["mode", "params", "ms/iteration", "ms/step()", "peak GPU GiB", "state+master (host or GPU) GiB"]
    out = []
    for r in rows:
        m = r["memory_stats"]
        out.append(
            [
                r["mode"],
                f"{r['params'] / 1e6:,.0f}M",
                f"{r['iteration_median_s'] * 1e3:.0f}",
                f"{r['step_median_s'] * 1e3:.0f}",
                f"{r['peak_gpu_bytes'] / 2**30:.2f}",
                f"{(m['state_bytes'] + m['master_bytes']) / 2**30:.2f}",
            ]
        )
    return format_table(headers, out, left=(0,))


# ---------------------------------------------------------------------------------------------- main
def _print_figures(figs: Sequence[dict[str, Any]]) -> None:
    for f in figs:
        print(f"# figure: {f['figure']}: {f['value']:.3f} (target {f['target']}) {'met' if f['met'] else 'NOT met'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--numels", default=DEFAULT_NUMELS, help=f"CPU mode: parameter sizes (default {DEFAULT_NUMELS})")
    ap.add_argument("--only", help=f"CPU mode: comma-separated subset of {', '.join(c.name for c in CPU_CANDIDATES)}")
    ap.add_argument("--threads", type=int, help="CPU threads for torch, ZeroAdam's kernel and DeepSpeed's OpenMP")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps (iterations in CUDA mode); median reported")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    ap.add_argument("--params-m", type=float, default=1000.0, help="CUDA mode: model size in millions (default 1000)")
    ap.add_argument("--batch", type=int, default=8, help="CUDA mode: sequences per iteration")
    ap.add_argument("--ctx", type=int, default=1024, help="CUDA mode: tokens per sequence")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"invalid --threads={args.threads!r}; expected at least 1")
        # DeepSpeed's op reads OMP_NUM_THREADS when its OpenMP runtime starts, i.e. at its first import.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(
                f"offload: --device cuda needs a CUDA GPU, and torch {torch.__version__} sees none; nothing was run. "
                "Run the CPU comparison without --device, or this mode on a GPU machine.",
                file=sys.stderr,
            )
            return 2
        machine = describe_machine("cuda")
        print(f"# {machine.get('gpu_name')}, {machine['cpu_model']}, torch {machine['torch']}", flush=True)
        rows, size = run_cuda(args.params_m, batch=args.batch, ctx=args.ctx, warmup=args.warmup, repeats=args.repeats)
        figs = cuda_figures(rows)
        print(f"\nbf16 GPT, {rows[0]['params'] / 1e6:,.0f}M parameters, batch {args.batch} x {args.ctx} tokens")
        print(cuda_table(rows))
        _print_figures(figs)
        path = write_json(
            "offload_cuda.json",
            {
                "benchmark": "offload",
                "machine": machine,
                "config": {
                    "device": "cuda",
                    "params_m_requested": args.params_m,
                    "params_m_run": size,
                    "batch": args.batch,
                    "ctx": args.ctx,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "param_dtype": "bfloat16",
                    "hyper": HYPER,
                },
                "rows": rows,
                "figures": figs,
            },
        )
        print(f"\nwrote {path}")
        return 0

    try:
        numels = parse_sizes(args.numels)
    except ValueError as exc:
        ap.error(str(exc).replace("--sizes", "--numels"))
    candidates = list(CPU_CANDIDATES)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = wanted - {c.name for c in CPU_CANDIDATES}
        if unknown:
            ap.error(f"invalid --only entries {sorted(unknown)}; known: {', '.join(c.name for c in CPU_CANDIDATES)}")
        candidates = [c for c in candidates if c.name in wanted]
    machine = describe_machine("cpu")
    total = sum(numels)
    print(
        f"# {machine['cpu_model']}, {machine['cpu_usable']} cores, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, load {machine['loadavg_1_5_15']}",
        flush=True,
    )
    rows, avail = run_cpu(candidates, numels, warmup=args.warmup, repeats=args.repeats)
    machine["loadavg_after"] = describe_machine("cpu")["loadavg_1_5_15"]
    figs = cpu_figures(rows)
    print(f"\none AdamW step over {len(numels)} fp32 parameters, {total:,} elements on cpu; median of {args.repeats}")
    print(cpu_table(rows))
    _print_figures(figs)
    path = write_json(
        "offload_cpu.json",
        {
            "benchmark": "offload",
            "machine": machine,
            "config": {
                "device": "cpu",
                "numels": numels,
                "total_elements": total,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "threads": args.threads,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "param_dtype": "float32",
                "grad_dtype": "float32",
                "hyper": HYPER,
                "reference": REFERENCE,
            },
            "availability": dict(avail),
            "rows": rows,
            "figures": figs,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
