"""The checks and measurements that need an NVIDIA GPU, in one command for a machine that has one.

    python benchmarks/gpu_suite.py                       # tests, step_speed, int8 bandwidth, offload, in 480 s
    python benchmarks/gpu_suite.py --sizes 2^24 --skip-tests
    python benchmarks/gpu_suite.py --budget 540 --copy-to /some/dir   # and copy every result file there

On a machine with torch and Triton already installed and no network, install the package without its
dependencies (into a folder of its own: no build isolation, nothing fetched; a setuptools of 70 or later builds
it without the wheel package), then run the suite, in one command:

    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/zeroadam-site . && \
        PYTHONPATH=/tmp/zeroadam-site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --copy-to DIR

Parts, each recorded in ``benchmarks/results/gpu_suite_<gpu>.json`` (``<gpu>``: the device name in lower
case, e.g. ``gpu_suite_nvidia-h100-80gb-hbm3.json``; the name itself is in the file):

1. ``pytest tests/test_cuda.py`` and the CUDA tests of tests/test_param_offload.py (``MORE_CUDA_TESTS``) in a
   subprocess (recorded as missing when tests/test_cuda.py does not exist).
2. ``step_speed.py --device cuda`` over ``--sizes`` (default 2^24 and 2^27 elements) in a subprocess; it
   writes its own ``step_speed_cuda.json``, and every row here gets its fraction of the card's peak.
3. The achieved memory bandwidth of ZeroAdam's int8 step: bytes it must move (16.0625 per element, see
   step_speed.py [Note: traffic model]) / median step time, against the card's peak, beside a plain
   device-to-device copy that shows what the card reaches in practice.
4. ``offload.py --device cuda`` (``--offload-params-m``, default 1000: a ~1B-parameter bf16 GPT trained with int8
   state on the GPU and with int8 / fp32 state offloaded to the host) in a subprocess; it writes
   ``offload_cuda.json``.

[Note: the suite's time budget]
A GPU may be lent for minutes only, so the suite runs within ``--budget`` seconds of wall time (default 480, under
a 10-minute command limit with room for the install). The parts run in order of what they are worth (the tests
first: correctness before speed), each with a timeout of the smaller of its own cap and what the budget has left
once the later parts' minimums are set aside; a part that runs out is recorded as "timeout" and the suite goes on.
The JSON is rewritten after every part, and with ``--copy-to`` every result file is copied there each time, so
that a run stopped from outside still leaves what it measured.

Exit status: 0 when every part ran and the tests passed; 1 when a part failed (tests failed or errored, a
subprocess failed or timed out); 2 when torch sees no CUDA device, in which case nothing is run or written.
2 is not 0 so that a driver can tell "this machine cannot run the suite" from "the suite passed", and not 1
so that it is not mistaken for a failure of the code.

[Note: peak bandwidth]
Peak DRAM bandwidth by device name, from the vendors' datasheets (TB/s = 1e12 bytes/s):

    card                            name reported by CUDA (examples)        TB/s
    H200 (SXM / NVL)                NVIDIA H200, NVIDIA H200 NVL            4.8
    GH200, 144 GB HBM3e             NVIDIA GH200 144G HBM3e                 4.9
    GH200, 96 GB HBM3               NVIDIA GH200 480GB                      4.0
    H100 NVL (94 GB)                NVIDIA H100 NVL                         3.9
    H100 PCIe (80 GB)               NVIDIA H100 PCIe                        2.0
    H100 SXM5 (80 GB HBM3)          NVIDIA H100 80GB HBM3                   3.35
    A100 80 GB PCIe                 NVIDIA A100 80GB PCIe                   1.935
    A100 80 GB SXM4                 NVIDIA A100-SXM4-80GB                   2.039
    A100 40 GB (SXM4 / PCIe)        NVIDIA A100-SXM4-40GB                   1.555
    L40S / L40                      NVIDIA L40S                             0.864
    L4                              NVIDIA L4                               0.300
    A10 / A10G                      NVIDIA A10G                             0.600
    V100 (16 / 32 GB)               Tesla V100-SXM2-32GB                    0.900
    RTX 4090                        NVIDIA GeForce RTX 4090                 1.008

Rows are tried in order and the first whose words all occur in the name wins (so "H100 NVL" is tried before
"H100"). A card that is not listed gets 2 x memory clock x bus width from its CUDA properties, the same
formula torch.cuda uses, and the JSON says which source gave the number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from _common import BENCH_DIR, RESULTS_DIR, describe_machine, parse_sizes, time_fn, write_json

__all__ = [
    "PEAKS", "peak_bandwidth", "run_cuda_tests", "run_step_speed", "run_offload", "Budget", "int8_bandwidth",
    "copy_bandwidth", "main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_CUDA = 2

REPO = BENCH_DIR.parent
CUDA_TESTS = REPO / "tests" / "test_cuda.py"
# CUDA tests that live beside their CPU counterparts: pinned parameter shards and the copy/compute overlap of
# shard_model(offload_params=True), measured on the profiler's timeline.
MORE_CUDA_TESTS = (
    "tests/test_param_offload.py::test_cuda_shards_are_pinned_and_the_device_holds_no_parameter_bytes_between_steps",
    "tests/test_param_offload.py::test_cuda_prefetch_copy_overlaps_compute",
)


@dataclass(frozen=True)
class Peak:
    words: tuple[str, ...]
    """Lower-case words that must all occur in the device name ('-' and '_' read as spaces)."""
    tb_per_s: float
    card: str


PEAKS: tuple[Peak, ...] = (
    Peak(("gh200", "144g"), 4.9, "GH200 144 GB HBM3e"),
    Peak(("gh200",), 4.0, "GH200 96 GB HBM3"),
    Peak(("h200",), 4.8, "H200"),
    Peak(("h100", "nvl"), 3.9, "H100 NVL"),
    Peak(("h100", "pcie"), 2.0, "H100 PCIe"),
    Peak(("h100",), 3.35, "H100 SXM5"),
    Peak(("a100", "80gb", "pcie"), 1.935, "A100 80 GB PCIe"),
    Peak(("a100", "80gb"), 2.039, "A100 80 GB SXM4"),
    Peak(("a100",), 1.555, "A100 40 GB"),
    Peak(("l40s",), 0.864, "L40S"),
    Peak(("l40",), 0.864, "L40"),
    Peak(("l4",), 0.300, "L4"),
    Peak(("a10g",), 0.600, "A10G"),
    Peak(("a10",), 0.600, "A10"),
    Peak(("v100",), 0.900, "V100"),
    Peak(("4090",), 1.008, "RTX 4090"),
)


def peak_bandwidth(name: str, props: Optional[Any] = None) -> dict[str, Any]:
    """{"tb_per_s", "card", "source"} for a CUDA device name (see [Note: peak bandwidth])."""
    words = set(re.sub(r"[-_]", " ", name.lower()).split())
    for peak in PEAKS:
        # Whole words, so that "l4" does not match L40S nor "h200" GH200.
        if all(w in words for w in peak.words):
            return {"tb_per_s": peak.tb_per_s, "card": peak.card, "source": "datasheet table in gpu_suite.py"}
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        tbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e12
        return {"tb_per_s": tbps, "card": name, "source": "2 x memory_clock_rate x memory_bus_width (CUDA properties)"}
    return {"tb_per_s": None, "card": name, "source": "unknown: not in the table and no clock/bus in CUDA properties"}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def _tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


# ---------------------------------------------------------------------------------------------- parts
def run_cuda_tests(timeout_s: int) -> dict[str, Any]:
    """pytest on tests/test_cuda.py; status ok / failed / no tests / missing / timeout."""
    if not CUDA_TESTS.exists():
        return {"status": "missing", "reason": f"{CUDA_TESTS} does not exist yet"}
    more = [t for t in MORE_CUDA_TESTS if (REPO / t.split("::")[0]).exists()]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(CUDA_TESTS), *more]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={max(30, timeout_s // 4)}")  # one hung test does not take the whole part
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"status": "timeout", "command": cmd, "timeout_s": timeout_s, "output_tail": _tail(out)}
    closing = re.compile(r"\b(passed|failed|errors?|skipped|no tests ran)\b")
    summary = next((ln.strip("= ") for ln in reversed(proc.stdout.splitlines()) if closing.search(ln)), "")
    status = {0: "ok", 5: "no tests"}.get(proc.returncode, "failed")
    print(f"# tests: {status}: {summary}", flush=True)
    return {
        "status": status,
        "returncode": proc.returncode,
        "summary": summary,
        "command": cmd,
        "wall_s": time.perf_counter() - t0,
        "output_tail": _tail(proc.stdout + proc.stderr),
    }


def _run_benchmark(cmd: list[str], out_name: str, timeout_s: int) -> dict[str, Any]:
    """A benchmark script in a subprocess (its output passes through); its JSON ``out_name`` in the results."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "command": cmd, "timeout_s": timeout_s}
    result: dict[str, Any] = {"command": cmd, "returncode": proc.returncode, "wall_s": time.perf_counter() - t0}
    path = RESULTS_DIR / out_name
    if proc.returncode != 0 or not path.exists():
        return {**result, "status": "failed"}
    return {**result, "status": "ok", "result_file": str(path.relative_to(REPO)), "data": json.loads(path.read_text())}


def run_step_speed(sizes: Sequence[int], repeats: int, timeout_s: int) -> dict[str, Any]:
    """step_speed.py --device cuda; returns its JSON."""
    out_name = "step_speed_cuda.json"
    sizes_arg = ",".join(str(s) for s in sizes)
    cmd = [sys.executable, str(BENCH_DIR / "step_speed.py"), "--device", "cuda", "--sizes", sizes_arg,
           "--repeats", str(repeats), "--out", out_name]  # fmt: skip
    return _run_benchmark(cmd, out_name, timeout_s)


def run_offload(params_m: float, timeout_s: int) -> dict[str, Any]:
    """offload.py --device cuda (writes offload_cuda.json); returns its JSON."""
    cmd = [sys.executable, str(BENCH_DIR / "offload.py"), "--device", "cuda", "--params-m", str(params_m)]
    return _run_benchmark(cmd, "offload_cuda.json", timeout_s)


class Budget:
    """Wall seconds left to the suite ([Note: the suite's time budget])."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def timeout(self, cap: int, later: int) -> int:
        """A part's timeout: its ``cap``, or what is left once ``later`` seconds are kept for the parts after it
        (at least 1)."""
        return max(1, min(cap, int(self.end - time.perf_counter()) - later))


def int8_bandwidth(
    sizes: Sequence[int], *, warmup: int, repeats: int, peak_tb_per_s: Optional[float]
) -> list[dict[str, Any]]:
    """ZeroAdam int8 steps on CUDA: model bytes / median time, and that as a fraction of the peak."""
    from step_speed import build_candidates, measure

    cand = next(c for c in build_candidates() if c.name == "zeroadam-int8")
    rows = []
    for n in sizes:
        row = measure(cand, n, "cuda", warmup=warmup, repeats=repeats)
        if row["status"] == "ok":
            row["fraction_of_peak"] = None if not peak_tb_per_s else row["effective_gb_per_s"] / (peak_tb_per_s * 1e3)
            frac = row["fraction_of_peak"]
            print(
                f"# zeroadam-int8 @ {n:,}: {row['median_s'] * 1e6:.0f} us, {row['effective_gb_per_s']:.0f} GB/s"
                + ("" if frac is None else f" = {frac:.1%} of peak")
                + f" (backend {row.get('zeroadam_backend')})",
                flush=True,
            )
        rows.append(row)
    return rows


def copy_bandwidth(numel: int, *, warmup: int, repeats: int, peak_tb_per_s: Optional[float]) -> dict[str, Any]:
    """dst.copy_(src) of ``numel`` fp32 elements: read + write = 8 bytes per element."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=warmup, repeats=repeats, device="cuda")
    gbps = 8 * numel / t.median_s / 1e9
    src = dst = None  # free the two buffers before the next measurement
    torch.cuda.empty_cache()
    frac = None if not peak_tb_per_s else gbps / (peak_tb_per_s * 1e3)
    print(f"# copy {numel:,} fp32: {gbps:.0f} GB/s" + ("" if frac is None else f" = {frac:.1%} of peak"), flush=True)
    return {
        "numel": numel,
        "median_s": t.median_s,
        "samples_s": t.samples_s,
        "gb_per_s": gbps,
        "fraction_of_peak": frac,
    }


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes", default="2^24,2^27", help="element counts for step_speed and the bandwidth (default 2^24,2^27)"
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/test_cuda.py")
    ap.add_argument("--skip-step-speed", action="store_true", help="do not run step_speed.py --device cuda")
    ap.add_argument("--skip-offload", action="store_true", help="do not run offload.py --device cuda")
    ap.add_argument("--offload-params-m", type=float, default=1000.0, help="offload.py's model size (millions)")
    ap.add_argument("--budget", type=int, default=480, help="seconds of wall time for the whole suite (default 480)")
    ap.add_argument("--test-timeout", type=int, default=240, help="at most this many seconds for the CUDA tests")
    ap.add_argument("--step-speed-timeout", type=int, default=150, help="at most this many seconds for step_speed.py")
    ap.add_argument("--offload-timeout", type=int, default=150, help="at most this many seconds for offload.py")
    ap.add_argument("--copy-to", type=Path, help="a folder to copy every result file into after each part")
    args = ap.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        ap.error(str(exc))

    if not torch.cuda.is_available():
        print(
            f"gpu_suite: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
            "nothing was run or written. Run it on a machine with an NVIDIA GPU and a CUDA build of torch. "
            f"Exit status {EXIT_NO_CUDA} means 'cannot run here', not a failure.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA

    budget = Budget(args.budget)
    machine = describe_machine("cuda")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    peak = peak_bandwidth(props.name, props)
    print(f"# {props.name}: peak {peak['tb_per_s']} TB/s ({peak['source']}); budget {args.budget} s", flush=True)
    report: dict[str, Any] = {
        "benchmark": "gpu_suite",
        "device_name": props.name,
        "machine": machine,
        "peak_bandwidth": peak,
        "budget_s": args.budget,
        "tests": {"status": "not run"},
        "step_speed": {"status": "not run"},
        "int8_bandwidth": [],
        "copy_bandwidth": None,
        "offload": {"status": "not run"},
        "failed": [],
    }
    name = f"gpu_suite_{_slug(props.name)}.json"

    def save() -> Path:
        path = write_json(name, report)
        if args.copy_to is not None:
            args.copy_to.mkdir(parents=True, exist_ok=True)
            for file in (path, RESULTS_DIR / "step_speed_cuda.json", RESULTS_DIR / "offload_cuda.json"):
                if file.exists():
                    shutil.copy2(file, args.copy_to / file.name)
        return path

    # Minimum seconds kept for the parts after each one (step_speed, bandwidth, offload).
    later_speed, later_bandwidth, later_offload = 60, 30, 60
    failed: list[str] = report["failed"]
    if not args.skip_tests:
        later = later_speed * (not args.skip_step_speed) + later_bandwidth + later_offload * (not args.skip_offload)
        report["tests"] = run_cuda_tests(budget.timeout(args.test_timeout, later))
        if report["tests"]["status"] in ("failed", "timeout"):
            failed.append(f"tests: {report['tests']['status']}")
        save()
    if not args.skip_step_speed:
        later = later_bandwidth + later_offload * (not args.skip_offload)
        speed = run_step_speed(sizes, args.repeats, budget.timeout(args.step_speed_timeout, later))
        if speed.get("status") == "ok" and peak["tb_per_s"]:
            for row in speed["data"]["rows"]:
                if row["status"] == "ok":
                    row["fraction_of_peak"] = row["effective_gb_per_s"] / (peak["tb_per_s"] * 1e3)
        report["step_speed"] = speed
        if speed["status"] in ("failed", "timeout"):
            failed.append(f"step_speed: {speed['status']}")
        save()
    try:
        report["int8_bandwidth"] = int8_bandwidth(
            sizes, warmup=args.warmup, repeats=args.repeats, peak_tb_per_s=peak["tb_per_s"]
        )
        report["copy_bandwidth"] = copy_bandwidth(
            max(sizes), warmup=args.warmup, repeats=args.repeats, peak_tb_per_s=peak["tb_per_s"]
        )
    except Exception as exc:  # noqa: BLE001 - record, write what we have, and report failure
        import traceback

        traceback.print_exc()
        failed.append(f"bandwidth: {type(exc).__name__}: {exc}")
    if any(r["status"] != "ok" for r in report["int8_bandwidth"]):
        failed.append("bandwidth: zeroadam-int8 did not run on CUDA")
    save()
    if not args.skip_offload:
        torch.cuda.empty_cache()  # the subprocess needs the card's memory
        report["offload"] = run_offload(args.offload_params_m, budget.timeout(args.offload_timeout, 0))
        if report["offload"]["status"] in ("failed", "timeout"):
            failed.append(f"offload: {report['offload']['status']}")
    path = save()
    print(f"wrote {path}" + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
