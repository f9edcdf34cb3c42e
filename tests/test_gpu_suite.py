"""benchmarks/gpu_suite.py, the one command for a lent GPU: it says "no CUDA device" here, and (with CUDA faked)
runs its parts in order within its time budget, keeps going after a failed part, and leaves its results after
every part ([Note: the suite's time budget])."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import gpu_suite


def test_without_cuda_it_exits_2_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_suite, "RESULTS_DIR", tmp_path)
    assert gpu_suite.main(["--copy-to", str(tmp_path / "out")]) == gpu_suite.EXIT_NO_CUDA
    assert "no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_budget_keeps_time_for_later_parts() -> None:
    budget = gpu_suite.Budget(100)
    assert budget.timeout(240, 30) in (69, 70)  # what is left after 30 s for the later parts
    assert budget.timeout(20, 30) == 20  # the part's own cap
    assert gpu_suite.Budget(0).timeout(240, 30) == 1  # never 0 (subprocess would refuse it)


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """CUDA present, every part a stub that records its call; results go to tmp_path/results."""
    calls: list[tuple[str, Any]] = []
    results = tmp_path / "results"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="NVIDIA H200", memory_clock_rate=None)
    )
    monkeypatch.setattr(gpu_suite, "describe_machine", lambda device: {"device": device})
    monkeypatch.setattr(gpu_suite, "RESULTS_DIR", results)
    monkeypatch.setattr(gpu_suite, "write_json", lambda name, payload: _write(results / name, payload))
    state = {"tests": "ok"}

    def tests(timeout_s: int) -> dict:
        calls.append(("tests", timeout_s))
        return {"status": state["tests"]}

    def speed(sizes, repeats, timeout_s: int) -> dict:
        calls.append(("step_speed", timeout_s))
        (results / "step_speed_cuda.json").write_text("{}")
        return {"status": "ok", "data": {"rows": [{"status": "ok", "effective_gb_per_s": 2400.0}]}}

    def offload(params_m: float, timeout_s: int) -> dict:
        calls.append(("offload", timeout_s))
        return {"status": "ok"}

    monkeypatch.setattr(gpu_suite, "run_cuda_tests", tests)
    monkeypatch.setattr(gpu_suite, "run_step_speed", speed)
    monkeypatch.setattr(gpu_suite, "run_offload", offload)
    monkeypatch.setattr(
        gpu_suite, "int8_bandwidth", lambda sizes, **kw: calls.append(("bandwidth", None)) or [{"status": "ok"}]
    )
    monkeypatch.setattr(gpu_suite, "copy_bandwidth", lambda n, **kw: {"gb_per_s": 4300.0})
    return {"calls": calls, "results": results, "state": state, "out": tmp_path / "out"}


def _write(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def test_parts_run_in_order_within_the_budget_and_results_are_copied(fake_gpu: dict) -> None:
    t0 = time.perf_counter()
    assert gpu_suite.main(["--budget", "400", "--copy-to", str(fake_gpu["out"])]) == gpu_suite.EXIT_OK
    assert time.perf_counter() - t0 < 5
    names = [name for name, _ in fake_gpu["calls"]]
    assert names == ["tests", "step_speed", "bandwidth", "offload"]
    timeouts = dict(fake_gpu["calls"])
    assert timeouts["tests"] == 240  # its cap: 400 s leave the later parts their 150 s
    assert timeouts["step_speed"] == 150 and timeouts["offload"] == 150
    report = json.loads((fake_gpu["results"] / "gpu_suite_nvidia-h200.json").read_text())
    assert report["device_name"] == "NVIDIA H200" and report["failed"] == []
    assert report["step_speed"]["data"]["rows"][0]["fraction_of_peak"] == pytest.approx(2400 / 4800)
    assert sorted(p.name for p in fake_gpu["out"].iterdir()) == ["gpu_suite_nvidia-h200.json", "step_speed_cuda.json"]


def test_a_small_budget_shortens_the_first_part_for_the_others(fake_gpu: dict) -> None:
    gpu_suite.main(["--budget", "200"])
    timeouts = dict(fake_gpu["calls"])
    assert timeouts["tests"] <= 200 - (60 + 30 + 60)  # the later parts' minimums are kept
    assert timeouts["offload"] <= 200


def test_a_failed_part_is_recorded_and_the_others_still_run(fake_gpu: dict) -> None:
    fake_gpu["state"]["tests"] = "failed"
    assert gpu_suite.main([]) == gpu_suite.EXIT_FAILED
    assert [name for name, _ in fake_gpu["calls"]] == ["tests", "step_speed", "bandwidth", "offload"]
    report = json.loads((fake_gpu["results"] / "gpu_suite_nvidia-h200.json").read_text())
    assert report["failed"] == ["tests: failed"]


def test_a_benchmark_subprocess_gives_its_json_or_its_failure_or_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setattr(gpu_suite, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(gpu_suite, "REPO", tmp_path)
    writes = f"import json; json.dump({{'rows': []}}, open({str(tmp_path / 'x.json')!r}, 'w'))"
    ok = gpu_suite._run_benchmark([sys.executable, "-c", writes], "x.json", 60)
    assert ok["status"] == "ok" and ok["data"] == {"rows": []} and ok["result_file"] == "x.json"
    assert gpu_suite._run_benchmark([sys.executable, "-c", "raise SystemExit(3)"], "y.json", 60)["status"] == "failed"
    slow = gpu_suite._run_benchmark([sys.executable, "-c", "import time; time.sleep(30)"], "z.json", 1)
    assert slow["status"] == "timeout" and slow["timeout_s"] == 1
