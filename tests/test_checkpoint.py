"""Checkpoints and sharded state dicts: save on 2 ranks (stage 2), load on 3 ranks and on 1 process (stage 0, and
offload), continue, and match the uninterrupted run; a truncated, corrupted or mismatched checkpoint, a rank killed
during save, consolidation to plain PyTorch files; state_dict() gathering to rank 0, consolidate_state_dict, a lone
caller, and shards.

Stage 3: the stage-2 checkpoints also load into a model sharded by shard_model on 3 ranks, and continue the same.

Starting ranks dominates the cost (about 50 s for 3 ranks on a loaded 2-core machine), so one spawn of 3 ranks
runs everything: the 2-rank scenarios on a process group of ranks 0 and 1 while rank 2 waits, then the 3-rank
ones, then the killed save. The single-process checks run in the test process.
"""
from __future__ import annotations

import datetime
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import zeroadam
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed import free_port
from helpers import make_model, max_rel_err
from zeroadam import ZeroAdam, checkpoint
from zeroadam.checkpoint import format as fmt_
from zeroadam.checkpoint import CheckpointError

GLOBAL_BATCH = 12  # divisible by 1, 2 and 3
BEFORE, AFTER = 4, 4  # steps before the save, steps after it
FORMATS = ("fp32", "int8")
TOL = {"fp32": 1e-5, "int8": 2e-3}


# ---------------------------------------------------------------------------------------------- the run
def groups(model: torch.nn.Module) -> list[dict]:
    named = dict(model.named_parameters())
    return [
        {"params": [named["0.weight"], named["2.weight"]], "weight_decay": 0.1},
        {"params": [named["0.bias"], named["2.bias"]], "weight_decay": 0.0, "lr": 2e-2, "betas": (0.8, 0.99)},
    ]


def build(fmt: str, stage: int, seed: int = 0, **kw: Any) -> tuple[torch.nn.Module, ZeroAdam]:
    model = make_model(seed)
    return model, ZeroAdam(groups(model), lr=1e-2, weight_decay=0.0, state_dtype=fmt, stage=stage, bucket_size=3000, **kw)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 67, generator=g), torch.randn(GLOBAL_BATCH, 13, generator=g)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    per = GLOBAL_BATCH // world
    for s in steps:
        x, y = batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]).backward()
        opt.step()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def cloned(sd: dict) -> dict:
    return {
        "state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in e.items()} for k, e in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
        "zeroadam": dict(sd.get("zeroadam", {})),
    }


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if a[k].keys() != b[k].keys():
            return False
        for n in a[k]:
            x, y = a[k][n], b[k][n]
            if torch.is_tensor(x) and not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
    return True


def shard_snapshot(opt: ZeroAdam) -> dict:
    return {i: {n: v.clone() if torch.is_tensor(v) else v for n, v in e.items()} for i, e in enumerate(opt.engine.shard_entries().values())}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        out = e
    return out, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- spawning
def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    """One rank: results and errors go to files, so that a rank may die on purpose without hanging the test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["ZEROADAM_CHECK_IN_TIMEOUT"] = "20"  # a loaded machine can delay one rank; the lone-caller case sets 2
    torch.set_num_threads(1)
    try:
        # Rank 2 waits at a barrier while ranks 0 and 1 run their part: minutes on a loaded machine.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        torch.save(fn(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, root: Path, *args: Any, timeout: float = 150.0) -> list[Any]:
    """Run fn(rank, world, root, *args) on ``world`` gloo ranks; a rank that exits without a result gives None."""
    out_dir = root / f"results{world}"
    out_dir.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, (root, *args), str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = {r: (out_dir / f"rank{r}.err").read_text() for r in range(world) if (out_dir / f"rank{r}.err").exists()}
    if alive or errors:
        raise RuntimeError(f"ranks still running after {timeout} s: {alive}\n" + "\n".join(f"rank {r}:\n{m}" for r, m in errors.items()))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) if (out_dir / f"rank{r}.pt").exists() else None for r in range(world)]


# ---------------------------------------------------------------------------------------------- 2 ranks
def two_ranks(rank: int, world: int, root: Path, pair: Any) -> dict:
    """Ranks 0 and 1 of the spawn, on the process group ``pair``."""
    out: dict[str, Any] = {}
    for fmt in FORMATS:
        model, opt = build(fmt, stage=2, process_group=pair)
        train(model, opt, range(BEFORE), rank, world)
        checkpoint.save(root / fmt, model, opt)
        out[f"{fmt}/at_save"] = params_of(model)
        train(model, opt, range(BEFORE, BEFORE + AFTER), rank, world)
        out[f"{fmt}/final"] = params_of(model)

    # state_dict() before the first step: no communication, so a rank alone gets it at once.
    _, fresh = build("fp32", stage=2, process_group=pair)
    if rank == 0:
        out["fresh"] = timed(lambda: len(fresh.state_dict()["state"]))
    dist.barrier(group=pair)

    # Every rank calls it: the full state on rank 0, each other rank its shard.
    model, opt = build("fp32", stage=2, process_group=pair)
    train(model, opt, range(2), rank, world)
    sd = opt.state_dict()
    out["sd"] = cloned(sd)
    if rank == 0:
        torch.save(out["sd"], root / "sd_full.pt")

    # consolidate_state_dict, then state_dict() on one rank at a time: no communication (a check-in would time out).
    opt.consolidate_state_dict(to=0)
    os.environ["ZEROADAM_CHECK_IN_TIMEOUT"] = "2"
    if rank == 0:
        out["consolidated"] = timed(lambda: cloned(opt.state_dict()))
    dist.barrier(group=pair)
    if rank == 1:
        out["consolidated"] = timed(lambda: cloned(opt.state_dict()))
    dist.barrier(group=pair)

    # After a step the gathered copy is gone: rank 0 alone gets a clear error within seconds, not a hang.
    train(model, opt, range(2, 3), rank, world)
    if rank == 0:
        out["lone"] = timed(opt.state_dict)
    dist.barrier(group=pair)
    os.environ["ZEROADAM_CHECK_IN_TIMEOUT"] = "20"
    out["after_lone"] = cloned(opt.state_dict())  # every rank again: works (the lone check-in was taken back)

    # load_state_dict: rank 0 the full state, rank 1 its own shard; then a shard that does not cover rank 0.
    _, other = build("fp32", stage=2, seed=1, process_group=pair)
    other.load_state_dict(out["after_lone"])
    out["shard_roundtrip"] = all(
        same_state({0: a}, {0: b}) for a, b in zip(shard_snapshot(other).values(), shard_snapshot(opt).values())
    )
    shards = [None, None]
    dist.all_gather_object(shards, out["after_lone"], group=pair)
    if rank == 0:
        before = shard_snapshot(other)
        out["bad_shard"] = timed(lambda: other.load_state_dict(shards[1]))[0]
        out["bad_shard_unchanged"] = all(
            same_state({0: a}, {0: b}) for a, b in zip(before.values(), shard_snapshot(other).values())
        )
    return out


def killed_save(rank: int, world: int, root: Path, pair: Any, results: dict) -> dict:
    """Ranks 0 and 1: rank 1 dies while writing; the previous checkpoint stays as it was. The last scenario."""
    out: dict[str, Any] = {}
    model, opt = build("fp32", stage=2, process_group=pair)
    train(model, opt, range(2), rank, world)
    checkpoint.save(root / "killed", model, opt)
    out["killed/at_save"] = params_of(model)
    train(model, opt, range(2, 3), rank, world)
    if rank == 1:
        torch.save({**results, "two": {**results["two"], **out}}, root / "results3" / "rank1.pt")  # before it dies
        from torch.distributed.checkpoint import FileSystemWriter

        write = FileSystemWriter.write_data

        def write_then_die(self: Any, plan: Any, planner: Any) -> Any:
            write(self, plan, planner).wait()  # its files are on disk, the metadata is not
            os._exit(3)

        FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]
    out["killed/error"], out["killed/seconds"] = timed(lambda: checkpoint.save(root / "killed", model, opt))
    return out


def suite(rank: int, world: int, root: Path) -> dict:
    assert world == 3
    pair = dist.new_group([0, 1])
    out: dict[str, Any] = {"two": None}
    if rank < 2:
        out["two"] = two_ranks(rank, 2, root, pair)
    dist.barrier()
    out["three"] = three_ranks(rank, world, root)
    dist.barrier()
    if rank < 2:
        out["two"].update(killed_save(rank, 2, root, pair, out))
    return out


# ---------------------------------------------------------------------------------------------- 3 ranks
def three_ranks(rank: int, world: int, root: Path) -> dict:
    out: dict[str, Any] = {}
    for fmt in FORMATS:
        model, opt = build(fmt, stage=2, seed=1)  # other initial values: everything must come from the checkpoint
        checkpoint.load(root / fmt, model, opt)
        out[f"{fmt}/loaded"] = params_of(model)
        train(model, opt, range(BEFORE, BEFORE + AFTER), rank, world)
        out[f"{fmt}/final"] = params_of(model)

    # The same checkpoints into stage 3: parameters sharded per Linear layer.
    for fmt in FORMATS:
        torch.manual_seed(1)
        model = zeroadam.shard_model(make_model(seed=1), units=[torch.nn.Linear])
        opt = ZeroAdam(groups(model), lr=1e-2, weight_decay=0.0, state_dtype=fmt, stage=3)
        checkpoint.load(root / fmt, model, opt)
        train(model, opt, range(BEFORE, BEFORE + AFTER), rank, world)
        full = zeroadam.full_state_dict(model)
        out[f"{fmt}/stage3_final"] = [full[n] for n, _ in model.named_parameters()]
        # Saved from stage 3, loaded into stage 2: the same parameters, and one more step agrees too.
        checkpoint.save(root / f"{fmt}_from_stage3", model, opt)
        train(model, opt, range(BEFORE + AFTER, BEFORE + AFTER + 1), rank, world)
        full = zeroadam.full_state_dict(model)
        out[f"{fmt}/stage3_next"] = [full[n] for n, _ in model.named_parameters()]
        model2, opt2 = build(fmt, stage=2, seed=2)
        checkpoint.load(root / f"{fmt}_from_stage3", model2, opt2)
        out[f"{fmt}/stage3_to_stage2_loaded"] = params_of(model2)
        train(model2, opt2, range(BEFORE + AFTER, BEFORE + AFTER + 1), rank, world)
        out[f"{fmt}/stage3_to_stage2_next"] = params_of(model2)

    # A truncated data file: an error on every rank, and nothing changes.
    if rank == 0:
        shutil.copytree(root / "fp32", root / "truncated")
        victim = max((root / "truncated").glob("*.distcp"), key=lambda f: f.stat().st_size)
        os.truncate(victim, victim.stat().st_size // 2)
    dist.barrier()
    model, opt = build("fp32", stage=2, seed=2)
    train(model, opt, range(1), rank, world)
    before_params, before_state = params_of(model), shard_snapshot(opt)
    out["truncated"] = timed(lambda: checkpoint.load(root / "truncated", model, opt))[0]
    after = shard_snapshot(opt)
    out["truncated_unchanged"] = max_rel_err(params_of(model), before_params) == 0 and all(
        same_state({0: a}, {0: b}) for a, b in zip(before_state.values(), after.values())
    )

    # The full state dict gathered on 2 ranks loads on 3, and gathers back bit for bit.
    _, opt = build("fp32", stage=2, seed=1)
    opt.load_state_dict(torch.load(root / "sd_full.pt", weights_only=True))
    opt.consolidate_state_dict(to=0)
    out["regathered"] = cloned(opt.state_dict())
    return out


def test_save_on_2_load_into_stage3_on_3_continues_the_same(runs: dict) -> None:
    for fmt, tol in (("fp32", 1e-5), ("int8", 2e-3)):
        for r in runs["three"]:
            assert max_rel_err(r[f"{fmt}/stage3_final"], runs["two"][0][f"{fmt}/final"]) <= tol


def test_save_from_stage3_loads_into_stage2(runs: dict) -> None:
    for fmt in ("fp32", "int8"):
        for r in runs["three"]:
            assert max_rel_err(r[f"{fmt}/stage3_to_stage2_loaded"], r[f"{fmt}/stage3_final"]) == 0.0
            assert max_rel_err(r[f"{fmt}/stage3_to_stage2_next"], r[f"{fmt}/stage3_next"]) <= 1e-6


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ckpt")
    t0 = time.monotonic()
    ranks = spawn(suite, 3, root)
    return {
        "root": root,
        "two": [r["two"] for r in ranks[:2]],
        "three": [r["three"] for r in ranks],
        "spawn_s": time.monotonic() - t0,
    }


# ---------------------------------------------------------------------------------------------- resharding
@pytest.mark.parametrize("fmt", FORMATS)
def test_save_on_2_load_on_3_continues_the_same(runs: dict, fmt: str) -> None:
    ref = runs["two"][0][f"{fmt}/final"]
    for r in runs["three"]:
        assert max_rel_err(r[f"{fmt}/loaded"], runs["two"][0][f"{fmt}/at_save"]) == 0
        assert max_rel_err(r[f"{fmt}/final"], ref) <= TOL[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offload", [None, "cpu"])
def test_save_on_2_load_on_1_process_continues_the_same(runs: dict, fmt: str, offload: str | None) -> None:
    # One process: stage 0 without offload; with offload the sharded engine runs with one rank.
    model, opt = build(fmt, stage=0, seed=1, offload=offload)
    assert opt.engine.gathers_state_dict == (offload is not None)
    checkpoint.load(runs["root"] / fmt, model, opt)
    assert max_rel_err(params_of(model), runs["two"][0][f"{fmt}/at_save"]) == 0
    train(model, opt, range(BEFORE, BEFORE + AFTER))
    assert max_rel_err(params_of(model), runs["two"][0][f"{fmt}/final"]) <= TOL[fmt]


def test_int8_codes_are_not_requantized(runs: dict) -> None:
    model, opt = build("int8", stage=0, seed=1)
    checkpoint.load(runs["root"] / "int8", model, opt)
    info = checkpoint.read_info(runs["root"] / "int8")
    rec = info.params["0.weight"]
    assert rec.moments == "int8" and rec.pieces == ((0, 3328), (3328, 6499))  # as the 2 ranks owned it
    entry = opt.state_dict()["state"][0]
    codes = fmt_.read_tensors(info, fmt_.wanted_pieces(rec, 0, rec.numel))
    saved = torch.cat([codes[fmt_.piece_key("0.weight", "exp_avg_codes", a, b)] for a, b in rec.pieces])
    assert torch.equal(entry["exp_avg_codes"].reshape(-1), saved)


# ---------------------------------------------------------------------------------------------- failures
def test_truncated_checkpoint_fails_on_every_rank_and_changes_nothing(runs: dict) -> None:
    for r in runs["three"]:
        assert isinstance(r["truncated"], CheckpointError), r["truncated"]
        assert "truncated" in str(r["truncated"])
        assert r["truncated_unchanged"]


def _copy(runs: dict, name: str) -> Path:
    dst = runs["root"] / f"{name}-{time.monotonic_ns()}"
    shutil.copytree(runs["root"] / "fp32", dst)
    return dst


def _assert_load_fails_unchanged(path: Path, model: torch.nn.Module, opt: ZeroAdam, match: str) -> None:
    before_params, before_state = params_of(model), cloned(opt.state_dict())
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path, model, opt)
    assert max_rel_err(params_of(model), before_params) == 0
    after = opt.state_dict()
    assert same_state(after["state"], before_state["state"])
    assert after["param_groups"] == before_state["param_groups"]


def _trained(fmt: str = "fp32") -> tuple[torch.nn.Module, ZeroAdam]:
    model, opt = build(fmt, stage=0, seed=3)
    train(model, opt, range(1))
    return model, opt


def test_corrupted_bytes_fail_the_checksum(runs: dict) -> None:
    path = _copy(runs, "corrupt")
    victim = max(path.glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    victim.write_bytes(bytes(data))
    _assert_load_fails_unchanged(path, *_trained(), match="corrupted")


def test_interrupted_save_without_metadata(runs: dict) -> None:
    path = _copy(runs, "nometa")
    (path / ".metadata").unlink()
    _assert_load_fails_unchanged(path, *_trained(), match="metadata")
    (path / fmt_.INFO_FILE).unlink()
    _assert_load_fails_unchanged(path, *_trained(), match="interrupted save")


def test_other_model_and_other_param_groups(runs: dict) -> None:
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(67, 98), torch.nn.Tanh(), torch.nn.Linear(98, 13))
    opt = ZeroAdam(groups(wider), lr=1e-2)
    wider(torch.randn(2, 67)).sum().backward()
    opt.step()
    _assert_load_fails_unchanged(runs["root"] / "fp32", wider, opt, match="another model")
    model = make_model(3)
    one_group = ZeroAdam(model.parameters(), lr=1e-2)
    train(model, one_group, range(1))
    _assert_load_fails_unchanged(runs["root"] / "fp32", model, one_group, match="param groups")
    model = make_model(3)
    named = dict(model.named_parameters())
    swapped = ZeroAdam(
        [{"params": [named["0.weight"], named["2.bias"]]}, {"params": [named["0.bias"], named["2.weight"]]}], lr=1e-2
    )
    train(model, swapped, range(1))
    _assert_load_fails_unchanged(runs["root"] / "fp32", model, swapped, match=r"param_groups\[0\] differs")


def test_rank_killed_during_save_leaves_previous_checkpoint(runs: dict) -> None:
    r0 = runs["two"][0]
    assert runs["two"][1] is not None and "killed/error" not in runs["two"][1]  # rank 1 died in the save
    assert isinstance(r0["killed/error"], Exception), r0["killed/error"]  # rank 0 got an error, not a hang
    assert r0["killed/seconds"] < 30
    model, opt = build("fp32", stage=0, seed=1)
    checkpoint.load(runs["root"] / "killed", model, opt)
    assert max_rel_err(params_of(model), r0["killed/at_save"]) == 0
    # Rank 0 removed the partial directory when the save failed; the next save succeeds as usual.
    assert not (runs["root"] / ".killed.partial").exists()
    checkpoint.save(runs["root"] / "killed", model, opt)
    assert not (runs["root"] / ".killed.partial").exists()
    assert sorted(p.name for p in runs["root"].iterdir() if "killed" in p.name) == ["killed"]


def test_crash_between_renames_is_recovered(tmp_path: Path) -> None:
    model, opt = _trained()
    checkpoint.save(tmp_path / "ck", model, opt)
    os.rename(tmp_path / "ck", tmp_path / ".ck.previous")  # as if the save died after its first rename
    other, other_opt = build("fp32", stage=0, seed=4)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        checkpoint.load(tmp_path / "ck", other, other_opt)
    assert max_rel_err(params_of(other), params_of(model)) == 0
    checkpoint.save(tmp_path / "ck", model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a zeroadam checkpoint"):
        checkpoint.save(tmp_path / "mine", *_trained())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- leaving zeroadam
def test_consolidated_files_load_into_plain_pytorch(runs: dict, tmp_path: Path) -> None:
    from zeroadam.checkpoint import add_consolidate_arguments, run_consolidate
    import argparse

    parser = argparse.ArgumentParser()
    add_consolidate_arguments(parser)
    assert run_consolidate(parser.parse_args([str(runs["root"] / "fp32"), str(tmp_path / "model.pt"), "--optimizer"])) == 0
    plain = make_model(5)
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert max_rel_err(params_of(plain), runs["two"][0]["fp32/at_save"]) == 0
    # The AdamW state continues the run: torch.optim.AdamW ends where ZeroAdam did without the interruption.
    adamw = torch.optim.AdamW(groups(plain), lr=1e-2, weight_decay=0.0)
    adamw.load_state_dict(torch.load(tmp_path / "model.optim.pt", weights_only=True))
    train(plain, adamw, range(BEFORE, BEFORE + AFTER))
    assert max_rel_err(params_of(plain), runs["two"][0]["fp32/final"]) <= TOL["fp32"]


def test_inspect_reports_world_stage_formats_and_sizes(runs: dict, capsys: pytest.CaptureFixture) -> None:
    from zeroadam.checkpoint import add_inspect_arguments, run_inspect
    import argparse

    parser = argparse.ArgumentParser()
    add_inspect_arguments(parser)
    assert run_inspect(parser.parse_args([str(runs["root"] / "int8")])) == 0
    text = capsys.readouterr().out
    assert "2 rank(s), stage 2" in text and "state_dtype=int8" in text and "int8 moments" in text
    d = checkpoint.describe(runs["root"] / "int8")
    assert d["world_size"] == 2 and d["steps"] == [BEFORE] and d["numel"] == 6499 + 97 + 1261 + 13
    assert d["bytes"]["total_on_disk"] == sum(f.stat().st_size for f in (runs["root"] / "int8").iterdir())


def test_bf16_parameters_with_compact_master_round_trip(tmp_path: Path) -> None:
    def bf16_model(seed: int) -> tuple[torch.nn.Module, ZeroAdam]:
        model = make_model(seed).to(torch.bfloat16)
        return model, ZeroAdam(groups(model), lr=1e-2, state_dtype="int8", master_weights="compact")

    model, opt = bf16_model(0)
    for s in range(2):
        x, y = batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
        opt.step()
    checkpoint.save(tmp_path / "ck", model, opt)
    other, other_opt = bf16_model(1)
    checkpoint.load(tmp_path / "ck", other, other_opt)
    assert max_rel_err(params_of(other), params_of(model)) == 0
    assert same_state(other_opt.state_dict()["state"], opt.state_dict()["state"])


# ---------------------------------------------------------------------------------------------- state_dict()
def test_state_dict_before_the_first_step_needs_no_communication(runs: dict) -> None:
    n, seconds = runs["two"][0]["fresh"]
    assert n == 0 and seconds < 1.0


def test_state_dict_gathers_to_rank_0_and_shards_elsewhere(runs: dict) -> None:
    full, shard = runs["two"][0]["sd"], runs["two"][1]["sd"]
    assert "shard" not in full["zeroadam"] and shard["zeroadam"]["shard"] == {"rank": 1, "world": 2}
    assert full["state"][0]["exp_avg"].shape == (97, 67)
    assert full["state"][0]["exp_avg"].device.type == "cpu"
    # Rank 1's piece of 0.weight is the end of rank 0's whole tensor.
    a, b = shard["state"][0]["shard_elements"]
    assert 0 < a < b == 6499 and a % 256 == 0
    assert torch.equal(shard["state"][0]["exp_avg"], full["state"][0]["exp_avg"].reshape(-1)[a:b])
    # The full state loads on one process (stage 0) bit for bit.
    model, opt = build("fp32", stage=0)
    opt.load_state_dict(full)
    assert same_state(opt.state_dict()["state"], full["state"])


def test_consolidate_then_state_dict_on_one_rank(runs: dict) -> None:
    (sd0, s0), (sd1, s1) = runs["two"][0]["consolidated"], runs["two"][1]["consolidated"]
    assert s0 < 2.0 and s1 < 2.0  # below the check-in timeout: no rank waited for the other
    assert same_state(sd0["state"], runs["two"][0]["sd"]["state"])
    assert same_state(sd1["state"], runs["two"][1]["sd"]["state"])


def test_lone_caller_gets_a_clear_error_within_seconds(runs: dict) -> None:
    err, seconds = runs["two"][0]["lone"]
    assert isinstance(err, RuntimeError) and seconds < 10
    assert "every rank" in str(err) and "consolidate_state_dict(to=0)" in str(err)
    assert len(runs["two"][0]["after_lone"]["state"]) == 4  # the collective call afterwards worked


def test_load_state_dict_takes_a_full_state_or_a_covering_shard(runs: dict) -> None:
    assert runs["two"][0]["shard_roundtrip"] and runs["two"][1]["shard_roundtrip"]
    err = runs["two"][0]["bad_shard"]
    assert isinstance(err, ValueError) and "shard saved by rank 1 of 2" in str(err)
    assert runs["two"][0]["bad_shard_unchanged"]
    regathered = runs["three"][0]["regathered"]
    assert same_state(regathered["state"], runs["two"][0]["sd"]["state"])


