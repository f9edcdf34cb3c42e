"""Speed of one optimizer step: ZeroAdam's three state formats against torch.optim.AdamW and 8-bit / CPU
competitors, all measured in the same process on the same parameter sizes.

    python benchmarks/step_speed.py                                # one 20M-element fp32 parameter on CPU
    python benchmarks/step_speed.py --sizes 2^24,2^27 --device cuda --repeats 20
    python benchmarks/step_speed.py --only zeroadam-int8,torch-fused

Each row times ``optimizer.step()`` on one fp32 parameter with a fixed fp32 gradient (median of
``--repeats`` steps after ``--warmup`` steps; see ``_common`` [Note: timing]), by default in rounds that step
every optimizer once, so that ratios compare steps taken under the same load (``_common`` [Note: interleaved
timing]). The table and
``benchmarks/results/step_speed_<device>.json`` give, per optimizer: parameters updated per second, the
effective memory bandwidth under the traffic model below, the ratio of its speed to torch's fused AdamW, and
the optimizer state it holds per parameter. A competitor that cannot run (package missing, import error, no
support for the device, an error in its step) is listed as missing with the reason; the run goes on.

[Note: traffic model]
The bytes an AdamW step must move per element if each tensor is read once and written once (what a single
fused kernel moves; compositions of torch ops move more, in temporaries, and the model does not count them).
For an fp32 parameter with an fp32 gradient:

    optimizer                                   param r+w   grad r   exp_avg + exp_avg_sq r+w         total B
    torch AdamW foreach / fused, ZeroAdam fp32,     4 + 4       4    2 x (4 + 4)                           28
      DeepSpeedCPUAdam
    ZeroAdam bf16                                   4 + 4       4    2 x (2 + 2)                           20
    ZeroAdam int8, bitsandbytes AdamW8bit,          4 + 4       4    2 x (1 + 1) + 2 x 2 x 4 / 256    16.0625
      torchao AdamW8bit                                              (one fp32 absmax per 256 elements per moment)

The 256-entry code tables of bitsandbytes and torchao (1 KiB each) stay in cache and are not counted, nor are
ZeroAdam's read of every gradient before the update (4 B; the "-noskip" row, ``skip_nonfinite=False``, has none)
and the clipping passes of the "+clip" rows (see
[Note: rows with clipping]). The
"GB/s" column is (total B x elements) / median step time: an effective bandwidth, comparable between rows,
not a hardware counter. Where an optimizer silently keeps another format than its nominal one (torchao keeps
fp32 moments when numel is not a multiple of its block size, 256), the measured state bytes replace the
nominal ones in the model and the row says so.

"state B/param" is what the optimizer holds for the parameter besides the parameter and gradient:
``memory_stats()`` state + master bytes for ZeroAdam, the bytes of every tensor in ``optimizer.state[p]``
(tensor subclasses such as torchao's ``OptimState8bit`` counted through their inner tensors) for the others.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from _common import (
    Availability,
    DeviceKind,
    describe_machine,
    error_text,
    format_table,
    parse_sizes,
    probe_import,
    Timing,
    paired_ratio,
    synchronize,
    time_fn,
    time_interleaved,
    write_json,
)

__all__ = ["Candidate", "build_candidates", "traffic_bytes", "state_bytes_of", "run", "main"]

Family = Literal["zeroadam", "torch", "bitsandbytes", "torchao", "deepspeed"]

# The same hyperparameters for every optimizer; weight decay on, so its term is part of every update.
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

PARAM_BYTES = 4  # fp32 parameter
GRAD_BYTES = 4  # fp32 gradient
INT8_STATE = 2 * (1 + 4 / 256)  # two 1-byte codes + one fp32 absmax per 256 elements per moment
BASELINE = "torch-fused"


def traffic_bytes(state_bytes_per_param: float) -> float:
    """Bytes one step must move per element (see [Note: traffic model])."""
    return 2 * PARAM_BYTES + GRAD_BYTES + 2 * state_bytes_per_param


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One optimizer configuration to time."""

    name: str
    """Row label, also accepted by --only / --skip."""
    family: Family
    """The package it comes from; a package that does not import marks all its rows missing."""
    module: str
    """What to import to find out whether the family is available."""
    nominal_state_bytes: float
    """exp_avg + exp_avg_sq bytes per parameter in the intended format (traffic model input)."""
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    devices: tuple[DeviceKind, ...] = ("cpu", "cuda")
    device_note: str = ""
    """Why the optimizer does not run on the devices it lacks."""


# [Note: rows with clipping]
# ZeroAdam reads every gradient before it updates (the global norm: it finds non-finite gradients, so that a step
# can be skipped with the state untouched, and gives the clip coefficient). torch's fused AdamW checks nothing, so
# the plain rows compare a checked step with an unchecked one. The "+clip" rows compare equal work, the way most
# training loops run: torch.nn.utils.clip_grad_norm_ (a norm pass, then a pass that scales every gradient in place)
# before torch's fused step, against ZeroAdam(max_grad_norm=...), whose coefficient is applied inside the update.
# CLIP_NORM is below the gradient's norm, so every step clips.
CLIP_NORM = 1e-3


def _zeroadam(
    state_dtype: str, backend: Optional[str], max_grad_norm: Optional[float] = None, skip_nonfinite: bool = True
) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        from zeroadam import ZeroAdam

        return ZeroAdam(
            params, **HYPER, state_dtype=state_dtype, backend=backend, max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
        )

    return make


def _torch_adamw(impl: Literal["foreach", "fused"]) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, **HYPER, **{impl: True})

    return make


class _ClippedAdamW(torch.optim.AdamW):
    """torch's fused AdamW whose step first clips the gradients by their global norm, as a training loop does."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], CLIP_NORM)
        return super().step(closure)


def _torch_fused_clipped(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return _ClippedAdamW(params, **HYPER, fused=True)


def _bnb(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **HYPER)


def _torchao(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, **HYPER)


def _deepspeed(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    # The constructor JIT-builds the cpu_adam C++ op, or loads it from ~/.cache/torch_extensions: the first
    # build took 457 s on a busy 2-core machine, a cached load about 13 s (both in construct_s).
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, **HYPER, adamw_mode=True)


def build_candidates(zeroadam_backend: Optional[str] = None) -> tuple[Candidate, ...]:
    """Every optimizer configuration, in table order (competitors that import slowly last)."""
    return (
        Candidate(
            name="zeroadam-int8",
            family="zeroadam",
            module="zeroadam",
            nominal_state_bytes=INT8_STATE,
            make=_zeroadam("int8", zeroadam_backend),
        ),
        Candidate(
            name="zeroadam-bf16",
            family="zeroadam",
            module="zeroadam",
            nominal_state_bytes=4.0,
            make=_zeroadam("bf16", zeroadam_backend),
        ),
        Candidate(
            name="zeroadam-fp32",
            family="zeroadam",
            module="zeroadam",
            nominal_state_bytes=8.0,
            make=_zeroadam("fp32", zeroadam_backend),
        ),
        # Without the non-finite skip (skip_nonfinite=False), i.e. with torch's and DeepSpeed's semantics: no read
        # of the gradient before the update. Context for the figures, which are the default's.
        Candidate(
            name="zeroadam-fp32-noskip",
            family="zeroadam",
            module="zeroadam",
            nominal_state_bytes=8.0,
            make=_zeroadam("fp32", zeroadam_backend, skip_nonfinite=False),
        ),
        Candidate(
            name="torch-foreach", family="torch", module="torch", nominal_state_bytes=8.0, make=_torch_adamw("foreach")
        ),
        Candidate(name=BASELINE, family="torch", module="torch", nominal_state_bytes=8.0, make=_torch_adamw("fused")),
        # See [Note: rows with clipping].
        Candidate(
            name="zeroadam-int8+clip",
            family="zeroadam",
            module="zeroadam",
            nominal_state_bytes=INT8_STATE,
            make=_zeroadam("int8", zeroadam_backend, CLIP_NORM),
        ),
        Candidate(
            name="zeroadam-fp32+clip",
            family="zeroadam",
            module="zeroadam",
            nominal_state_bytes=8.0,
            make=_zeroadam("fp32", zeroadam_backend, CLIP_NORM),
        ),
        Candidate(
            name="torch-fused+clip", family="torch", module="torch", nominal_state_bytes=8.0, make=_torch_fused_clipped
        ),
        Candidate(
            name="bnb-adamw8bit",
            family="bitsandbytes",
            module="bitsandbytes",
            nominal_state_bytes=INT8_STATE,
            make=_bnb,
        ),
        Candidate(
            name="torchao-adamw8bit",
            family="torchao",
            module="torchao.optim",
            nominal_state_bytes=INT8_STATE,
            make=_torchao,
        ),
        Candidate(
            name="deepspeed-cpuadam",
            family="deepspeed",
            module="deepspeed.ops.adam",
            nominal_state_bytes=8.0,
            make=_deepspeed,
            devices=("cpu",),
            device_note="DeepSpeedCPUAdam updates CPU tensors only (DeepSpeed's GPU optimizer is FusedAdam)",
        ),
    )


# ---------------------------------------------------------------------------------------------- state size
def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor; a wrapper subclass (torchao's OptimState8bit) is counted through its inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes_of(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> int:
    """Bytes of optimizer state held for ``params`` (see the module docstring)."""
    stats = getattr(opt, "memory_stats", None)
    if callable(stats):
        s = stats()
        return int(s["state_bytes"]) + int(s["master_bytes"])
    total = 0
    for p in params:
        for value in opt.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                total += _tensor_bytes(value)
    return total


def _zeroadam_backend(opt: torch.optim.Optimizer, p: torch.Tensor) -> Optional[str]:
    """Which backend ZeroAdam chose for ``p`` (internal API: None where it has changed)."""
    try:
        from zeroadam.update.contract import Run
        from zeroadam.update.dispatch import backend_for

        st = opt.state[p]
        run_ = Run(param=p.detach().view(-1), grad=p.grad.view(-1), moments=st.moments, master=st.master, index_base=0)
        return backend_for(run_, getattr(opt, "_backend", None))[0]
    except Exception:  # noqa: BLE001 - informational only
        return None


# ---------------------------------------------------------------------------------------------- measuring
def _missing(cand: Candidate, size: int, stage: str, reason: str) -> dict[str, Any]:
    return {
        "candidate": cand.name,
        "family": cand.family,
        "size": size,
        "status": "missing",
        "stage": stage,
        "reason": reason,
    }


@dataclass
class _Prepared:
    """One candidate, constructed and stepped once (its state exists), ready to be timed."""

    cand: Candidate
    opt: torch.optim.Optimizer
    p: torch.Tensor  # 1D [size]: the parameter, with its fixed gradient
    construct_s: float
    first_step_s: float


def _prepare(cand: Candidate, size: int, device: DeviceKind, seed: int = 0) -> "_Prepared | dict[str, Any]":
    """The candidate on one fresh parameter of ``size`` elements after its first (state-creating) step, or its
    missing row."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Values drawn on the CPU so every device and run steps the same numbers.
    p = torch.nn.Parameter((torch.randn(size, generator=gen) * 0.02).to(device))
    p.grad = (torch.randn(size, generator=gen) * 1e-3).to(device)
    t0 = time.perf_counter()
    try:
        opt = cand.make([p])
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return _missing(cand, size, "construct", error_text(exc))
    construct_s = time.perf_counter() - t0
    try:
        synchronize(device)
        t0 = time.perf_counter()
        opt.step()  # creates the state; torchao compiles here
        synchronize(device)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return _missing(cand, size, "step", error_text(exc))
    return _Prepared(cand, opt, p, construct_s, time.perf_counter() - t0)


def _row(prep: _Prepared, size: int, timing: Timing) -> dict[str, Any]:
    cand, opt, p = prep.cand, prep.opt, prep.p
    state_b = state_bytes_of(opt, [p]) / size
    nominal = cand.nominal_state_bytes
    note = ""
    model_state = nominal
    if abs(state_b - nominal) > 0.05 * nominal:
        model_state = state_b
        note = f"holds {state_b:.3g} B/param of state, not the nominal {nominal:.3g}: its format fell back"
    traffic = traffic_bytes(model_state)
    row = {
        "candidate": cand.name,
        "family": cand.family,
        "size": size,
        "status": "ok",
        **asdict(timing),
        "construct_s": prep.construct_s,
        "first_step_s": prep.first_step_s,
        "params_per_s": size / timing.median_s,
        "traffic_bytes_per_elem": traffic,
        "effective_gb_per_s": traffic * size / timing.median_s / 1e9,
        "state_bytes_per_param": state_b,
        "nominal_state_bytes_per_param": nominal,
        "finite": bool(torch.isfinite(p.detach()).all()),
        "note": note,
    }
    if cand.family == "zeroadam":
        row["zeroadam_backend"] = _zeroadam_backend(opt, p)
    return row


def _release(device: DeviceKind) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(
    cand: Candidate, size: int, device: DeviceKind, *, warmup: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """Time ``repeats`` consecutive steps of one candidate on one fresh parameter of ``size`` elements."""
    prep = _prepare(cand, size, device, seed)
    if not isinstance(prep, _Prepared):
        _release(device)
        return prep
    try:
        timing = time_fn(prep.opt.step, warmup=warmup, repeats=repeats, device=device)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return _missing(cand, size, "step", error_text(exc))
    else:
        return _row(prep, size, timing)
    finally:
        del prep
        _release(device)


def measure_interleaved(
    cands: Sequence[Candidate], size: int, device: DeviceKind, *, warmup: int, repeats: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows of every candidate on its own copy of the same parameter, timed in interleaved rounds (``_common``
    [Note: interleaved timing]); every candidate's state is held at once."""
    rows: dict[str, dict[str, Any]] = {}
    preps: dict[str, _Prepared] = {}
    try:
        for cand in cands:
            prep = _prepare(cand, size, device, seed)
            if isinstance(prep, _Prepared):
                preps[cand.name] = prep
            else:
                rows[cand.name] = prep
        print(f"# {size:,} elements: timing {', '.join(preps)} in {repeats} interleaved rounds", flush=True)
        timings = time_interleaved(
            {name: prep.opt.step for name, prep in preps.items()}, warmup=warmup, repeats=repeats, device=device
        )
        for name, prep in preps.items():
            t = timings[name]
            rows[name] = _missing(prep.cand, size, "step", error_text(t)) if isinstance(t, Exception) else _row(prep, size, t)
    finally:
        preps.clear()
        _release(device)
    return [rows[c.name] for c in cands]


def run(
    candidates: Sequence[Candidate],
    sizes: Sequence[int],
    device: DeviceKind,
    *,
    warmup: int,
    repeats: int,
    interleave: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Availability]]:
    """All rows (sizes x candidates, missing ones included) and the import result of each family."""
    avail: dict[str, Availability] = {}
    for cand in candidates:
        if device in cand.devices and cand.family not in avail:
            avail[cand.family] = probe_import(cand.module)
            a = avail[cand.family]
            print(
                f"# {cand.family}: "
                + (f"{a.version or 'ok'} ({a.import_s:.1f} s import)" if a.ok else f"missing: {a.reason}"),
                flush=True,
            )
    rows: list[dict[str, Any]] = []
    for size in sizes:
        runnable = []
        for cand in candidates:
            if device not in cand.devices:
                rows.append(_missing(cand, size, "device", cand.device_note or f"does not run on {device}"))
            elif not avail[cand.family].ok:
                rows.append(_missing(cand, size, "import", avail[cand.family].reason or "import failed"))
            else:
                runnable.append(cand)
        if interleave:
            rows += measure_interleaved(runnable, size, device, warmup=warmup, repeats=repeats)
        else:
            for cand in runnable:
                print(f"# {cand.name} @ {size:,} ...", end="", flush=True)
                row = measure(cand, size, device, warmup=warmup, repeats=repeats)
                print(
                    f" {row['median_s'] * 1e3:.2f} ms" if row["status"] == "ok" else f" missing ({row['reason']})",
                    flush=True,
                )
                rows.append(row)
        base = next((r for r in rows if r["size"] == size and r["candidate"] == BASELINE and r["status"] == "ok"), None)
        for r in rows:
            if r["size"] == size and r["status"] == "ok":
                if base is None:
                    r["ratio_vs_torch_fused"] = None
                elif interleave:
                    r["ratio_vs_torch_fused"] = paired_ratio(base["samples_s"], r["samples_s"])
                else:
                    r["ratio_vs_torch_fused"] = r["params_per_s"] / base["params_per_s"]
    return rows, avail


def table(rows: Sequence[dict[str, Any]], size: int) -> str:
    headers = ["optimizer", "ms/step", "Mparams/s", "B/elem", "GB/s", "vs fused", "state B/param", "note"]
    out = []
    for r in rows:
        if r["size"] != size:
            continue
        if r["status"] != "ok":
            out.append([r["candidate"], "-", "-", "-", "-", "-", "-", f"missing ({r['stage']}): {r['reason'][:90]}"])
            continue
        ratio = r.get("ratio_vs_torch_fused")
        note = r["note"] + ("" if r["finite"] else " NON-FINITE PARAMETERS")
        if r.get("zeroadam_backend"):
            note = f"backend={r['zeroadam_backend']} " + note
        out.append(
            [
                r["candidate"],
                f"{r['median_s'] * 1e3:.2f}",
                f"{r['params_per_s'] / 1e6:.1f}",
                f"{r['traffic_bytes_per_elem']:.4g}",
                f"{r['effective_gb_per_s']:.2f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{r['state_bytes_per_param']:.3f}",
                note.strip(),
            ]
        )
    return format_table(headers, out, left=(0, -1))


def _select(all_: Sequence[Candidate], only: Optional[str], skip: Optional[str]) -> list[Candidate]:
    names = {c.name for c in all_}
    chosen = list(all_)
    for arg, value in (("--only", only), ("--skip", skip)):
        if value is None:
            continue
        wanted = {v.strip() for v in value.split(",") if v.strip()}
        unknown = wanted - names
        if unknown:
            raise ValueError(f"invalid {arg} entries {sorted(unknown)}; known: {', '.join(sorted(names))}")
        chosen = [c for c in chosen if (c.name in wanted) == (arg == "--only")]
    return chosen


def _missing_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One entry per optimizer that did not run, with its reason (the first size's, if sizes differ)."""
    seen: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["status"] != "ok" and r["candidate"] not in seen:
            seen[r["candidate"]] = {"candidate": r["candidate"], "stage": r["stage"], "reason": r["reason"]}
    return list(seen.values())


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes", default="20000000", help="comma-separated element counts, e.g. 2000000,2^24 (default 20000000)"
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer and size (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (state-creating) step")
    ap.add_argument("--only", help="comma-separated optimizer names to run")
    ap.add_argument("--skip", help="comma-separated optimizer names to leave out")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads before measuring (default: torch's choice)")
    ap.add_argument("--zeroadam-backend", choices=("torch", "cpu", "triton"), help="force ZeroAdam's backend")
    ap.add_argument("--out", help="result file name under benchmarks/results (default step_speed_<device>.json)")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="time each optimizer's steps in one run, one optimizer after another, holding one state at a time "
        "(default: interleaved rounds, every state held at once; see _common's [Note: interleaved timing])",
    )
    args = ap.parse_args(argv)

    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        ap.error(str(exc))
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    device: DeviceKind = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"step_speed: --device cuda, but torch sees no CUDA device (torch {torch.__version__}); nothing was run",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        candidates = _select(build_candidates(args.zeroadam_backend), args.only, args.skip)
    except ValueError as exc:
        ap.error(str(exc))

    machine = describe_machine(device)
    print(
        f"# {machine['cpu_model']}, {machine['cpu_usable']} cores, torch {machine['torch']}, "
        f"{machine.get('gpu_name', 'no GPU')}, load {machine['loadavg_1_5_15']}",
        flush=True,
    )
    rows, avail = run(
        candidates, sizes, device, warmup=args.warmup, repeats=args.repeats, interleave=not args.sequential
    )
    machine["loadavg_after"] = describe_machine("cpu")["loadavg_1_5_15"]

    for size in sizes:
        how = "consecutive steps" if args.sequential else "interleaved rounds, ratios paired per round"
        print(f"\none AdamW step, {size:,} fp32 elements on {device}; median of {args.repeats} ({how})")
        print(table(rows, size))
    path = write_json(
        args.out or f"step_speed_{device}.json",
        {
            "benchmark": "step_speed",
            "machine": machine,
            "config": {
                "sizes": sizes,
                "device": device,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "param_dtype": "float32",
                "grad_dtype": "float32",
                "hyper": HYPER,
                "baseline": BASELINE,
                "zeroadam_backend": args.zeroadam_backend,
                "timing": "sequential" if args.sequential else "interleaved",
            },
            "traffic_model": "B/elem = 2*param(4) + grad(4) + 2*state B/param (step_speed.py [Note: traffic model])",
            "availability": dict(avail),
            "rows": rows,
            "missing": _missing_summary(rows),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
