"""Checkpoints: sharded directories that any world size, stage (0-2) or offload setting loads, written atomically,
validated before anything changes, and convertible to plain PyTorch files.

    from zeroadam import checkpoint
    checkpoint.save("ckpt/latest", model, optimizer)   # every rank (collective)
    checkpoint.load("ckpt/latest", model, optimizer)   # every rank, any world size, stage or state format

    zeroadam consolidate ckpt/latest model.pt --optimizer   # plain model state dict (+ torch.optim.AdamW state)
    zeroadam inspect ckpt/latest

The directory's contents are described in [Note: checkpoint layout] (checkpoint_format.py).

[Note: atomic save]
Rank 0 prepares ``.<name>.partial`` beside the target, every rank writes into it, rank 0 writes zeroadam.json
last and renames: the old checkpoint to ``.<name>.previous``, the new one into place, then deletes the old one.
A crash before the renames leaves the previous checkpoint untouched (the next save clears the partial
directory); a crash between them leaves it under ``.<name>.previous``, where ``load`` and the next ``save`` find
it. Every rank must see the same filesystem (as DCP requires).

Loading reads zeroadam.json and DCP's metadata, checks every expected tensor's size and dtype, every file's length,
the model's keys and shapes and the param groups' names, reads what this rank needs, compares checksums, and
validates the optimizer state dict; the ranks then agree (one collective) before any rank changes the model or the
optimizer, so a truncated, corrupted or mismatched checkpoint raises on every rank and changes nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from zeroadam.checkpoint.format import (
    INFO_FILE,
    PathLike,
    SCALE_KEYS,
    DCP_ERRORS,
    CheckpointError,
    CheckpointInfo,
    ParamRecord,
    assemble,
    build_info,
    check_zero_step_state,
    crc32_of,
    failure_reason,
    dtype_name,
    piece_key,
    previous_dir,
    read_info,
    read_tensors,
    wanted_pieces,
)
from zeroadam.comm.collectives import Group, all_gather_objects
from zeroadam.sharding.model import full_state_dict, load_full_state_dict
from zeroadam.comm.check_in import check_in
from zeroadam.formats.table import moment_format_of
from zeroadam.state_dict.entries import decode_entry, entry_range, migrate_entry, validate_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.optimizer import ZeroAdam

__all__ = [
    "save",
    "load",
    "consolidate",
    "describe",
    "verify",
    "read_info",
    "CheckpointError",
    "CheckpointInfo",
    "ParamRecord",
    "add_consolidate_arguments",
    "run_consolidate",
    "add_inspect_arguments",
    "run_inspect",
]


# ---------------------------------------------------------------------------------------------- helpers
def _group_of(opt: "ZeroAdam") -> Group:
    if opt.engine.gathers_state_dict:
        return opt.engine.everyone  # with a 2-D mesh, every replica takes part; replica 0 writes the shards
    return Group.resolve(None)  # stage 0: every rank holds the same state; DCP writes it once


def _model_state(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """What rank 0 writes for the model: its state dict, gathered from the shards for a stage-3 model (collective
    then, so every rank calls this); the other ranks get their own (unread) state dict or nothing."""
    if getattr(model, "_zeroadam_sharded", None) is not None:
        return full_state_dict(model, rank0_only=True)
    return model.state_dict()


def _load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    if getattr(model, "_zeroadam_sharded", None) is not None:
        load_full_state_dict(model, sd)
    else:
        model.load_state_dict(sd)


def _param_names(model: torch.nn.Module, opt: "ZeroAdam") -> dict[torch.Tensor, str]:
    by_param = {p: n for n, p in model.named_parameters()}
    names: dict[torch.Tensor, str] = {}
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if p not in by_param:
                raise CheckpointError(
                    f"zeroadam.checkpoint: param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)}) is not a "
                    "parameter of the model; pass the model whose parameters the optimizer updates"
                )
            names[p] = by_param[p]
    return names


def _local_entries(opt: "ZeroAdam") -> dict[torch.Tensor, tuple[int, int, dict[str, Any]]]:
    """param -> (start, end, entry) for every parameter with state: the elements this rank writes (empty when it
    owns none of the parameter; the entry still tells its step and formats)."""
    out = {}
    replica = opt.engine.replica_rank  # the other replicas of a 2-D mesh hold the same shards: they write none
    for p, entry in opt.engine.shard_entries().items():
        a, b = entry_range(entry, p.numel())
        out[p] = (a, b, entry) if replica == 0 else (a, a, entry)
    return out


def _agree(group: Group, error: Optional[BaseException], what: str) -> None:
    """Raise on every rank if any rank failed (collective); a rank re-raises its own error."""
    if group.world == 1:
        if error is not None:
            raise error
        return
    messages = all_gather_objects(group, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise CheckpointError(f"zeroadam.checkpoint: {what} failed on rank {r} (nothing was changed): {m}")


def _agree_or_discard(group: Group, error: Optional[BaseException], what: str, tmp: Path) -> None:
    """``_agree``; when any rank failed, rank 0 removes the partial directory (every rank has stopped writing
    into it once the agreement returns) so that a failed save leaves only the previous checkpoint."""
    try:
        _agree(group, error, what)
    except BaseException:
        if group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# Bytes of serialization framing DCP adds per tensor (see [Note: checkpoint layout] in format.py).
_FRAMING_BYTES = 1024


def _bytes_needed(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() + _FRAMING_BYTES for t in tensors.values())


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def _is_no_space(e: BaseException) -> bool:
    """Whether ENOSPC is anywhere in ``e``: its causes, or the per-rank failures DCP's CheckpointException holds."""
    seen: set[int] = set()
    todo: list[Any] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        if isinstance(x, tuple):
            todo.extend(x)
            continue
        if isinstance(x, BaseException):
            todo.extend((x.__cause__, x.__context__))
            failures = getattr(x, "failures", None)
            if isinstance(failures, dict):
                todo.extend(failures.values())
    return False


def _write_error(e: BaseException, tmp: Path, needed: int) -> BaseException:
    """The error to report for a failed write. A full disk surfaces from torch.save as "unexpected pos 704 vs 598"
    (no errno): it is recognised by ENOSPC or by less free space left than this rank had to write."""
    try:
        free = shutil.disk_usage(tmp if tmp.exists() else tmp.parent).free
    except OSError:
        free = None
    if _is_no_space(e) or (free is not None and free < needed):
        return CheckpointError(
            f"zeroadam.checkpoint.save: no space left on the device holding {tmp.parent} (mounted at "
            f"{_mount_point(tmp.parent)}), needed ~{needed:,} bytes for this rank's part"
            f"{'' if free is None else f', {free:,} free'}; free space or save elsewhere (the previous checkpoint, "
            "if any, is unchanged)"
        )
    if isinstance(e, Exception):
        return e
    return CheckpointError(f"zeroadam.checkpoint.save: writing {tmp} failed: {failure_reason(e)}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _partial(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def _prepare(target: Path) -> Path:
    """Rank 0: recover an interrupted swap, refuse to replace what is not a checkpoint, clear the partial dir."""
    prev = previous_dir(target)
    if not target.exists() and (prev / INFO_FILE).exists():
        os.rename(prev, target)  # a crash between the two renames of the last save
    if target.exists():
        if not target.is_dir() or (any(target.iterdir()) and not (target / INFO_FILE).exists()):
            raise CheckpointError(
                f"zeroadam.checkpoint.save: {target} exists and is not a zeroadam checkpoint; refusing to replace it"
            )
    tmp = _partial(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _swap_into_place(tmp: Path, target: Path) -> None:
    prev = previous_dir(target)
    if prev.exists():
        shutil.rmtree(prev)
    if target.exists():
        os.rename(target, prev)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(prev, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- save
def save(path: PathLike, model: torch.nn.Module, optimizer: "ZeroAdam") -> None:
    """Write ``model`` and ``optimizer`` to the checkpoint directory ``path`` (collective: every rank of the
    optimizer's process group calls it). Replaces an existing checkpoint there atomically (see [Note: atomic save])."""
    import torch.distributed.checkpoint as dcp

    target = Path(path)
    group = _group_of(optimizer)
    names = _param_names(model, optimizer)
    check_in(group, "zeroadam.checkpoint.save()", "Call checkpoint.save(path, model, optimizer) on every rank.")

    tmp, error = _partial(target), None
    if group.rank == 0:
        try:
            _prepare(target)
        except (OSError, CheckpointError) as e:
            error = e
    _agree(group, error, "preparing the checkpoint directory")

    tensors: dict[str, torch.Tensor] = {}
    pieces: list[tuple[str, str, int, int, int]] = []  # (name, key, a, b, crc) written by this rank
    local = _local_entries(optimizer)
    for p, (a, b, entry) in local.items():
        if a == b:
            continue
        for k, t in entry.items():
            if k in ("step", "shard_elements"):
                continue
            cpu = t.detach().reshape(-1).cpu()
            key = piece_key(names[p], k, a, b)
            tensors[key] = cpu
            pieces.append((names[p], k, a, b, crc32_of(cpu)))
    model_crc: dict[str, int] = {}
    model_sd = _model_state(model, group.rank)
    if group.rank == 0:
        # Only rank 0 writes the model: ranks may differ in buffers, and its copy is the one the checksums describe.
        for k, t in model_sd.items():
            tensors[f"model/{k}"] = t.detach()
            model_crc[k] = crc32_of(t)
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # DCP's notice that it runs without torch.distributed
            dcp.save(
                tensors,
                storage_writer=dcp.FileSystemWriter(tmp),
                process_group=group.pg if group.world > 1 else None,
                no_dist=group.world == 1,
            )
    except DCP_ERRORS as e:  # see [Note: DCP exceptions]
        error = _write_error(e, tmp, _bytes_needed(tensors))
    _agree_or_discard(group, error, "writing the tensors", tmp)
    everyone = [pieces]
    if group.world > 1:
        everyone = [None] * group.world if group.rank == 0 else None  # type: ignore[assignment]
        dist.gather_object(pieces, everyone, dst=group.global_rank(0), group=group.pg)

    error = None
    if group.rank == 0:
        try:
            info = build_info(optimizer, names, local, model_sd, model_crc, everyone, group.world)
            with open(tmp / INFO_FILE, "w") as f:
                json.dump(info, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            _swap_into_place(tmp, target)
        except (OSError, CheckpointError) as e:
            error = _write_error(e, tmp, 0) if isinstance(e, OSError) else e
    _agree_or_discard(group, error, "writing the checkpoint", tmp)


# ---------------------------------------------------------------------------------------------- load
def _check_model(info: CheckpointInfo, model_sd: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(model_sd) - set(info.model))
    unexpected = sorted(set(info.model) - set(model_sd))
    if missing or unexpected:
        raise CheckpointError(
            f"zeroadam.checkpoint: {info.path} holds another model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, t in model_sd.items():
        shape, dtype = info.model[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(
                f"zeroadam.checkpoint: {info.path} holds another model: {k!r} is {shape} {dtype} in the checkpoint "
                f"and {tuple(t.shape)} {t.dtype} here"
            )


def _check_groups(info: CheckpointInfo, opt: "ZeroAdam", names: dict[torch.Tensor, str]) -> None:
    if len(info.param_groups) != len(opt.param_groups):
        raise CheckpointError(
            f"zeroadam.checkpoint: {info.path} has {len(info.param_groups)} param groups, the optimizer "
            f"{len(opt.param_groups)}; build the optimizer with the groups it was saved with"
        )
    for gi, (saved, group) in enumerate(zip(info.param_groups, opt.param_groups)):
        mine = [names[p] for p in group["params"]]
        if sorted(saved["params"]) != sorted(mine):
            only_saved = sorted(set(saved["params"]) - set(mine))
            only_here = sorted(set(mine) - set(saved["params"]))
            raise CheckpointError(
                f"zeroadam.checkpoint: param_groups[{gi}] differs from the checkpoint's: only in the checkpoint "
                f"{only_saved[:5]}, only in the optimizer {only_here[:5]}"
            )


def _stage_load(
    path: PathLike, model: torch.nn.Module, opt: "ZeroAdam", names: dict[torch.Tensor, str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate everything this rank needs; returns (model state dict, optimizer state dict). Pure."""
    info = read_info(path)
    sharded = getattr(model, "_zeroadam_sharded", None)
    with sharded.state_dict_views() if sharded is not None else contextlib.nullcontext():
        model_sd = model.state_dict()  # names and shapes only
    _check_model(info, model_sd)
    _check_groups(info, opt, names)
    need = opt.engine.local_ranges()
    wanted: dict[str, tuple[tuple[int, ...], torch.dtype]] = {f"model/{k}": v for k, v in info.model.items()}
    for p, (a, b) in need.items():
        rec = info.params[names[p]]
        if rec.has_state:
            wanted.update(wanted_pieces(rec, a, b))
    data = read_tensors(info, wanted)

    state: dict[int, dict[str, Any]] = {}
    groups, idx = [], 0
    for gi, group in enumerate(opt.param_groups):
        g = dict(info.param_groups[gi]["options"])
        g["params"] = []
        for p in group["params"]:
            g["params"].append(idx)
            rec = info.params[names[p]]
            if rec.has_state:
                a, b = need.get(p, (0, 0))  # outside this rank's shard: an empty piece that carries the step
                state[idx] = assemble(rec, a, b, data)
                check_zero_step_state(rec, state[idx])
            idx += 1
        groups.append(g)
    sd = {"state": state, "param_groups": groups}
    try:
        opt.engine.check_entries(validate_state_dict(opt.param_groups, need, sd))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"zeroadam.checkpoint: {info.path}: {str(e).removeprefix('ZeroAdam.load_state_dict: ')}") from None
    return {k: data[f"model/{k}"] for k in info.model}, sd


def load(path: PathLike, model: torch.nn.Module, optimizer: "ZeroAdam") -> None:
    """Load a checkpoint saved at any world size and stage into ``model`` and ``optimizer`` (collective: every
    rank of the optimizer's process group calls it). Validates everything on every rank first; on any problem
    raises CheckpointError on every rank and leaves the model and the optimizer as they were."""
    group = _group_of(optimizer)
    check_in(group, "zeroadam.checkpoint.load()", "Call checkpoint.load(path, model, optimizer) on every rank.")
    staged, error = None, None
    try:
        staged = _stage_load(path, model, optimizer, _param_names(model, optimizer))
    except DCP_ERRORS as e:  # noqa: BLE001 - every rank must hear of any failure before anyone changes anything
        error = e if isinstance(e, Exception) else CheckpointError(f"zeroadam.checkpoint: loading {path} failed: {failure_reason(e)}")
    _agree(group, error, "loading")
    model_sd, opt_sd = staged  # type: ignore[misc]
    # The model first: master residuals are relative to the parameter values they were saved with.
    with torch.no_grad():
        _load_model_state(model, model_sd)
    optimizer.load_state_dict(opt_sd)


# ---------------------------------------------------------------------------------------------- leaving zeroadam
# ---------------------------------------------------------------------------------------------- plain files
def _is_optimizer_state(x: Any) -> bool:
    return isinstance(x, dict) and "state" in x and "param_groups" in x


def _read_plain_file(path: PathLike) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises for a file that is not its format
        raise CheckpointError(
            f"zeroadam: {path} is a file, not a checkpoint directory, and torch.load(weights_only=True) cannot read "
            f"it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def _optimizer_states(obj: Any) -> dict[str, dict[str, Any]]:
    """The optimizer state dicts in a torch.save'd object: the object itself ("") or its top-level values (a
    training checkpoint such as {"model": ..., "optimizer": ...}), by key."""
    if _is_optimizer_state(obj):
        return {"": obj}
    if isinstance(obj, dict):
        return {str(k): v for k, v in obj.items() if _is_optimizer_state(v)}
    return {}


def to_adamw_state_dict(sd: dict[str, Any], where: str = "the state dict") -> dict[str, Any]:
    """A ZeroAdam state dict (any format, whole entries) as ``torch.optim.AdamW`` state: fp32 moments shaped like
    the parameters, the same param groups. An AdamW state dict is returned as it is. Shard entries (saved by a
    rank of a sharded optimizer) are refused: they hold part of each parameter."""
    state: dict[Any, dict[str, Any]] = {}
    for key, raw in sd["state"].items():
        entry = migrate_entry(raw)
        if "shard_elements" in entry:
            raise CheckpointError(
                f"zeroadam consolidate: {where} is one rank's shard of a sharded ZeroAdam (entry {key!r} holds "
                f"elements {tuple(entry['shard_elements'])}); save the full state dict instead "
                "(optimizer.consolidate_state_dict(to=0) on every rank, then state_dict() on rank 0), or use "
                "zeroadam.checkpoint.save and consolidate its directory"
            )
        fmt = moment_format_of(entry)
        if fmt is None:
            raise CheckpointError(f"zeroadam consolidate: {where}: entry {key!r} has no exp_avg of a known format")
        shape = next(t.shape for k, t in entry.items() if k in ("exp_avg", "exp_avg_codes"))
        m, v = decode_entry(entry)
        state[key] = {"step": torch.as_tensor(entry["step"], dtype=torch.float32), "exp_avg": m.view(shape), "exp_avg_sq": v.view(shape)}
    return {"state": state, "param_groups": [dict(g) for g in sd["param_groups"]]}


def _consolidate_file(path: PathLike) -> Any:
    obj = _read_plain_file(path)
    found = _optimizer_states(obj)
    if not found:
        raise CheckpointError(f"zeroadam consolidate: {path} holds no optimizer state dict (no dict with 'state' "
                              "and 'param_groups', at the top or one level down)")
    if "" in found:
        return to_adamw_state_dict(obj, str(path))
    return {k: (to_adamw_state_dict(v, f"{path}[{k!r}]") if k in found else v) for k, v in obj.items()}


def consolidate(path: PathLike, *, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(plain model state dict, ``torch.optim.AdamW`` state dict or None) from a checkpoint, in one process.

    The AdamW state keeps the checkpoint's param groups (with ``param_names``) and hyperparameters; its moments
    are fp32, decoded from whatever format was saved."""
    info = read_info(path)
    wanted: dict[str, tuple[tuple[int, ...], torch.dtype]] = {f"model/{k}": v for k, v in info.model.items()}
    if optimizer:
        for rec in info.params.values():
            if rec.has_state:
                wanted.update(wanted_pieces(rec, 0, rec.numel))
    data = read_tensors(info, wanted)
    model_sd = {k: data[f"model/{k}"] for k in info.model}
    if not optimizer:
        return model_sd, None
    defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    state: dict[int, dict[str, Any]] = {}
    groups, idx = [], 0
    for saved in info.param_groups:
        options = {k: v for k, v in saved["options"].items() if k in defaults or k == "initial_lr"}
        g = {**defaults, **options, "betas": tuple(options.get("betas", defaults["betas"]))}
        g["params"], g["param_names"] = [], list(saved["params"])
        for name in saved["params"]:
            g["params"].append(idx)
            rec = info.params[name]
            if rec.has_state:
                entry = assemble(rec, 0, rec.numel, data)
                check_zero_step_state(rec, entry)
                m, v = decode_entry(entry)
                state[idx] = {"step": torch.tensor(float(rec.step)), "exp_avg": m.view(rec.shape), "exp_avg_sq": v.view(rec.shape)}
            idx += 1
        groups.append(g)
    return model_sd, {"state": state, "param_groups": groups}


def describe(path: PathLike) -> dict[str, Any]:
    """A summary of a checkpoint: world size, stage, formats, parameter and state counts, bytes on disk."""
    info = read_info(path)
    numel = sum(r.numel for r in info.params.values())
    by_kind = {"model": 0, "moments": 0, "scales": 0, "master": 0}
    for key, n in info.stored_bytes.items():
        if key.startswith("model/"):
            by_kind["model"] += n
        else:
            k = key.split("/")[-2]
            by_kind["scales" if k in SCALE_KEYS else "master" if k.startswith("master") else "moments"] += n
    formats: dict[str, int] = {}
    for r in info.params.values():
        if r.has_state:
            label = f"{dtype_name(r.dtype)} params, {r.moments} moments, master {r.master}"
            formats[label] = formats.get(label, 0) + r.numel
    return {
        "path": str(info.path),
        "world_size": info.world_size,
        "stage": info.stage,
        "offload": info.offload,
        "state_dtype": info.state_dtype,
        "master_weights": info.master_weights,
        "param_groups": len(info.param_groups),
        "params": len(info.params),
        "numel": numel,
        "steps": sorted({r.step for r in info.params.values()}),
        "formats_numel": formats,
        "bytes": {**by_kind, "total_on_disk": info.file_bytes},
        "bytes_per_param": {k: (v / numel if numel else 0.0) for k, v in {**by_kind, "total_on_disk": info.file_bytes}.items()},
    }


# ---------------------------------------------------------------------------------------------- command line
def _add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a directory written by zeroadam.checkpoint.save, or a torch.save file holding a ZeroAdam state dict",
    )


def add_consolidate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_argument(parser)
    parser.add_argument("out", metavar="OUT_FILE", help="where to write the model state dict (torch.save)")
    parser.add_argument(
        "--optimizer",
        nargs="?",
        const="",
        default=None,
        metavar="OPT_FILE",
        help="also write a torch.optim.AdamW state dict with fp32 moments, to OPT_FILE "
        "(default: OUT_FILE with .optim before its suffix, e.g. model.optim.pt)",
    )


def _check_output(out: Path, what: str) -> None:
    """Refuse an output path that cannot be written, before anything is read or written."""
    if out.is_dir():
        raise CheckpointError(f"{what} {out} is a directory; pass a file name (for example {out / 'model.pt'})")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"{what} {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what} {out}: the directory {parent} is not writable (read-only file system?)")


def _write_files(files: list[tuple[Any, Path]]) -> None:
    """torch.save each object beside its target, then move them all into place: on any failure every partial file
    is removed and no target is touched."""
    partials = []
    try:
        for obj, out in files:
            tmp = out.with_name(f".{out.name}.partial")
            partials.append((tmp, out))
            torch.save(obj, tmp)
    except BaseException:
        for tmp, _ in partials:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, out in partials:
        os.replace(tmp, out)


def _optimizer_output(args: argparse.Namespace, out: Path) -> Optional[Path]:
    if args.optimizer is None:
        return None
    return Path(args.optimizer) if args.optimizer else out.with_name(f"{out.stem}.optim{out.suffix or '.pt'}")


def run_consolidate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if Path(args.checkpoint).is_file():
        # A plain torch.save'd file (a ZeroAdam state dict, or a training checkpoint holding one): the same
        # object with every ZeroAdam state dict in it as AdamW's.
        try:
            _check_output(out, "OUT_FILE")
            if args.optimizer is not None:
                raise CheckpointError("--optimizer is for checkpoint directories; a plain file is converted whole into OUT_FILE")
            converted = _consolidate_file(args.checkpoint)
            _write_files([(converted, out)])
        except (CheckpointError, OSError) as e:
            detail = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
            print(f"zeroadam consolidate: error: {detail}", file=sys.stderr)
            return 1
        print(f"wrote {args.checkpoint} with its optimizer state as torch.optim.AdamW's to {out}")
        return 0
    opt_out = _optimizer_output(args, out)
    try:
        _check_output(out, "OUT_FILE")
        if opt_out is not None:
            _check_output(opt_out, "OPT_FILE")
            if opt_out.resolve() == out.resolve():
                raise CheckpointError(f"OPT_FILE {opt_out} is the same file as OUT_FILE; pass another name")
        model_sd, opt_sd = consolidate(args.checkpoint, optimizer=opt_out is not None)
        files: list[tuple[Any, Path]] = [(model_sd, out)]
        if opt_sd is not None and opt_out is not None:
            files.append((opt_sd, opt_out))
        _write_files(files)
    except (CheckpointError, OSError) as e:
        detail = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
        print(f"zeroadam consolidate: error: {detail}", file=sys.stderr)
        return 1
    print(f"wrote the model state dict ({len(model_sd)} tensors) to {out}")
    if opt_sd is not None:
        print(f"wrote a torch.optim.AdamW state dict ({len(opt_sd['state'])} parameters with state) to {opt_out}")
    return 0


def verify(path: PathLike) -> int:
    """Read every tensor of a checkpoint, one parameter at a time, and compare it with the checksum zeroadam.json
    records; returns how many tensors were checked. Raises CheckpointError at the first mismatch or unreadable
    file."""
    info = read_info(path)
    batches: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [
        {f"model/{k}": v for k, v in info.model.items()}
    ]
    batches += [wanted_pieces(rec, 0, rec.numel) for rec in info.params.values() if rec.has_state]
    count = 0
    for wanted in batches:
        count += len(read_tensors(info, wanted))
    return count


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not read the tensors to compare them with their checksums (only the metadata and file sizes are "
        "checked)",
    )


def _describe_file(path: PathLike) -> str:
    obj = _read_plain_file(path)
    found = _optimizer_states(obj)
    lines = [f"file           {path}: a plain torch.save file, not a checkpoint directory"]
    if isinstance(obj, dict) and "" not in found:
        lines.append("top-level keys " + ", ".join(repr(k) for k in list(obj)[:12]))
    for where, sd in found.items():
        entries = [migrate_entry(e) for e in sd["state"].values()]
        formats: dict[str, int] = {}
        for e in entries:
            fmt = moment_format_of(e) or "unknown"
            formats[fmt] = formats.get(fmt, 0) + 1
        kind = "ZeroAdam" if isinstance(sd.get("zeroadam"), dict) or formats.keys() - {"fp32"} else "AdamW-format"
        shard = (sd.get("zeroadam") or {}).get("shard")
        lines.append(
            f"optimizer      {'the object itself' if where == '' else repr(where)}: a {kind} state dict, "
            f"{len(sd['param_groups'])} group(s), {len(entries)} parameters with state, moments "
            + ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
            + (f"; one rank's shard ({shard})" if shard else "")
        )
    if not found:
        lines.append("optimizer      none found (no dict with 'state' and 'param_groups')")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    if Path(args.checkpoint).is_file():
        try:
            print(_describe_file(args.checkpoint))
        except CheckpointError as e:
            print(f"zeroadam inspect: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        d = describe(args.checkpoint)
        d["checksums_verified"] = None if args.no_verify else verify(args.checkpoint)
    except (CheckpointError, OSError) as e:
        print(f"zeroadam inspect: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"checkpoint     {d['path']}")
    print(f"saved by       {d['world_size']} rank(s), stage {d['stage']}, offload {d['offload']}")
    print(f"options        state_dtype={d['state_dtype']}, master_weights={d['master_weights']}")
    print(f"parameters     {d['params']} in {d['param_groups']} group(s), {d['numel']:,} elements, steps {d['steps']}")
    for label, n in d["formats_numel"].items():
        print(f"  {n:>14,} elements: {label}")
    print("bytes on disk  " + ", ".join(f"{k} {v:,} ({d['bytes_per_param'][k]:.3f}/param)" for k, v in d["bytes"].items()))
    if d["checksums_verified"] is None:
        print("checksums      not verified (--no-verify): only the metadata and file sizes were checked")
    else:
        print(f"checksums      all {d['checksums_verified']} tensors read and match")
    return 0
