"""The on-disk format of zeroadam checkpoints: what zeroadam.json records, how tensors are keyed, and reading it
back with every check that can run before anything is loaded.

[Note: checkpoint layout]
A checkpoint is a directory written with ``torch.distributed.checkpoint`` (DCP), keyed by parameter names:

    model/<key>                          the model's state dict as rank 0 holds it (rank 0 writes it)
    optim/<name>/<state key>/<a>-<b>     elements [a, b) of parameter <name>'s flattened state: exp_avg,
                                         exp_avg_sq (fp32, bf16, or int8 / uint8 codes), exp_avg_scale,
                                         exp_avg_sq_scale (the fp32 absmax of each 256-element block of [a, b)),
                                         master (fp32) or master_residual (int8)
    zeroadam.json                        what the directory holds: format version, world size, stage, formats,
                                         param groups (names and hyperparameters), and per parameter its shape,
                                         dtype, formats, step and pieces; a CRC-32 of every tensor

Each rank writes the pieces it owns: no tensor is gathered and no rank holds more than its shard. Pieces start on
256-element block boundaries of their parameter, and int8 blocks follow the parameter's own flattened index
(see [Note: block-aligned layout] in layout.py): a loader at any world size reads the pieces that overlap the
elements it keeps and installs codes and scales as they are; resharding never requantizes. A format change on
load (int8 to fp32, say) converts through the state-dict path. DCP serializes each tensor with torch.save, about
1 KB of framing per tensor: negligible for real models, visible for toy ones.

Metadata is JSON rather than a DCP bytes entry because DCP unpickles those with ``weights_only=False``, and so
that ``zeroadam inspect`` and a person can read it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch.distributed.checkpoint.api import CheckpointException

from zeroadam.formats import quant
from zeroadam.formats.state import MasterKind
from zeroadam.formats.table import MASTER_TENSORS, MOMENT_TENSORS, moment_format_of

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.optimizer import ZeroAdam

__all__ = [
    "PathLike",
    "FORMAT",
    "FORMAT_VERSION",
    "INFO_FILE",
    "SCALE_KEYS",
    "CheckpointError",
    "ParamRecord",
    "CheckpointInfo",
    "piece_key",
    "piece_numel",
    "dtype_name",
    "crc32_of",
    "build_info",
    "previous_dir",
    "resolve",
    "read_info",
    "read_tensors",
    "wanted_pieces",
    "assemble",
    "check_zero_step_state",
    "DCP_ERRORS",
    "failure_reason",
]

PathLike = Union[str, os.PathLike]

FORMAT = "zeroadam.checkpoint"


FORMAT_VERSION = 1


INFO_FILE = "zeroadam.json"


_MOMENT_KEYS: dict[str, dict[str, torch.dtype]] = {fmt: {t.key: t.dtype for t in ts} for fmt, ts in MOMENT_TENSORS.items()}
_MASTER_KEYS: dict[str, dict[str, torch.dtype]] = {kind: {t.key: t.dtype for t in ts} for kind, ts in MASTER_TENSORS.items()}


SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")


# ---------------------------------------------------------------------------------------------- records
DCP_ERRORS = (Exception, CheckpointException)
"""What a checkpoint operation may raise. [Note: DCP exceptions]
torch.distributed.checkpoint raises ``CheckpointException``, which derives from ``BaseException``: an
``except Exception`` misses it, and a rank that raises it instead of reporting to ``_agree`` leaves the other
ranks waiting there for the process group's timeout. Every handler that must hear of a failure catches these.
Its ``str()`` is every failing rank's whole traceback: ``failure_reason`` gives the one line a message needs."""


def failure_reason(e: BaseException) -> str:
    """One line naming what went wrong: for a CheckpointException, the first failing rank's own exception."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and isinstance(failures, dict) and failures:
        rank, pair = sorted(failures.items())[0]
        inner = pair[0] if isinstance(pair, tuple) else pair
        if isinstance(inner, BaseException):
            return f"rank {rank}: {failure_reason(inner)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, incomplete, truncated, corrupted, or for another model."""


@dataclass(frozen=True)
class ParamRecord:
    """One optimizer parameter as zeroadam.json describes it."""

    name: str
    group: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    step: int  # >= 0; 0 without state (or with state loaded at step 0, whose moments must then be zeros)
    moments: Optional[str]  # "fp32" | "bf16" | "int8"; None without state
    master: Optional[str]  # a MasterKind; None without state
    pieces: tuple[tuple[int, int], ...]  # [a, b) element ranges, sorted, covering the parameter when it has state

    @property
    def has_state(self) -> bool:
        """Whether state was saved for this parameter (its pieces are on disk)."""
        return self.moments is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def keys(self) -> dict[str, torch.dtype]:
        """State key -> storage dtype of this parameter's pieces."""
        if self.moments is None or self.master is None:
            return {}
        return {**_MOMENT_KEYS[self.moments], **_MASTER_KEYS[self.master]}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory holds (read from zeroadam.json and checked against DCP's metadata)."""

    path: Path
    world_size: int
    stage: int
    offload: Optional[str]
    state_dtype: str
    master_weights: str
    param_groups: list[dict[str, Any]]  # {"params": [names], "options": {hyperparameters}}
    params: dict[str, ParamRecord]
    model: dict[str, tuple[tuple[int, ...], torch.dtype]]  # state-dict key -> (shape, dtype)
    crc32: dict[str, int]  # DCP key -> CRC-32 of the tensor's bytes
    stored_bytes: dict[str, int]  # DCP key -> bytes in its file (tensor plus serialization framing)
    file_bytes: int  # every file in the directory


# ---------------------------------------------------------------------------------------------- keys, checksums
# On disk the int8 codes keep the names every checkpoint since the first has used (exp_avg / exp_avg_sq); state
# dicts name them exp_avg_codes / exp_avg_sq_codes (see [Note: int8 keys] in zeroadam/formats/table.py). The
# checkpoint is read by zeroadam alone (and converted for AdamW by `zeroadam consolidate`), so old and new
# directories are the same format.
_DISK_NAMES = {"exp_avg_codes": "exp_avg", "exp_avg_sq_codes": "exp_avg_sq"}


def piece_key(name: str, key: str, a: int, b: int) -> str:
    """The DCP key of one saved piece of a parameter's state tensor ``key`` (a state-dict key)."""
    return f"optim/{name}/{_DISK_NAMES.get(key, key)}/{a}-{b}"


def piece_numel(key: str, a: int, b: int) -> int:
    return quant.num_blocks(b - a) if key in SCALE_KEYS else b - a


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"zeroadam.checkpoint: {where}: unknown dtype {name!r}")
    return dtype


def crc32_of(t: torch.Tensor) -> int:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


_SKIP = object()  # a value JSON cannot hold


def _json_options(group: dict[str, Any], gi: int) -> dict[str, Any]:
    """A param group's hyperparameters as JSON values (a one-element tensor lr becomes a float)."""

    def plain(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return v.item()
        if isinstance(v, (tuple, list)):
            items = [plain(x) for x in v]
            return _SKIP if any(x is _SKIP for x in items) else items
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return _SKIP

    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        value = plain(v)
        if value is _SKIP:
            warnings.warn(
                f"zeroadam.checkpoint: param_groups[{gi}][{k!r}] is a {type(v).__name__}, which a checkpoint does "
                "not store; it keeps its current value on load",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        out[k] = value
    return out



def _entry_formats(entry: dict[str, Any], p: torch.Tensor) -> tuple[str, MasterKind]:
    fmt = moment_format_of(entry)
    assert fmt is not None  # entries come from ZeroAdam's own state
    if "master" in entry:
        return fmt, "fp32"
    if "master_residual" in entry:
        return fmt, "compact"
    return fmt, ("param" if p.dtype == torch.float32 else "none")


# ---------------------------------------------------------------------------------------------- writing
def build_info(
    opt: "ZeroAdam",
    names: dict[torch.Tensor, str],
    local: dict[torch.Tensor, tuple[int, int, dict[str, Any]]],
    model_sd: dict[str, torch.Tensor],
    model_crc: dict[str, int],
    everyone: list[list[tuple[str, str, int, int, int]]],
    world: int,
) -> dict[str, Any]:
    o = opt.options
    crc: dict[str, int] = {f"model/{k}": v for k, v in model_crc.items()}
    ranges: dict[str, set[tuple[int, int]]] = {}
    for pieces in everyone:
        for name, key, a, b, c in pieces:
            crc[piece_key(name, key, a, b)] = c
            ranges.setdefault(name, set()).add((a, b))
    params: dict[str, Any] = {}
    groups = []
    for gi, group in enumerate(opt.param_groups):
        groups.append({"params": [names[p] for p in group["params"]], "options": _json_options(group, gi)})
        for p in group["params"]:
            rec: dict[str, Any] = {
                "group": gi,
                "shape": list(p.shape),
                "dtype": dtype_name(p.dtype),
                "step": 0,
                "moments": None,
                "master": None,
                "pieces": [],
            }
            if p in local:
                fmt, kind = _entry_formats(local[p][2], p)
                rec.update(
                    step=int(float(local[p][2]["step"])),
                    moments=fmt,
                    master=kind,
                    pieces=[list(r) for r in sorted(ranges.get(names[p], ()))],
                )
            params[names[p]] = rec
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zeroadam_version": _version(),
        "torch_version": torch.__version__,
        "world_size": world,
        "stage": o.stage,
        "offload": o.offload,
        "state_dtype": o.state_dtype,
        "master_weights": o.master_weights,
        "param_groups": groups,
        "params": params,
        "model": {k: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for k, t in model_sd.items()},
        "crc32": crc,
    }


def _version() -> str:
    from zeroadam._version import __version__

    return __version__


# ---------------------------------------------------------------------------------------------- reading
def previous_dir(target: Path) -> Path:
    """Where an interrupted save leaves the checkpoint it was replacing (see [Note: atomic save], checkpoint.py)."""
    return target.parent / f".{target.name}.previous"


def resolve(path: PathLike) -> Path:
    target = Path(path)
    if target.exists():
        return target
    prev = previous_dir(target)
    if (prev / INFO_FILE).exists():
        warnings.warn(
            f"zeroadam.checkpoint: {target} is missing but {prev} holds the checkpoint a save was replacing when it "
            "was interrupted; loading that",
            RuntimeWarning,
            stacklevel=3,
        )
        return prev
    raise CheckpointError(f"zeroadam.checkpoint: no checkpoint at {target}")


def read_info(path: PathLike) -> CheckpointInfo:
    """Read and check what a checkpoint directory holds, without reading its tensors.

    Raises CheckpointError when zeroadam.json or DCP's metadata is missing or unreadable, when they disagree (a
    tensor missing or of another size or dtype), or when a data file is shorter than its tensors need (truncated).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    root = resolve(path)
    try:
        raw = json.loads((root / INFO_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"zeroadam.checkpoint: {root} has no {INFO_FILE}: not a zeroadam checkpoint, or an interrupted save"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"zeroadam.checkpoint: {root / INFO_FILE} is unreadable ({e}): a corrupted checkpoint") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("format_version"), int):
        raise CheckpointError(f"zeroadam.checkpoint: {root / INFO_FILE} does not describe a zeroadam checkpoint")
    if raw["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"zeroadam.checkpoint: {root} has format version {raw['format_version']}, newer than this zeroadam reads "
            f"({FORMAT_VERSION}); upgrade zeroadam"
        )
    try:
        info = _parse_info(root, raw)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"zeroadam.checkpoint: {root / INFO_FILE} is malformed ({type(e).__name__}: {e})") from e

    try:
        md = FileSystemReader(root).read_metadata()
    except DCP_ERRORS as e:  # noqa: BLE001 - a damaged pickle raises anything
        raise CheckpointError(
            f"zeroadam.checkpoint: {root}: DCP metadata (.metadata) is missing or unreadable ({failure_reason(e)}): "
            "an interrupted or corrupted save"
        ) from e
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {f"model/{k}": v for k, v in info.model.items()}
    for rec in info.params.values():
        for key, dtype in rec.keys().items():
            for a, b in rec.pieces:
                expected[piece_key(rec.name, key, a, b)] = ((piece_numel(key, a, b),), dtype)
    for key, (shape, dtype) in expected.items():
        m = md.state_dict_metadata.get(key)
        if not isinstance(m, TensorStorageMetadata):
            raise CheckpointError(f"zeroadam.checkpoint: {root}: tensor {key!r} is missing from the DCP metadata")
        if tuple(m.size) != tuple(shape) or m.properties.dtype != dtype:
            raise CheckpointError(
                f"zeroadam.checkpoint: {root}: tensor {key!r} is {tuple(m.size)} {m.properties.dtype} in the DCP "
                f"metadata but {tuple(shape)} {dtype} in {INFO_FILE}: a corrupted checkpoint"
            )
        if key not in info.crc32:
            raise CheckpointError(f"zeroadam.checkpoint: {root}: {INFO_FILE} has no checksum for {key!r}")
    sizes: dict[str, int] = {}
    stored: dict[str, int] = {}
    for index, item in md.storage_data.items():
        f = root / item.relative_path
        if item.relative_path not in sizes:
            try:
                sizes[item.relative_path] = f.stat().st_size
            except OSError:
                raise CheckpointError(f"zeroadam.checkpoint: {root}: data file {item.relative_path} is missing") from None
        if item.offset + item.length > sizes[item.relative_path]:
            raise CheckpointError(
                f"zeroadam.checkpoint: {f} is truncated: it has {sizes[item.relative_path]} bytes, but tensor "
                f"{index.fqn!r} ends at byte {item.offset + item.length}"
            )
        stored[index.fqn] = stored.get(index.fqn, 0) + item.length
    total = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    return dataclasses.replace(info, stored_bytes=stored, file_bytes=total)


def _parse_info(root: Path, raw: dict[str, Any]) -> CheckpointInfo:
    params = {}
    for name, r in raw["params"].items():
        shape = tuple(int(d) for d in r["shape"])
        rec = ParamRecord(
            name=name,
            group=int(r["group"]),
            shape=shape,
            dtype=_dtype_from(r["dtype"], name),
            step=int(r["step"]),
            moments=r["moments"],
            master=r["master"],
            pieces=tuple((int(a), int(b)) for a, b in r["pieces"]),
        )
        _check_record(root, rec)
        params[name] = rec
    groups = [{"params": list(g["params"]), "options": dict(g["options"])} for g in raw["param_groups"]]
    _check_membership(root, groups, params)
    model = {k: (tuple(int(d) for d in v["shape"]), _dtype_from(v["dtype"], k)) for k, v in raw["model"].items()}
    return CheckpointInfo(
        path=root,
        world_size=int(raw["world_size"]),
        stage=int(raw["stage"]),
        offload=raw["offload"],
        state_dtype=str(raw["state_dtype"]),
        master_weights=str(raw["master_weights"]),
        param_groups=groups,
        params=params,
        model=model,
        crc32={k: int(v) for k, v in raw["crc32"].items()},
        stored_bytes={},
        file_bytes=0,
    )


def _check_record(root: Path, rec: ParamRecord) -> None:
    """A record's step, formats and pieces agree with each other. A step <= 0 is not "no state" unless the record
    holds none: taking it so would silently reset the moments of a parameter that has them."""
    name = rec.name
    if rec.step < 0:
        raise CheckpointError(
            f"zeroadam.checkpoint: {root}: parameter {name!r} has step {rec.step}; steps count from 0: a corrupted "
            "checkpoint"
        )
    if not rec.has_state:
        if rec.step > 0 or rec.master is not None or rec.pieces:
            raise CheckpointError(
                f"zeroadam.checkpoint: {root}: parameter {name!r} has step {rec.step} and pieces {list(rec.pieces)} "
                "but no moment format: a corrupted checkpoint"
            )
        return
    if rec.moments not in _MOMENT_KEYS or rec.master not in _MASTER_KEYS:
        raise CheckpointError(f"zeroadam.checkpoint: {root}: parameter {name!r} has unknown formats")
    end = 0
    for a, b in rec.pieces:  # sorted, contiguous, block-aligned, covering [0, numel)
        if a != end or b <= a or a % quant.BLOCK_SIZE:
            break
        end = b
    if end != rec.numel:
        raise CheckpointError(
            f"zeroadam.checkpoint: {root}: the saved pieces of parameter {name!r} {list(rec.pieces)} do not "
            f"cover its {rec.numel} elements: a corrupted checkpoint"
        )


def _check_membership(root: Path, groups: list[dict[str, Any]], params: dict[str, ParamRecord]) -> None:
    """Every parameter a param group lists has a record naming that group, and every record is listed once."""
    listed: set[str] = set()
    for gi, g in enumerate(groups):
        for name in g["params"]:
            rec = params.get(name)
            if rec is None:
                raise CheckpointError(
                    f"zeroadam.checkpoint: {root}: param_groups[{gi}] lists parameter {name!r}, but {INFO_FILE} has "
                    "no record of it: a corrupted checkpoint"
                )
            if rec.group != gi or name in listed:
                raise CheckpointError(
                    f"zeroadam.checkpoint: {root}: parameter {name!r} is recorded in param group {rec.group} but "
                    f"listed in param_groups[{gi}]: a corrupted checkpoint"
                )
            listed.add(name)
    unlisted = sorted(set(params) - listed)
    if unlisted:
        raise CheckpointError(
            f"zeroadam.checkpoint: {root}: {INFO_FILE} records parameters {unlisted[:5]} that no param group lists: "
            "a corrupted checkpoint"
        )


def check_zero_step_state(rec: ParamRecord, entry: dict[str, Any]) -> None:
    """A record at step 0 may hold state only if its moments are zeros (state loaded before any step, then saved);
    otherwise the step was lost and the moments would be used with the wrong bias correction."""
    if rec.step != 0:
        return
    from zeroadam.state_dict.entries import decode_entry

    m, v = decode_entry(entry)
    if bool(m.any()) or bool(v.any()):
        raise CheckpointError(
            f"zeroadam.checkpoint: parameter {rec.name!r} has step 0 but non-zero moments: a corrupted checkpoint"
        )


def read_tensors(info: CheckpointInfo, wanted: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Read the named tensors (CPU) and check their checksums. Reads without collectives: each rank its own."""
    import torch.distributed.checkpoint as dcp

    out = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in wanted.items()}
    if not out:
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # DCP's notice that it loads without torch.distributed
            dcp.load(out, storage_reader=dcp.FileSystemReader(info.path), no_dist=True)
    except DCP_ERRORS as e:  # noqa: BLE001 - damaged data raises anything from torch.load
        # DCP wraps a reader's failure in CheckpointException, a BaseException: see [Note: DCP exceptions].
        raise CheckpointError(
            f"zeroadam.checkpoint: reading {info.path} failed ({failure_reason(e)}): a corrupted checkpoint"
        ) from e
    for key, t in out.items():
        if crc32_of(t) != info.crc32[key]:
            raise CheckpointError(
                f"zeroadam.checkpoint: {info.path}: tensor {key!r} does not match its checksum: a corrupted checkpoint"
            )
    return out


def assemble(rec: ParamRecord, a: int, b: int, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The shard entry of elements [a, b) of one parameter, cut from the saved pieces it overlaps (views when
    one piece covers it; int8 codes and scales are copied as they are)."""
    entry: dict[str, Any] = {"step": torch.tensor(float(rec.step)), "shard_elements": (a, b)}
    for key in rec.keys():
        parts = []
        for s, e in rec.pieces:
            lo, hi = max(a, s), min(b, e)
            if lo >= hi:
                continue
            t = data[piece_key(rec.name, key, s, e)]
            if key in SCALE_KEYS:
                # lo - s is a multiple of the block: a and s both start blocks of the parameter.
                parts.append(t.narrow(0, (lo - s) // quant.BLOCK_SIZE, quant.num_blocks(hi - lo)))
            else:
                parts.append(t.narrow(0, lo - s, hi - lo))
        if not parts:
            parts = [torch.empty(0, dtype=rec.keys()[key])]
        entry[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return entry


def wanted_pieces(rec: ParamRecord, a: int, b: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    for s, e in rec.pieces:
        if max(a, s) < min(b, e):
            for key, dtype in rec.keys().items():
                out[piece_key(rec.name, key, s, e)] = ((piece_numel(key, s, e),), dtype)
    return out

