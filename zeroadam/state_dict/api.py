"""The optimizer's state_dict / load_state_dict / consolidate_state_dict: the collective part.

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from zeroadam.comm.check_in import check_in
from zeroadam.state_dict.entries import FORMAT_VERSION, extra_state, group_hypers, validate_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.optimizer import ZeroAdam

__all__ = ["build_state_dict", "apply_state_dict", "consolidate_state_dict"]

_STATE_DICT_FIX = (
    "Call optimizer.state_dict() on every rank (rank 0 gets the full state, the others their shard), or call "
    "optimizer.consolidate_state_dict(to=0) on every rank first: then state_dict() on rank 0 alone needs no "
    "communication. zeroadam.checkpoint.save(path, model, optimizer) on every rank writes a sharded checkpoint. "
    "The Hugging Face Trainer saves from rank 0 alone: pass it "
    "callbacks=[zeroadam.integrations.transformers.ZeroAdamCallback()]."
)


# [Note: DCP and sharded state dicts]
# torch.distributed.checkpoint takes a plain tensor for the same value on every rank (it keeps one copy of each name).
# A sharded state dict holds different tensors under the same names: the whole state on rank 0, each rank's shard
# elsewhere. dcp.save of it fails inside DCP with an AssertionError that names no fix, or, where every saved tensor is
# 1D, keeps one rank's piece as if it were the whole tensor; and an in-place dcp.load would fill rank 0's gathered
# copies, not the state. So the step tensors of a sharded state dict refuse DCP: DCP asks every value it saves for
# ``__create_write_items__``, and every tensor it loads into for ``__create_chunk_list__`` (its protocol for tensors
# that describe their own pieces, as DTensor does), and theirs raise with the fix. The attributes are the tensor's
# own and its ``__getstate__`` leaves them out, so torch.save writes a plain tensor (torch.load(weights_only=True) reads
# it). DCP checkpoints of sharded state: zeroadam.checkpoint.
DCP_FIX = (
    "torch.distributed.checkpoint cannot take a sharded ZeroAdam's state_dict() (or get_optimizer_state_dict): rank 0 "
    "holds the whole state and the other ranks their shard under the same names. Use zeroadam.checkpoint.save(path, "
    "model, optimizer) / zeroadam.checkpoint.load(path, model, optimizer), which write and reshard the shards through "
    "DCP; or torch.save(optimizer.state_dict()) on rank 0 and optimizer.load_state_dict(...) on every rank"
)


def _refuse_dcp_save(fqn: str, obj: Any) -> Any:
    raise RuntimeError(f"ZeroAdam: {fqn}: {DCP_FIX}")


def _refuse_dcp_load() -> Any:
    # A RuntimeError: DCP rewords a ValueError here as a problem of the checkpoint's metadata.
    raise RuntimeError(f"ZeroAdam: {DCP_FIX}")


def _no_state() -> dict[str, Any]:
    return {}


def _mark_sharded(entries: dict[torch.Tensor, dict[str, Any]]) -> None:
    """Make the entries refuse torch.distributed.checkpoint (see [Note: DCP and sharded state dicts])."""
    for entry in entries.values():
        step = entry.get("step")
        if isinstance(step, torch.Tensor):
            step = entry["step"] = step.clone()  # never the caller's own tensor
            step.__create_write_items__ = _refuse_dcp_save  # type: ignore[attr-defined]  # dcp.save
            step.__create_chunk_list__ = _refuse_dcp_load  # type: ignore[attr-defined]  # dcp.load, in place
            step.__getstate__ = _no_state  # type: ignore[method-assign]


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


def consolidate_state_dict(opt: "ZeroAdam", to: int) -> None:
    """Gather the full state to rank ``to`` (collective); see [Note: full state and shards]."""
    engine = opt.engine
    world = engine.group.world
    if not isinstance(to, int) or isinstance(to, bool) or not 0 <= to < world:
        raise ValueError(
            f"ZeroAdam.consolidate_state_dict: invalid to={to!r}; expected a rank of the optimizer's process group, "
            f"0 .. {world - 1}"
        )
    _drop_consolidated(opt)
    if not engine.gathers_state_dict or world == 1:
        return  # state_dict() needs no communication, or gathers everything to every rank itself
    entries: Optional[dict[torch.Tensor, dict[str, Any]]] = {} if engine.group.rank == to else None
    if engine.has_state():
        check_in(
            engine.group,
            "ZeroAdam.consolidate_state_dict()",
            "Call optimizer.consolidate_state_dict(to=...) on every rank, then optimizer.state_dict() on that rank.",
        )
        entries = engine.full_entries(to)
    # The gathered copy would go stale (and hold memory) after the next update: drop it then.
    hook = opt.register_step_pre_hook(lambda *_: _drop_consolidated(opt))
    opt._consolidated = _Consolidated(to, entries, hook)  # type: ignore[attr-defined]


def _entries(opt: "ZeroAdam") -> tuple[dict[torch.Tensor, dict[str, Any]], Optional[dict[str, int]]]:
    """(entries this rank returns, shard description or None when they are whole)."""
    engine = opt.engine
    g = engine.group
    shard = {"rank": g.rank, "world": g.world}
    c: Optional[_Consolidated] = getattr(opt, "_consolidated", None)
    if c is not None:
        if g.rank == c.to:
            return {p: dict(e) for p, e in c.entries.items()}, None
        return engine.shard_entries(), shard
    if not engine.has_state():
        return {}, None
    if g.world == 1 or not engine.gathers_state_dict:
        return engine.full_entries(0), None  # DTensor entries: collective on every rank
    check_in(g, "ZeroAdam.state_dict()", _STATE_DICT_FIX)
    full = engine.full_entries(0)
    if g.rank == 0:
        return full, None
    return engine.shard_entries(), shard


def build_state_dict(opt: "ZeroAdam") -> dict[str, Any]:
    groups, state = [], {}
    index: dict[int, int] = {}  # id(param) -> its number: a parameter listed twice keeps one (as torch.optim)
    entries, shard = _entries(opt)
    if opt.engine.gathers_state_dict and opt.engine.group.world > 1:
        _mark_sharded(entries)
    for group in opt.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = []
        for p in group["params"]:
            idx = index.setdefault(id(p), len(index))
            g["params"].append(idx)
            if p in entries:
                state[idx] = entries[p]
        groups.append(g)
    # What optimizer.state holds besides parameters' state (torch.optim packs those keys as they are).
    state.update((k, v) for k, v in opt.state.items() if not isinstance(k, torch.Tensor))
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "state_dtype": opt.options.state_dtype}
    if shard is not None:
        meta["shard"] = shard
    return {"state": state, "param_groups": groups, "zeroadam": meta}


def apply_state_dict(opt: "ZeroAdam", sd: dict[str, Any]) -> None:
    """Validate ``sd`` in full, then install it: nothing changes when anything is refused."""
    engine = opt.engine
    checked = validate_state_dict(opt.param_groups, engine.local_ranges(), sd)
    engine.check_entries(checked)
    _drop_consolidated(opt)
    engine.load_entries(checked)
    # As torch.optim: the state dict's non-parameter entries replace the optimizer's.
    for k in [k for k in opt.state if not isinstance(k, torch.Tensor)]:
        del opt.state[k]
    opt.state.update(extra_state(sd))
    for gi, (sg, group) in enumerate(zip(sd["param_groups"], opt.param_groups)):
        group.update(group_hypers(sg, f"param_groups[{gi}]", group))
        group["betas"] = tuple(group["betas"])
        if "param_names" in sg:  # as torch.optim: saved names replace the optimizer's (or are added)
            group["param_names"] = list(sg["param_names"])
