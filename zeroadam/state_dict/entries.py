"""Optimizer state-dict entries: the per-parameter format shared by every stage, its validation and conversion.

Pure functions: nothing here communicates or changes an optimizer.

Each parameter's entry holds ``step`` (a float tensor, as torch.optim.AdamW), ``exp_avg`` and ``exp_avg_sq``
shaped like the parameter — fp32, bf16, or int8 / uint8 codes, then with ``exp_avg_scale`` and
``exp_avg_sq_scale`` (one fp32 absmax per 256-element block) — and, for 16-bit parameters, ``master`` (fp32)
or ``master_residual`` (int8). Everything is a tensor, a number or a string, so ``torch.load(weights_only=True)``
reads it. A ``torch.optim.AdamW`` state dict loads too (migration): its fp32 moments are converted.

Loading validates every entry before anything changes; a mismatch raises ``ValueError`` naming the parameter.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from zeroadam.formats import quant
from zeroadam.formats.table import MASTER_TENSORS, MOMENT_TENSORS, moment_format_of
from zeroadam.options import check_hyper
from zeroadam.formats.state import STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, Master, MasterKind, Moments, compact_decode, mix_seed, ulp_up

__all__ = [
    "FORMAT_VERSION",
    "entry_of",
    "piece_entry",
    "entry_range",
    "entry_piece",
    "check_entry",
    "decode_entry",
    "migrate_entry",
    "convert_moments",
    "convert_master",
    "group_hypers",
    "extra_state",
    "validate_state_dict",
]

FORMAT_VERSION = 1
# torch.optim.AdamW's flags that ZeroAdam has no code for: a group saved with them on is refused.
_UNSUPPORTED_FLAGS = {"amsgrad": False, "capturable": False, "differentiable": False}
# Keys that choose an implementation or name parameters, not the update: the optimizer's own are kept.
_IGNORED_KEYS = {"foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay", "amsgrad", "param_names"}


def entry_of(step: int, moments: Moments, master: Master, shape: torch.Size) -> dict[str, Any]:
    """The state-dict entry of one whole parameter (tensors are views of the stored state where possible)."""
    out: dict[str, Any] = {"step": torch.tensor(float(step))}
    per_block = {t.key for t in MOMENT_TENSORS[moments.fmt] if t.per_block}
    for k, t in moments.tensors().items():
        out[k] = t if k in per_block else t.view(shape)
    for k, t in master.tensors().items():
        out[k] = t.view(shape)
    return out


def piece_entry(step: int, moments: Moments, master: Master, start: int, end: int) -> dict[str, Any]:
    """The shard entry of elements [start, end) of one parameter: 1D tensors (see [Note: full state and shards])."""
    out: dict[str, Any] = {"step": torch.tensor(float(step))}
    out.update(moments.tensors())
    out.update(master.tensors())
    out["shard_elements"] = (int(start), int(end))
    return out


def entry_range(entry: dict[str, Any], numel: int) -> tuple[int, int]:
    """The elements [start, end) of its parameter that an entry holds: all of them unless it is a shard entry."""
    r = entry.get("shard_elements")
    return (0, numel) if r is None else (int(r[0]), int(r[1]))


def entry_piece(entry: dict[str, Any], start: int, end: int, numel: int) -> dict[str, Any]:
    """The flattened elements [start, end) of a validated entry, as a shard entry (views, no copies).

    ``start`` must lie on a block boundary of the parameter and [start, end) inside what the entry holds.
    """
    s, e = entry_range(entry, numel)
    assert s <= start <= end <= e and (start - s) % quant.BLOCK_SIZE == 0, (s, e, start, end)
    a, n = start - s, end - start
    out: dict[str, Any] = {"step": entry["step"], "shard_elements": (start, end)}
    for k, t in entry.items():
        if not isinstance(t, torch.Tensor) or k == "step":
            continue
        flat = t.reshape(-1)
        if k in ("exp_avg_scale", "exp_avg_sq_scale"):
            out[k] = flat.narrow(0, a // quant.BLOCK_SIZE, quant.num_blocks(n))
        else:
            out[k] = flat.narrow(0, a, n)
    return out


def _param_name(gi: int, i: int, p: torch.Tensor) -> str:
    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)}, {p.dtype})"


_LEGACY_INT8_KEYS = {"exp_avg": "exp_avg_codes", "exp_avg_sq": "exp_avg_sq_codes"}


def migrate_entry(entry: Any) -> Any:
    """An entry saved before int8 codes had keys of their own (codes under exp_avg / exp_avg_sq, see [Note: int8
    keys] in formats/table.py), with today's keys; any other entry as it is."""
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("exp_avg"), torch.Tensor)
        and entry["exp_avg"].dtype == torch.int8
        and "exp_avg_codes" not in entry
    ):
        return {_LEGACY_INT8_KEYS.get(k, k): v for k, v in entry.items()}
    return entry


def _fmt_of(entry: dict[str, Any], where: str) -> str:
    fmt = moment_format_of(entry)
    if fmt is None:
        firsts = {ts[0].key: ts[0].dtype for ts in MOMENT_TENSORS.values()}
        present = [k for k in firsts if isinstance(entry.get(k), torch.Tensor)]
        if not present:
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: missing 'exp_avg'")
        allowed = ", ".join(f"{k} of {str(d).replace('torch.', '')}" for k, d in firsts.items())
        raise ValueError(
            f"ZeroAdam.load_state_dict: {where}: {present[0]} has dtype {entry[present[0]].dtype}; expected {allowed}"
        )
    return fmt


def check_entry(entry: Any, p: torch.Tensor, where: str) -> str:
    """Validate one entry against its parameter; returns its moment format."""
    if not isinstance(entry, dict):
        raise ValueError(f"ZeroAdam.load_state_dict: {where}: state is a {type(entry).__name__}, expected a dict")
    if "step" not in entry:
        raise ValueError(f"ZeroAdam.load_state_dict: {where}: missing 'step'")
    if "max_exp_avg_sq" in entry:
        raise ValueError(f"ZeroAdam.load_state_dict: {where}: has 'max_exp_avg_sq' (amsgrad), which ZeroAdam does not support")
    fmt = _fmt_of(entry, where)
    n = p.numel()
    # A whole entry is shaped like its parameter; a shard entry is 1D over its shard_elements.
    shape: tuple[int, ...] = tuple(p.shape)
    if "shard_elements" in entry:
        r = entry["shard_elements"]
        ok = (
            isinstance(r, (tuple, list))
            and len(r) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            and 0 <= r[0] <= r[1] <= n
            and r[0] % quant.BLOCK_SIZE == 0
        )
        if not ok:
            raise ValueError(
                f"ZeroAdam.load_state_dict: {where}: shard_elements={r!r} is not a range (start, end) of the "
                f"parameter's {n} elements with start on a {quant.BLOCK_SIZE}-element block"
            )
        n = r[1] - r[0]
        shape = (n,)
    for key in (t.key for t in MOMENT_TENSORS[fmt] if not t.per_block):
        t = entry.get(key)
        if t is None:
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: missing '{key}'")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"ZeroAdam.load_state_dict: {where}: '{key}' has shape {got}, but the "
                f"{'parameter' if 'shard_elements' not in entry else 'shard'} has shape {shape}; "
                "was this state saved for another model?"
            )
    for spec in MOMENT_TENSORS[fmt][1:]:  # the first moment's key and dtype chose the format
        t = entry.get(spec.key)
        if not isinstance(t, torch.Tensor) or t.numel() != spec.numel(n) or t.dtype != spec.dtype:
            what = f"{spec.numel(n)} {spec.dtype} block scales" if spec.per_block else f"{spec.dtype} values"
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: {fmt} state needs '{spec.key}' with {what}")
    for spec in (s for ts in MASTER_TENSORS.values() for s in ts):
        t = entry.get(spec.key)
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != spec.dtype):
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: '{spec.key}' must be {spec.dtype} of shape {shape}")
    step = entry["step"]
    s = float(step) if isinstance(step, (torch.Tensor, int, float)) else None
    if s is None or s < 0 or s != int(s):
        raise ValueError(f"ZeroAdam.load_state_dict: {where}: step={step!r} is not a non-negative whole number")
    return fmt


def decode_entry(entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (exp_avg, exp_avg_sq), flattened, of a validated entry."""
    fmt = _fmt_of(entry, "")
    m_key, v_key = (t.key for t in MOMENT_TENSORS[fmt][:2])
    m, v = entry[m_key].reshape(-1), entry[v_key].reshape(-1)
    if fmt == "int8":
        return (
            quant.dequantize(quant.Quantized(m, entry["exp_avg_scale"].float()), "signed"),
            quant.dequantize(quant.Quantized(v, entry["exp_avg_sq_scale"].float()), "unsigned"),
        )
    return m.float(), v.float()


def convert_moments(
    entry: dict[str, Any], fmt: str, numel: int, device: torch.device, step: int, *, index_base: int = 0
) -> Moments:
    """Moments in format ``fmt`` from an entry in any format; same-format entries are copied bit for bit.

    ``index_base``: the flattened index of the entry's first element in its parameter (stochastic rounding draws
    by element index, so a piece converts to the same bits as the whole parameter would)."""
    out = Moments.zeros(fmt, numel, device)  # type: ignore[arg-type]
    src = _fmt_of(entry, "")
    if src == fmt:
        for k, t in out.tensors().items():
            t.copy_(entry[k].reshape(-1))
        return out
    m, v = decode_entry(entry)
    out.store(
        m.to(device),
        v.to(device),
        index_base=index_base,
        seed_m=mix_seed(step, 0, STREAM_EXP_AVG),
        seed_v=mix_seed(step, 0, STREAM_EXP_AVG_SQ),
    )
    return out


def convert_master(entry: dict[str, Any], kind: MasterKind, param_flat: torch.Tensor) -> Master:
    """Master storage of ``kind`` from an entry, relative to the parameter's current values."""
    out = Master.create(kind, param_flat.detach())
    full: Optional[torch.Tensor] = None
    if "master" in entry:
        full = entry["master"].reshape(-1).to(param_flat.device)
    elif "master_residual" in entry and param_flat.dtype != torch.float32:
        full = compact_decode(param_flat, entry["master_residual"].reshape(-1).to(param_flat.device))
    if full is None:
        return out
    if kind == "fp32":
        out.fp32.copy_(full)
    elif kind == "compact":
        e = full - param_flat.float()
        r = torch.round(e * 254.0 / ulp_up(param_flat)).clamp_(-127, 127)
        out.residual.copy_(torch.nan_to_num(r, nan=0.0).to(torch.int8))
    return out


def group_hypers(saved: dict[str, Any], where: str, current: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The options a saved param group installs, validated as the constructor validates them (``check_hyper``):
    a checkpoint or state dict with lr=-5, a NaN weight decay or betas=(0.9, 1.5) is refused before anything
    changes, not at the next step. ``current``: the optimizer's live group, for options the saved one lacks."""
    for flag, allowed in _UNSUPPORTED_FLAGS.items():
        if saved.get(flag, allowed) != allowed:
            raise ValueError(f"ZeroAdam.load_state_dict: {where} has {flag}={saved[flag]!r}, which ZeroAdam does not support")
    out = {k: v for k, v in saved.items() if k != "params" and k not in _IGNORED_KEYS}
    merged = {**(current or {}), **out}
    hypers = ("lr", "betas", "eps", "weight_decay")
    if all(k in merged for k in hypers):
        try:
            check_hyper(*(merged[k] for k in hypers))
        except ValueError as e:
            detail = str(e).removeprefix("ZeroAdam: ")
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: {detail}") from None
    return out


def extra_state(sd: dict[str, Any]) -> dict[Any, Any]:
    """The entries of ``sd["state"]`` that belong to no parameter (keys that are not parameter numbers).

    torch.optim keeps whatever non-parameter keys ``optimizer.state`` holds (a state-dict pre-hook may add one, a
    subclass may keep counters there) and puts them back on load, unchanged; so does ZeroAdam. A key that a saved
    param group lists is a parameter's, whatever its type: torch's ``get_optimizer_state_dict`` names parameters by
    their fully qualified names."""
    listed = {k for g in sd["param_groups"] for k in g["params"]}
    return {k: v for k, v in sd["state"].items() if k not in listed and (not isinstance(k, int) or isinstance(k, bool))}


def validate_state_dict(
    param_groups: list[dict[str, Any]], need: dict[torch.Tensor, tuple[int, int]], sd: Any
) -> list[tuple[torch.Tensor, int, int, dict[str, Any]]]:
    """Check a state dict against an optimizer's param groups; returns (param, group index, step, entry) per
    saved entry. ``need``: the elements [start, end) of each parameter whose state this rank keeps (an engine's
    ``local_ranges()``); shard entries must cover them.

    Pure: nothing changes.
    """
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("ZeroAdam.load_state_dict: expected a dict with 'state' and 'param_groups' (an optimizer state_dict)")
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"ZeroAdam.load_state_dict: the state dict has {len(saved_groups)} param groups, the optimizer "
            f"{len(param_groups)}; build the optimizer with the same groups as the one that was saved"
        )
    index: dict[Any, tuple[torch.Tensor, int, str]] = {}
    for gi, (sg, group) in enumerate(zip(saved_groups, param_groups)):
        if len(sg["params"]) != len(group["params"]):
            raise ValueError(
                f"ZeroAdam.load_state_dict: param_groups[{gi}] has {len(sg['params'])} parameters in the state "
                f"dict and {len(group['params'])} in the optimizer"
            )
        group_hypers(sg, f"param_groups[{gi}]", group)
        names = sg.get("param_names")
        if names is not None and (
            not isinstance(names, (list, tuple))
            or len(names) != len(sg["params"])
            or not all(isinstance(n, str) for n in names)
        ):
            raise ValueError(
                f"ZeroAdam.load_state_dict: param_groups[{gi}]['param_names'] is {names!r}; expected one name (a "
                f"string) per parameter, {len(sg['params'])} in all"
            )
        for i, (key, p) in enumerate(zip(sg["params"], group["params"])):
            index[key] = (p, gi, _param_name(gi, i, p))
    shard = (sd.get("zeroadam") or {}).get("shard")
    source = f"a shard saved by rank {shard['rank']} of {shard['world']}" if isinstance(shard, dict) else "a shard"
    out = []
    for key, entry in sd["state"].items():
        if key not in index:
            if not isinstance(key, int) or isinstance(key, bool):
                continue  # the optimizer's own entry (not a parameter's): installed as it is, see extra_state()
            raise ValueError(f"ZeroAdam.load_state_dict: state for parameter {key!r}, which no param group lists")
        p, gi, where = index[key]
        entry = migrate_entry(entry)
        check_entry(entry, p, where)
        s, e = entry_range(entry, p.numel())
        a, b = need.get(p, (0, 0))
        if a < b and not (s <= a and b <= e):
            raise ValueError(
                f"ZeroAdam.load_state_dict: {where}: this state dict is {source} and holds elements [{s}, {e}) of "
                f"the parameter, but this rank keeps [{a}, {b}). Load a full state dict instead (call "
                "optimizer.consolidate_state_dict(to=0) on every rank, then state_dict() on rank 0), or save and "
                "load with zeroadam.checkpoint, which reshards to any world size"
            )
        out.append((p, gi, int(float(entry["step"])), entry))
    return out
