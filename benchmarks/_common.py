"""Helpers shared by the benchmark scripts: timing, a description of the machine, JSON results, and the
detection of optional competitors.

The scripts in ``benchmarks/`` are run as files (``python benchmarks/step_speed.py``), so they import this
module as ``_common``: the script's folder is first on ``sys.path``.

[Note: timing]
Every measurement is a median over ``repeats`` calls after ``warmup`` untimed calls, taken with
``time.perf_counter`` and, for CUDA, a device synchronize before the clock starts and before it stops. The
median, not the mean, because the other processes on a shared machine add long one-sided outliers; the
minimum and every sample are kept in the JSON too, so a noisy run can be recognised afterwards. The machine's
load average is recorded for the same reason.

[Note: interleaved timing]
On a shared machine the memory bandwidth left to us drifts over seconds (other tenants' load), and consecutive
runs of one optimizer after another catch different drifts: a ratio of two medians taken a minute apart moved by
20-40% between runs on the 2-core development VM. ``time_interleaved`` times round r of every function back to
back, the order rotating each round so that none always follows the same neighbour, and ``paired_ratio`` is the
median over rounds of the per-round ratio: paired samples, taken under the same conditions.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "BENCH_DIR",
    "RESULTS_DIR",
    "DeviceKind",
    "Timing",
    "time_fn",
    "time_interleaved",
    "paired_ratio",
    "synchronize",
    "describe_machine",
    "write_json",
    "Availability",
    "probe_import",
    "error_text",
    "format_table",
    "parse_sizes",
]

BENCH_DIR: Path = Path(__file__).resolve().parent
RESULTS_DIR: Path = BENCH_DIR / "results"

DeviceKind = Literal["cpu", "cuda"]


# ---------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Seconds per call of one timed function (see [Note: timing])."""

    median_s: float
    min_s: float
    max_s: float
    samples_s: list[float]


def synchronize(device: DeviceKind) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int, repeats: int, device: DeviceKind = "cpu") -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"time_fn: invalid repeats={repeats!r}; expected at least 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), max(samples), samples)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int, device: DeviceKind = "cpu"
) -> dict[str, Union[Timing, Exception]]:
    """Per name, the median wall time of its function over ``repeats`` interleaved rounds after ``warmup`` untimed
    calls each (see [Note: interleaved timing]); a function that raises is dropped from later rounds, and its
    exception (traceback printed) stands in for its timing."""
    if repeats < 1:
        raise ValueError(f"time_interleaved: invalid repeats={repeats!r}; expected at least 1")
    out: dict[str, Union[Timing, Exception]] = {}
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str, timed: bool) -> None:
        try:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
        except Exception as exc:  # noqa: BLE001 - one failing competitor does not stop the others
            traceback.print_exc(file=sys.stderr)
            out[name] = exc
            return
        if timed:
            samples[name].append(time.perf_counter() - t0)

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            if name not in out:
                call(name, timed=False)
    for r in range(repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if name not in out:
                call(name, timed=True)
    for name, t in samples.items():
        if name not in out:
            out[name] = Timing(statistics.median(t), min(t), max(t), t)
    return out


def paired_ratio(base: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of base time / other time: the other's speed relative to the base."""
    return statistics.median(b / t for b, t in zip(base, other))


# ---------------------------------------------------------------------------------------------- machine
# SIMD extensions that decide which vectorised CPU kernels run (torch's fused AdamW, DeepSpeed's cpu_adam).
_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, SIMD flags of interest) from /proc/cpuinfo, first processor; falls back to platform."""
    model: Optional[str] = None
    flags: Optional[list[str]] = None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            present = set(value.split())
            flags = [f for f in _SIMD_FLAGS if f in present]
    return model or platform.processor() or "unknown", flags or []


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine(device: DeviceKind = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, load, torch, and the GPU when CUDA is used."""
    model, simd = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": model,
        "cpu_simd": simd,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": _loadavg(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "zeroadam_commit": _git_commit(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sm_count=props.multi_processor_count,
        )
    return info


# ---------------------------------------------------------------------------------------------- results
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` (plus a UTC timestamp) to ``results_dir/name`` and return the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / name
    body = {"created_utc": _now(), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    # Written beside and renamed, so an interrupted run never leaves half a file for run_all's plots.
    tmp.write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------- competitors
@dataclass(frozen=True)
class Availability:
    """Whether an optional package imports, and if not, the error that says why."""

    module: str
    ok: bool
    version: Optional[str] = None
    reason: Optional[str] = None
    import_s: float = 0.0
    """Seconds the import took (DeepSpeed's is long enough to be worth knowing)."""


def error_text(exc: BaseException, limit: int = 600) -> str:
    """One line naming the exception, trimmed; the full traceback goes to stderr instead of the results."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe_import(module: str, *, verbose: bool = True) -> Availability:
    """Import ``module``; never raises (a broken install reports the import error, it does not end the run)."""
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(module)
    except BaseException as exc:  # noqa: BLE001 - a broken package may raise anything, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        if verbose:
            traceback.print_exc(file=sys.stderr)
        return Availability(module, False, reason=error_text(exc), import_s=time.perf_counter() - t0)
    # Submodules (torchao.optim, deepspeed.ops.adam) carry no version; their package does.
    top = sys.modules.get(module.split(".")[0], mod)
    version = getattr(mod, "__version__", None) or getattr(top, "__version__", None)
    return Availability(
        module, True, version=None if version is None else str(version), import_s=time.perf_counter() - t0
    )


# ---------------------------------------------------------------------------------------------- output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: Sequence[int] = (0,)) -> str:
    """A plain fixed-width table; the columns in ``left`` are left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lefts = {i % len(headers) for i in left}

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in lefts else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def parse_sizes(text: str) -> list[int]:
    """Comma-separated element counts; each may be an integer, ``2^k`` or ``2**k`` (``20000000,2^24``)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        base, sep, exp = part.partition("^") if "^" in part else part.partition("**")
        try:
            n = int(base) ** int(exp) if sep else int(part)
        except ValueError:
            raise ValueError(f"invalid --sizes entry {part!r}; expected an integer, 2^k or 2**k") from None
        if n < 1:
            raise ValueError(f"invalid --sizes entry {part!r}; expected a positive number of elements")
        sizes.append(n)
    if not sizes:
        raise ValueError(f"invalid --sizes={text!r}; expected at least one size")
    return sizes
