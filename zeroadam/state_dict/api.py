"""Optimizer state dicts: the per-parameter format shared by every stage, validation, and conversion.

Each parameter's entry holds ``step`` (a float tensor, as torch.optim.AdamW), ``exp_avg`` and ``exp_avg_sq``
shaped like the parameter — fp32, bf16, or int8 / uint8 codes, then with ``exp_avg_scale`` and
``exp_avg_sq_scale`` (one fp32 absmax per 256-element block) — and, for 16-bit parameters, ``master`` (fp32)
or ``master_residual`` (int8). Everything is a tensor, a number or a string, so ``torch.load(weights_only=True)``
reads it. A ``torch.optim.AdamW`` state dict loads too (migration): its fp32 moments are converted.

Loading validates every entry before anything changes; a mismatch raises ``ValueError`` naming the parameter.

[Note: full state and shards]
With sharded stages no rank holds the whole state. ``state_dict()`` called by every rank (Accelerate's
``save_state`` does) gathers it to rank 0, one shard in flight at a time, into CPU memory; the other ranks get their
own *shard*: the same per-parameter entries, 1D, holding only elements [start, end) of the flattened parameter,
with ``shard_elements = (start, end)`` (start on a 256-element block, so int8 scales cover whole blocks), and
``zeroadam["shard"] = {"rank", "world"}`` at the top. Every parameter with state has an entry in a shard, empty
when the rank owns none of it, so that each rank knows every step count. ``consolidate_state_dict(to=r)`` (every
rank; the torch ``ZeroRedundancyOptimizer`` convention Lightning uses) gathers to rank r and keeps it until the
next ``step()``, so ``state_dict()`` then needs no communication on any rank. Before the first step there is no
state, so ``state_dict()`` never communicates (Accelerate calls it inside ``prepare``). ``load_state_dict``
accepts a full state dict from any world size or stage, or a shard that covers this rank's elements.

[Note: check-in]
A rank that calls a collective alone blocks until the process group's timeout (30 minutes for NCCL by default).
Before a gather, every rank therefore checks in through the process group's key-value store (an atomic counter
per call) and waits at most ``ZEROADAM_CHECK_IN_TIMEOUT`` seconds (default 10) for the others; a rank that waits
in vain takes its check-in back and raises ``RuntimeError`` naming the fix. The take-back is one atomic add; if
it shows that every other rank arrived meanwhile, the rank checks in again and proceeds, so no rank enters the
gather alone. Ranks number their check-ins in order, per process group: that order is the order of their
collectives, which every rank shares, and a failed check-in does not advance it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from zeroadam.formats import quant
from zeroadam.comm.collectives import Group
from zeroadam.formats.state import Master, MasterKind, Moments, compact_decode, ulp_up

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.optimizer import ZeroAdam

__all__ = [
    "build_state_dict",
    "apply_state_dict",
    "validate_state_dict",
    "consolidate_state_dict",
    "entry_of",
    "piece_entry",
    "entry_range",
    "entry_piece",
    "decode_entry",
    "local_ranges",
    "check_in",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_UNSUPPORTED_FLAGS = {"amsgrad": False, "maximize": False}
_IGNORED_KEYS = {"foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay", "amsgrad", "maximize"}


def entry_of(step: int, moments: Moments, master: Master, shape: torch.Size) -> dict[str, Any]:
    """The state-dict entry of one whole parameter (tensors are views of the stored state where possible)."""
    out: dict[str, Any] = {"step": torch.tensor(float(step))}
    for k, t in moments.tensors().items():
        out[k] = t.view(shape) if k in ("exp_avg", "exp_avg_sq") else t
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


def _fmt_of(entry: dict[str, Any], where: str) -> str:
    m = entry["exp_avg"]
    if m.dtype == torch.float32:
        return "fp32"
    if m.dtype == torch.bfloat16:
        return "bf16"
    if m.dtype == torch.int8:
        return "int8"
    raise ValueError(f"ZeroAdam.load_state_dict: {where}: exp_avg has dtype {m.dtype}; expected float32, bfloat16 or int8")


def _check_entry(entry: Any, p: torch.Tensor, where: str) -> str:
    """Validate one entry against its parameter; returns its moment format."""
    if not isinstance(entry, dict):
        raise ValueError(f"ZeroAdam.load_state_dict: {where}: state is a {type(entry).__name__}, expected a dict")
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in entry:
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: missing '{key}'")
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
    for key in ("exp_avg", "exp_avg_sq"):
        t = entry[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"ZeroAdam.load_state_dict: {where}: '{key}' has shape {got}, but the "
                f"{'parameter' if 'shard_elements' not in entry else 'shard'} has shape {shape}; "
                "was this state saved for another model?"
            )
    if fmt == "int8":
        if entry["exp_avg_sq"].dtype != torch.uint8:
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: int8 'exp_avg_sq' must be uint8 codes")
        for key in ("exp_avg_scale", "exp_avg_sq_scale"):
            t = entry.get(key)
            if not isinstance(t, torch.Tensor) or t.numel() != quant.num_blocks(n) or t.dtype != torch.float32:
                raise ValueError(
                    f"ZeroAdam.load_state_dict: {where}: int8 state needs '{key}' with {quant.num_blocks(n)} "
                    "float32 block scales"
                )
    elif entry["exp_avg_sq"].dtype != entry["exp_avg"].dtype:
        raise ValueError(f"ZeroAdam.load_state_dict: {where}: exp_avg and exp_avg_sq have different dtypes")
    for key, dtype in (("master", torch.float32), ("master_residual", torch.int8)):
        t = entry.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype):
            raise ValueError(f"ZeroAdam.load_state_dict: {where}: '{key}' must be {dtype} of shape {shape}")
    step = entry["step"]
    s = float(step) if isinstance(step, (torch.Tensor, int, float)) else None
    if s is None or s < 0 or s != int(s):
        raise ValueError(f"ZeroAdam.load_state_dict: {where}: step={step!r} is not a non-negative whole number")
    return fmt


def decode_entry(entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (exp_avg, exp_avg_sq), flattened, of a validated entry."""
    fmt = _fmt_of(entry, "")
    m, v = entry["exp_avg"].reshape(-1), entry["exp_avg_sq"].reshape(-1)
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
    from zeroadam.formats.state import STREAM_EXP_AVG, STREAM_EXP_AVG_SQ, mix_seed

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


def _group_hypers(saved: dict[str, Any], where: str) -> dict[str, Any]:
    for flag, allowed in _UNSUPPORTED_FLAGS.items():
        if saved.get(flag, allowed) != allowed:
            raise ValueError(f"ZeroAdam.load_state_dict: {where} has {flag}={saved[flag]!r}, which ZeroAdam does not support")
    return {k: v for k, v in saved.items() if k != "params" and k not in _IGNORED_KEYS}


# ---------------------------------------------------------------------------------------------- check-in
CHECK_IN_TIMEOUT_S = 10.0
"""Seconds a rank waits for the others before a gather (see [Note: check-in]); ZEROADAM_CHECK_IN_TIMEOUT overrides.
Ranks leave ``step()`` within milliseconds of each other (its all-gather syncs them), so ten seconds is ample
for an honest collective call and short enough to report a lone caller promptly."""

# Per process group (its global ranks), how many check-ins this process has completed: see [Note: check-in].
_check_in_counts: dict[tuple[int, ...], int] = {}


def _check_in_timeout() -> float:
    raw = os.environ.get("ZEROADAM_CHECK_IN_TIMEOUT")
    if raw is None:
        return CHECK_IN_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"ZeroAdam: invalid ZEROADAM_CHECK_IN_TIMEOUT={raw!r}; expected a number of seconds > 0")
    return value


def _group_store(group: Group) -> Optional[Any]:
    """The key-value store of the process group, or None where torch does not expose it."""
    c10d = dist.distributed_c10d
    get = getattr(c10d, "_get_process_group_store", None)
    try:
        return get(group.pg if group.pg is not None else c10d._get_default_group()) if get is not None else None
    except (KeyError, RuntimeError, ValueError):
        return None


def check_in(group: Group, what: str, fix: str) -> None:
    """Return once every rank of ``group`` has reached this call; raise RuntimeError naming ``fix`` if they do not
    within the check-in timeout (see [Note: check-in]). Call it right before a collective a rank may reach alone."""
    if group.world == 1:
        return
    store = _group_store(group)
    if store is None:  # pragma: no cover - every torch this project supports exposes the store
        return
    ranks = tuple(dist.get_process_group_ranks(group.pg)) if group.pg is not None else tuple(range(group.world))
    seq = _check_in_counts.get(ranks, 0)
    key = f"zeroadam/check_in/{'-'.join(map(str, ranks))}/{seq}"
    timeout = _check_in_timeout()
    deadline = time.monotonic() + timeout
    arrived = store.add(key, 1)
    pause = 0.001
    while arrived < group.world:
        if time.monotonic() > deadline:
            left = store.add(key, -1)  # take the check-in back, atomically
            if left < group.world - 1:
                raise RuntimeError(
                    f"{what} is collective: every rank of the process group must call it, but only {left + 1} of "
                    f"{group.world} ranks did within {timeout:g} s (this is rank {group.rank}). {fix} If the other "
                    "ranks are only slow to get there, raise the limit with ZEROADAM_CHECK_IN_TIMEOUT=<seconds>."
                )
            # Every other rank arrived meanwhile, and one may already be in the collective: check in again, go on.
            arrived = store.add(key, 1)
            continue
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
        arrived = store.add(key, 0)
    _check_in_counts[ranks] = seq + 1


_STATE_DICT_FIX = (
    "Call optimizer.state_dict() on every rank (rank 0 gets the full state, the others their shard), or call "
    "optimizer.consolidate_state_dict(to=0) on every rank first: then state_dict() on rank 0 alone needs no "
    "communication. zeroadam.checkpoint.save(path, model, optimizer) on every rank writes a sharded checkpoint. "
    "The Hugging Face Trainer saves from rank 0 alone: pass it "
    "callbacks=[zeroadam.integrations.transformers.ZeroAdamCallback()]."
)


# ---------------------------------------------------------------------------------------------- building
@dataclass
class _Consolidated:
    """The state gathered by consolidate_state_dict, served by state_dict() until the next step."""

    to: int
    entries: Optional[dict[torch.Tensor, dict[str, Any]]]  # whole entries on rank ``to``, None elsewhere
    hook: Any  # the step pre-hook that drops this


def _drop_consolidated(opt: "ZeroAdam") -> None:
    c: Optional[_Consolidated] = getattr(opt, "_consolidated", None)
    if c is not None:
        c.hook.remove()
    opt._consolidated = None  # type: ignore[attr-defined]


def _has_state(opt: "ZeroAdam") -> bool:
    return opt._zero.has_state()


def _flat_engine(opt: "ZeroAdam") -> bool:
    """Whether the engine is the stage 1-2 one (flat spaces), which gathers to one rank and hands out shards."""
    return opt._zero is not None and hasattr(opt._zero, "shard_entries")


def consolidate_state_dict(opt: "ZeroAdam", to: int) -> None:
    """Gather the full state to rank ``to`` (collective); see [Note: full state and shards]."""
    zero = opt._zero
    world = 1 if zero is None else zero.group.world
    if not isinstance(to, int) or isinstance(to, bool) or not 0 <= to < world:
        raise ValueError(
            f"ZeroAdam.consolidate_state_dict: invalid to={to!r}; expected a rank of the optimizer's process group, "
            f"0 .. {world - 1}"
        )
    _drop_consolidated(opt)
    if not _flat_engine(opt) or world == 1:
        return  # state_dict() needs no communication, or gathers everything to every rank itself
    entries: Optional[dict[torch.Tensor, dict[str, Any]]] = {} if zero.group.rank == to else None
    if _has_state(opt):
        check_in(
            zero.group,
            "ZeroAdam.consolidate_state_dict()",
            "Call optimizer.consolidate_state_dict(to=...) on every rank, then optimizer.state_dict() on that rank.",
        )
        entries = zero.full_entries(to)
    # The gathered copy would go stale (and hold memory) after the next update: drop it then.
    hook = opt.register_step_pre_hook(lambda *_: _drop_consolidated(opt))
    opt._consolidated = _Consolidated(to, entries, hook)  # type: ignore[attr-defined]


def _sharded_entries(opt: "ZeroAdam") -> tuple[dict[torch.Tensor, dict[str, Any]], Optional[dict[str, int]]]:
    """(entries this rank returns, shard description or None when they are whole)."""
    zero = opt._zero
    g = zero.group
    shard = {"rank": g.rank, "world": g.world}
    c: Optional[_Consolidated] = getattr(opt, "_consolidated", None)
    if c is not None:
        if g.rank == c.to:
            return {p: dict(e) for p, e in c.entries.items()}, None
        return zero.shard_entries(), shard
    if not _has_state(opt):
        return {}, None
    if g.world == 1:
        return zero.full_entries(0), None
    check_in(g, "ZeroAdam.state_dict()", _STATE_DICT_FIX)
    full = zero.full_entries(0)
    if g.rank == 0:
        return full, None
    return zero.shard_entries(), shard


def build_state_dict(opt: "ZeroAdam") -> dict[str, Any]:
    groups, state, idx = [], {}, 0
    entries, shard = None, None
    if _flat_engine(opt):
        entries, shard = _sharded_entries(opt)
    elif opt._zero is not None:
        entries = opt._zero.full_entries()
    for group in opt.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = []
        for p in group["params"]:
            g["params"].append(idx)
            if entries is not None:
                if p in entries:
                    state[idx] = entries[p]
            else:
                st = opt.state.get(p)
                if st is not None and hasattr(st, "moments"):
                    state[idx] = entry_of(st.step, st.moments, st.master, p.shape)
            idx += 1
        groups.append(g)
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "state_dtype": opt.options.state_dtype}
    if shard is not None:
        meta["shard"] = shard
    return {"state": state, "param_groups": groups, "zeroadam": meta}


# ---------------------------------------------------------------------------------------------- loading
def local_ranges(opt: "ZeroAdam") -> dict[torch.Tensor, tuple[int, int]]:
    """The flattened elements [start, end) of each parameter whose state this rank keeps: all of them in stage 0,
    the part inside its shard otherwise (parameters outside the shard are absent)."""
    if opt._zero is None:
        return {p: (0, p.numel()) for g in opt.param_groups for p in g["params"]}
    if not hasattr(opt._zero, "spaces"):  # stage 3: one piece per parameter
        return {pc.param: (pc.start, pc.start + pc.numel) for pc in opt._zero.pieces}
    out = {}
    for sp in opt._zero.spaces:
        for p, slot in zip(sp.params, sp.layout.slots):
            a, b = max(slot.start, sp.lo), min(slot.end, sp.hi)
            if a < b:
                out[p] = (a - slot.start, b - slot.start)
    return out


def _check_sharded_steps(opt: "ZeroAdam", checked: list[tuple[torch.Tensor, int, int, dict[str, Any]]]) -> None:
    if not hasattr(opt._zero, "spaces"):
        return  # stage 3 keeps a step count per parameter piece
    step_of = {p: step for p, _gi, step, _e in checked}
    for sp in opt._zero.spaces:
        steps = {step_of[p] for p in sp.params if p in step_of}
        if len(steps) > 1:
            raise ValueError(
                f"ZeroAdam.load_state_dict: parameters of param_groups[{sp.group_index}] have different step "
                f"counts {sorted(steps)}; a sharded ZeroAdam steps a whole group together"
            )


def validate_state_dict(opt: "ZeroAdam", sd: Any) -> list[tuple[torch.Tensor, int, int, dict[str, Any]]]:
    """Check a state dict against the optimizer; returns (param, group index, step, entry) per saved entry.

    Pure: nothing changes. Also checks that shard entries cover the elements this rank keeps.
    """
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("ZeroAdam.load_state_dict: expected a dict with 'state' and 'param_groups' (an optimizer state_dict)")
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"ZeroAdam.load_state_dict: the state dict has {len(saved_groups)} param groups, the optimizer "
            f"{len(opt.param_groups)}; build the optimizer with the same groups as the one that was saved"
        )
    index: dict[Any, tuple[torch.Tensor, int, str]] = {}
    for gi, (sg, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(sg["params"]) != len(group["params"]):
            raise ValueError(
                f"ZeroAdam.load_state_dict: param_groups[{gi}] has {len(sg['params'])} parameters in the state "
                f"dict and {len(group['params'])} in the optimizer"
            )
        _group_hypers(sg, f"param_groups[{gi}]")
        for i, (key, p) in enumerate(zip(sg["params"], group["params"])):
            index[key] = (p, gi, _param_name(gi, i, p))
    shard = (sd.get("zeroadam") or {}).get("shard")
    source = f"a shard saved by rank {shard['rank']} of {shard['world']}" if isinstance(shard, dict) else "a shard"
    need = local_ranges(opt)
    out = []
    for key, entry in sd["state"].items():
        if key not in index:
            raise ValueError(f"ZeroAdam.load_state_dict: state for parameter {key!r}, which no param group lists")
        p, gi, where = index[key]
        _check_entry(entry, p, where)
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
    if _flat_engine(opt):
        _check_sharded_steps(opt, out)
    return out


def apply_state_dict(opt: "ZeroAdam", sd: dict[str, Any]) -> None:
    checked = validate_state_dict(opt, sd)
    _drop_consolidated(opt)
    if opt._zero is not None:
        opt._zero.load_entries(checked)
    else:
        from zeroadam.optimizer import ParamState

        new_state = {}
        offsets = [opt._layout_offsets(g) for g in opt.param_groups]
        for p, gi, step, entry in checked:
            flat = p.detach().reshape(-1)
            whole = entry_piece(entry, 0, p.numel(), p.numel())
            new_state[p] = ParamState(
                step=step,
                moments=convert_moments(whole, opt._moment_format(p.numel()), p.numel(), p.device, step),
                master=convert_master(whole, opt._master_kind(p), flat),
                index_base=offsets[gi][p],
            )
        opt.state.clear()
        opt.state.update(new_state)
    for sg, group in zip(sd["param_groups"], opt.param_groups):
        group.update(_group_hypers(sg, ""))
        group["betas"] = tuple(group["betas"])
