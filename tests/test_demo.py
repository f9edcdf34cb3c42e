"""``zeroadam demo`` end to end with a handful of steps: the table, results.json and demo.png appear and agree."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from zeroadam.tools.demo import MODEL_SIZES, _batch, load_corpus

pytest.importorskip("transformers", reason="the demo needs the 'demo' extra (transformers, tqdm, matplotlib)")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_corpus_and_batches_are_deterministic() -> None:
    import torch

    a, files = load_corpus(50_000)
    b, _ = load_corpus(50_000)
    assert a == b and len(a) == 50_000 and files == sorted(files)
    tokens = torch.frombuffer(bytearray(a), dtype=torch.uint8).long()
    size = MODEL_SIZES["tiny"]
    x0, y0 = _batch(tokens, size, seed=5, world=2, rank=0)
    x1, _ = _batch(tokens, size, seed=5, world=2, rank=1)
    assert x0.shape == (size.batch_per_rank, size.context) and torch.equal(x0[:, 1:], y0[:, :-1])
    assert not torch.equal(x0, x1)  # ranks read different windows of one global batch
    assert torch.equal(_batch(tokens, size, seed=5, world=2, rank=0)[0], x0)


def test_demo_writes_table_json_and_png(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "zeroadam.tools.cli", "demo", "--steps", "5", "--model-size", "tiny", "--out", str(out), "--cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for needle in ["ZeroAdam stage 2 int8", "DDP + AdamW", "optimizer state", "tokens/s", "held-out loss"]:
        assert needle in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    zero, ddp = results["runs"]
    for run in (zero, ddp):
        assert len(run["losses"]) == 5 and all(math.isfinite(v) for v in run["losses"])
        assert len(run["memory"]) == 2 and run["tokens_per_s"] > 0
    # Same weights, same data: the first loss (before any update) is the same for both optimizers.
    assert zero["losses"][0] == pytest.approx(ddp["losses"][0], rel=1e-5)
    # Stage 2 + int8: an fp32 gradient shard (4 / 2 B per parameter) and ~2 B of moments, against 4 + 8 B.
    z, d = zero["memory"][0], ddp["memory"][0]
    assert z["grad_bytes"] < 0.6 * d["grad_bytes"] and z["state_bytes"] < 0.3 * d["state_bytes"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
