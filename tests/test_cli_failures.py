"""The ``zeroadam`` command on user errors: one line on stderr, a non-zero exit, no traceback, nothing half-written;
and no exit 0 on nonsense (a corrupted checkpoint that ``inspect`` would otherwise describe, a negative card size)."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from zeroadam import ZeroAdam, checkpoint
from zeroadam.checkpoint import format as fmt_
from zeroadam.tools.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = ZeroAdam(model.parameters(), state_dtype="fp32")
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    path = tmp_path_factory.mktemp("cli") / "ck"
    checkpoint.save(path, model, opt)
    return path


def copy_of(good: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(good, tmp_path / "ck")
    return tmp_path / "ck"


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------------------------- consolidate
def test_output_directory_missing(good: Path, capsys: pytest.CaptureFixture) -> None:
    one_line_error(capsys, ["consolidate", str(good), "/nonexistent_dir/out.pt"], "/nonexistent_dir", "does not exist")


def test_output_is_a_directory_writes_nothing(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").mkdir()
    one_line_error(capsys, ["consolidate", str(good), str(tmp_path / "out"), "--optimizer", str(tmp_path / "o.pt")], "is a directory")
    assert listing(tmp_path) == ["out"]  # no model file, no .partial
    one_line_error(capsys, ["consolidate", str(good), str(tmp_path / "m.pt"), "--optimizer", str(tmp_path / "out")], "is a directory")
    assert listing(tmp_path) == ["out"]  # the model file was not written before OPT_FILE was refused


def test_read_only_output_directory(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # A read-only file system: os.access says so (EROFS) before anything is read ...
    real_access = __import__("os").access
    monkeypatch.setattr("os.access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw))
    one_line_error(capsys, ["consolidate", str(good), str(tmp_path / "m.pt")], "not writable")
    monkeypatch.setattr("os.access", real_access)

    # ... and a write that fails anyway leaves no partial file and no half of the pair.
    def refuse(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        Path(f).write_bytes(b"half")
        raise OSError(errno.EROFS, "Read-only file system", str(f))

    calls = {"n": 0}
    real_save = torch.save

    def second_fails(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        calls["n"] += 1
        return real_save(obj, f, *a, **kw) if calls["n"] == 1 else refuse(obj, f)

    monkeypatch.setattr(torch, "save", second_fails)
    one_line_error(capsys, ["consolidate", str(good), str(tmp_path / "m.pt"), "--optimizer"], "Read-only file system")
    assert listing(tmp_path) == []


def test_corrupted_header_and_missing_record(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ck = copy_of(good, tmp_path)
    victim = next(ck.glob("*.distcp"))
    victim.write_bytes(bytes(64) + victim.read_bytes()[64:])
    one_line_error(capsys, ["consolidate", str(ck), str(tmp_path / "m.pt"), "--optimizer"], "corrupted")
    one_line_error(capsys, ["inspect", str(ck)], "corrupted")  # inspect reads the tensors and checks their CRCs
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / ".m.pt.partial").exists()
    rc = main(["inspect", str(ck), "--no-verify"])
    assert rc == 0 and "not verified" in capsys.readouterr().out

    info = json.loads((good / fmt_.INFO_FILE).read_text())
    del info["params"]["2.bias"]
    ck2 = tmp_path / "ck2"
    __import__("shutil").copytree(good, ck2)
    (ck2 / fmt_.INFO_FILE).write_text(json.dumps(info))
    one_line_error(capsys, ["consolidate", str(ck2), str(tmp_path / "m.pt")], "'2.bias'")
    one_line_error(capsys, ["inspect", str(ck2)], "'2.bias'")


def test_good_checkpoint_still_consolidates_and_inspects(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["consolidate", str(good), str(tmp_path / "m.pt"), "--optimizer"]) == 0
    assert listing(tmp_path) == ["m.optim.pt", "m.pt"]
    assert main(["inspect", str(good)]) == 0
    assert "tensors read and match" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- estimate
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--params", "7B", "--gpu-memory-gib", "-80"], "gpu_memory_gib=-80.0"),
        (["--params", "7B", "--gpus-per-host", "0"], "gpus_per_host=0"),
        (["--config", "{cfg}"], "'hidden_size' is -5"),
    ],
)
def test_estimate_refuses_nonsense(argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": -5, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "vocab_size": 100}))
    err = one_line_error(capsys, ["estimate", *[a.format(cfg=cfg) for a in argv]], needle)
    assert "yes (-" not in err


def test_command_line_prints_no_traceback(good: Path) -> None:
    # The real entry point, once: the process's stderr holds one line.
    r = subprocess.run([sys.executable, "-m", "zeroadam.tools.cli", "consolidate", str(good), "/nonexistent_dir/out.pt"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
