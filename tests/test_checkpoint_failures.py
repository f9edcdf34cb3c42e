"""Checkpoints that must not load, and saves that fail, in one process: hyperparameters the constructor would
refuse, steps that lie, records that are missing, DCP's BaseException, a full disk. Each refusal is a
CheckpointError naming what is wrong, and the model and optimizer are left as they were.

The two-rank cases (a file only one rank reads) are in tests/test_failures_distributed.py."""
from __future__ import annotations

import errno
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from helpers import moment_tensors
from zeroadam import ZeroAdam, checkpoint
from zeroadam.checkpoint import CheckpointError
from zeroadam.checkpoint import format as fmt_


def make() -> tuple[torch.nn.Module, ZeroAdam]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(67, 97), torch.nn.Tanh(), torch.nn.Linear(97, 13))
    named = dict(model.named_parameters())
    opt = ZeroAdam(
        [
            {"params": [named["0.weight"], named["2.weight"]], "weight_decay": 0.1},
            {"params": [named["0.bias"], named["2.bias"]], "weight_decay": 0.0, "lr": 2e-2},
        ],
        lr=1e-2,
        state_dtype="fp32",
    )
    return model, opt


def train(model: torch.nn.Module, opt: ZeroAdam, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 67, generator=g)).square().mean().backward()
        opt.step()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, opt = make()
    train(model, opt)
    checkpoint.save(tmp_path / "ck", model, opt)
    return tmp_path / "ck"


def edit_info(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    info = json.loads((path / fmt_.INFO_FILE).read_text())
    change(info)
    (path / fmt_.INFO_FILE).write_text(json.dumps(info))


def assert_refused_unchanged(path: Path, match: str) -> None:
    model, opt = make()
    train(model, opt, 1)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for p in opt.param_groups[0]["params"] for k, v in opt.state_dict()["state"][0].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path, model, opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


# ---------------------------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize(
    "group, key, value, message",
    [
        (0, "lr", -5, "param_groups[0]: invalid lr=-5"),
        (1, "weight_decay", math.nan, "param_groups[1]: invalid weight_decay=nan"),
        (0, "lr", "fast", "param_groups[0]: invalid lr='fast'"),
        (1, "betas", [1.5, 2], "param_groups[1]: invalid betas[0]=1.5"),
        (0, "eps", -1.0, "param_groups[0]: invalid eps=-1.0"),
    ],
)
def test_bad_hyperparameters_in_a_checkpoint_are_refused(saved: Path, group: int, key: str, value: Any, message: str) -> None:
    edit_info(saved, lambda info: info["param_groups"][group]["options"].__setitem__(key, value))
    assert_refused_unchanged(saved, re.escape(message))


# ---------------------------------------------------------------------------------------------- steps and records
def _set_step(info: dict[str, Any], name: str, step: int) -> None:
    info["params"][name]["step"] = step


@pytest.mark.parametrize("step, message", [(0, "step 0 but non-zero moments"), (-3, "has step -3")])
def test_a_step_that_lies_is_refused(saved: Path, step: int, message: str) -> None:
    edit_info(saved, lambda info: _set_step(info, "2.bias", step))
    assert_refused_unchanged(saved, f"'2.bias'.*{message}|{message}.*'2.bias'")
    # consolidate reads the same records
    with pytest.raises(CheckpointError, match=message):
        checkpoint.consolidate(saved)


def test_step_0_with_zero_moments_loads_as_state(tmp_path: Path) -> None:
    # State loaded before any step (all zeros at step 0), then saved: a valid checkpoint.
    model, opt = make()
    train(model, opt, 1)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = torch.tensor(0.0)
        for t in moment_tensors(entry):
            t.zero_()
    opt.load_state_dict(sd)
    checkpoint.save(tmp_path / "ck", model, opt)
    other, other_opt = make()
    checkpoint.load(tmp_path / "ck", other, other_opt)
    assert float(other_opt.state_dict()["state"][0]["step"]) == 0


def test_a_deleted_param_record_is_refused(saved: Path) -> None:
    edit_info(saved, lambda info: info["params"].pop("2.bias"))
    assert_refused_unchanged(saved, re.escape("param_groups[1] lists parameter '2.bias', but zeroadam.json has no record"))
    with pytest.raises(CheckpointError, match="'2.bias'"):
        checkpoint.consolidate(saved)
    with pytest.raises(CheckpointError, match="'2.bias'"):
        checkpoint.describe(saved)


# ---------------------------------------------------------------------------------------------- DCP's BaseException
def test_corrupted_data_file_header_is_a_checkpoint_error(saved: Path) -> None:
    victim = next(saved.glob("*.distcp"))
    data = bytearray(victim.read_bytes())
    data[:64] = bytes(64)  # the serialization header of the first tensor
    victim.write_bytes(bytes(data))
    assert_refused_unchanged(saved, "corrupted")


# ---------------------------------------------------------------------------------------------- full disk
def test_full_disk_on_save_says_so_and_leaves_no_partial_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make()
    train(model, opt)
    checkpoint.save(tmp_path / "ck", model, opt)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    import torch.distributed.checkpoint.filesystem as fs

    real = fs._write_item

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "_write_item", full)
    train(model, opt, 1)
    with pytest.raises(CheckpointError, match=r"no space left on the device holding .*, needed ~[\d,]+ bytes") as info:
        checkpoint.save(tmp_path / "ck", model, opt)
    assert "unexpected pos" not in str(info.value)
    assert not (tmp_path / ".ck.partial").exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before  # the previous checkpoint is intact
    monkeypatch.setattr(fs, "_write_item", real)
    other, other_opt = make()
    checkpoint.load(tmp_path / "ck", other, other_opt)
