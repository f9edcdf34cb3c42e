"""FSDP2: ``ZeroAdam(stage=0)`` over the DTensor parameters of ``torch.distributed.fsdp.fully_shard``.

``fully_shard`` keeps each parameter as a DTensor split along dim 0 across the mesh; its gradient arrives already
reduce-scattered and averaged, sharded the same way. ``ZeroAdam`` notices DTensor parameters and hands them to
``DTensorEngine``: each rank keeps state for its local shard only, in ZeroAdam's formats, and updates it with the
fused kernel. Clipping and the non-finite check use the global norm (one all-reduce over the shard group).

[Note: blocks across shard boundaries]
Quantization blocks are 256 elements along the *global* flattened parameter (as everywhere in ZeroAdam), so the
int8 state of a parameter is the same whatever the mesh size. FSDP2 cuts dim 0 into ``ceil(rows / world)`` rows per
rank; when a cut falls inside a block, two (or more) ranks hold parts of that block. Each rank's local range is
therefore split into pieces: whole blocks (one run for the fused kernel) and at most two *straddling* pieces, whose
block continues on a neighbour. A straddling piece is updated with the reference AdamW in fp32; then one all-reduce
(MAX, over the shard group, for all parameters at once) gives every straddling block its absmax over all ranks,
and each rank quantizes its part with that shared scale. With hidden sizes that are multiples of 256 no cut falls
inside a block and the exchange is empty.

[Note: DTensor state dicts]
``state_dict()`` returns, for each parameter, DTensors placed like the parameter (``exp_avg``, ``exp_avg_sq``, and
``master`` / ``master_residual`` for 16-bit parameters) and, for int8 state, the block scales as Replicate DTensors
of the whole parameter (gathered by one all-reduce; 1/256 of the elements). ``torch.distributed.checkpoint`` saves
and loads that, reshards it to another mesh, and ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` name the
entries by parameter FQN. ``load_state_dict`` also takes plain whole tensors (a single-process ZeroAdam or
``torch.optim.AdamW`` state dict) and entries of another format.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from zeroadam.formats import quant
from zeroadam.comm.collectives import CommStats, Group, all_reduce_sum
from zeroadam.engines.base import CheckedEntry, Engine, EngineSetup, Entries
from zeroadam.engines.state_view import LocalState, ShardState
from zeroadam.update.contract import Run, StepScalars
from zeroadam.update.dispatch import fused_updates, grads_sq_sum
from zeroadam.options import BLOCK_SIZE, GroupHyper
from zeroadam.reference import adamw_reference
from zeroadam.formats.state import Master, Moments
from zeroadam.formats.table import MASTER_TENSORS, MOMENT_TENSORS, moment_format_of
from zeroadam.state_dict.entries import convert_master, convert_moments

__all__ = ["DTensorEngine", "Piece", "DTensorParamState"]


@dataclass(eq=False)
class Piece:
    """A contiguous part of one parameter's local shard: elements [start, start + numel) of the global flattened
    parameter, at ``local`` in the local flattened shard."""

    start: int
    numel: int
    local: int
    moments: Moments
    master: Master
    straddle: Optional[int] = None  # its block's slot in the absmax exchange, when the block crosses a shard cut

    @property
    def end(self) -> int:
        return self.start + self.numel


class DTensorParamState(ShardState):
    """Stage-0 state of one DTensor parameter (kept in ``optimizer.state[p]``): the pieces of its local shard, views
    of one contiguous storage of the local range [start, end) of the flattened parameter, which the mapping shows
    (see [Note: state views] in engines/state_view.py). int8 scales: one per block the local range touches, a block
    cut by a shard boundary included (its scale is the same on both ranks, see [Note: blocks across shard
    boundaries])."""

    def __init__(self, step: int, start: int, end: int, moments: Moments, master: Master) -> None:
        super().__init__(LocalState(self, start, end, moments, master))
        self.step = step
        self.pieces: list[Piece] = []


def _shard_dim_of(p: DTensor) -> int:
    """The mesh dimension along which ``p`` is Shard(0); every other mesh dimension must replicate it."""
    shard_dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    ok = len(shard_dims) == 1 and p.placements[shard_dims[0]] == Shard(0)
    ok = ok and all(isinstance(pl, (Shard, Replicate)) for pl in p.placements)
    if not ok:
        raise ValueError(
            f"ZeroAdam: DTensor parameter of shape {tuple(p.shape)} has placements {p.placements}; ZeroAdam supports "
            "FSDP2's Shard(0), optionally with Replicate mesh dimensions (HSDP)"
        )
    return shard_dims[0]


def _cuts(rows: int, row_numel: int, world: int) -> list[int]:
    """Global flat indices where FSDP2's dim-0 chunks of a parameter begin, after the first (torch.chunk sizes)."""
    per = -(-rows // world) if rows else 0
    return [min(r * per, rows) * row_numel for r in range(1, world)]


def _local_range(p: DTensor, mesh_dim: int) -> tuple[int, int]:
    numel = p.numel()
    rows = p.shape[0] if p.dim() else 1
    row_numel = numel // rows if rows else 0
    world = p.device_mesh.size(mesh_dim)
    rank = p.device_mesh.get_local_rank(mesh_dim)
    bounds = [0] + _cuts(rows, row_numel, world) + [numel]
    s, e = bounds[rank], bounds[rank + 1]
    assert e - s == p.to_local().numel(), (s, e, p.to_local().shape)
    return s, e


def _straddling_blocks(p: DTensor, mesh_dim: int) -> list[int]:
    """Blocks of ``p`` that a shard cut splits, in order (the same list on every rank)."""
    numel = p.numel()
    rows = p.shape[0] if p.dim() else 1
    cuts = _cuts(rows, numel // rows if rows else 0, p.device_mesh.size(mesh_dim))
    return sorted({c // BLOCK_SIZE for c in cuts if 0 < c < numel and c % BLOCK_SIZE})


class DTensorEngine(Engine):
    """ZeroAdam's stage-0 update over FSDP2 DTensor parameters (see the notes above)."""

    def __init__(self, setup: EngineSetup) -> None:
        self.setup = setup
        params = setup.params()
        if not all(isinstance(p, DTensor) for p in params):
            raise ValueError(
                "ZeroAdam: some parameters are DTensors (FSDP2) and some are not; fully_shard the root module too, "
                "so that every parameter is sharded, or use separate optimizers"
            )
        dims = {(p.device_mesh, _shard_dim_of(p)) for p in params}
        if len(dims) != 1:
            raise ValueError("ZeroAdam: DTensor parameters on different device meshes; use one optimizer per mesh")
        mesh, self.mesh_dim = dims.pop()
        pg = mesh.get_group(self.mesh_dim)
        self.group = Group(pg, dist.get_rank(pg), dist.get_world_size(pg))
        self.stats = CommStats(self.group.world)
        self._last_stats: dict[str, Any] = self.stats.snapshot()
        # Slots of the absmax exchange: parameter -> {block: slot} for every straddling block of int8 state.
        self.slots: dict[torch.Tensor, dict[int, int]] = {}
        self.num_slots = 0
        for g in setup.param_groups:
            for p in g["params"]:
                if setup.policy.moment_format(p.numel()) == "int8":
                    blocks = _straddling_blocks(p, self.mesh_dim)
                    self.slots[p] = {b: self.num_slots + i for i, b in enumerate(blocks)}
                    self.num_slots += len(blocks)

    @staticmethod
    def create(setup: EngineSetup) -> "DTensorEngine":
        o = setup.options
        if o.stage != 0 or o.offload is not None:
            raise ValueError(
                f"ZeroAdam: DTensor (FSDP2) parameters need stage=0 without offload (got stage={o.stage}, "
                f"offload={o.offload!r}): fully_shard already shards parameters, gradients and so the state"
            )
        return DTensorEngine(setup)

    # ---------------------------------------------------------------- state
    def _pieces(self, p: DTensor, fmt: str) -> list[tuple[int, int, Optional[int]]]:
        """(start, end, straddle slot) of the pieces of this rank's range of ``p``."""
        s, e = _local_range(p, self.mesh_dim)
        if s == e:
            return []
        if fmt != "int8":
            return [(s, e, None)]
        n = p.numel()
        out: list[tuple[int, int, Optional[int]]] = []
        a = s
        if s % BLOCK_SIZE:  # head: the rest of a block that starts on another rank
            h = min(e, (s // BLOCK_SIZE + 1) * BLOCK_SIZE)
            out.append((s, h, self.slots[p][s // BLOCK_SIZE]))
            a = h
        b = e if (e % BLOCK_SIZE == 0 or e == n) else max(a, e // BLOCK_SIZE * BLOCK_SIZE)
        if b > a:
            out.append((a, b, None))
        if e > b:  # tail: the start of a block that continues on another rank
            out.append((b, e, self.slots[p][b // BLOCK_SIZE]))
        return out

    def _init_state(self, p: DTensor) -> DTensorParamState:
        setup = self.setup
        fmt = setup.policy.moment_format(p.numel())
        s, e = _local_range(p, self.mesh_dim)
        local = p.to_local().detach().reshape(-1)
        b0 = s // BLOCK_SIZE  # the first block the local range touches: scale 0 of the storage
        blocks = (e - 1) // BLOCK_SIZE - b0 + 1 if e > s else 0
        tensors = {
            t.key: torch.zeros(blocks if t.per_block else e - s, dtype=t.dtype, device=local.device)
            for t in MOMENT_TENSORS[fmt]
        }
        moments = Moments.of(fmt, tensors)  # type: ignore[arg-type]
        master = Master.create(setup.policy.master_kind(p), local)
        st = DTensorParamState(0, s, e, moments, master)
        for a, b, slot in self._pieces(p, fmt):
            views = {
                t.key: tensors[t.key].narrow(0, a // BLOCK_SIZE - b0, quant.num_blocks(b - a))
                if t.per_block
                else tensors[t.key].narrow(0, a - s, b - a)
                for t in MOMENT_TENSORS[fmt]
            }
            st.pieces.append(
                Piece(
                    start=a,
                    numel=b - a,
                    local=a - s,
                    moments=Moments.of(fmt, views),  # type: ignore[arg-type]
                    master=master.narrow(a - s, b - a),
                    straddle=slot,
                )
            )
        return st

    def _state(self, p: DTensor) -> DTensorParamState:
        st = self.setup.state.get(p)
        if not isinstance(st, DTensorParamState):
            st = self.setup.state[p] = self._init_state(p)
        return st

    # ---------------------------------------------------------------- the optimizer's engine interface
    def before_step(self) -> None:
        pass

    def local_grad_sq_sum(self) -> torch.Tensor:
        # Every local shard at once (grads_sq_sum: one kernel call on the CPU, two launches on CUDA), where a torch
        # reduction per tensor cost a model of hundreds of parameters hundreds of launches and host round trips.
        return grads_sq_sum([p.grad.to_local() for g in self.setup.param_groups for p in g["params"] if p.grad is not None])

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.group, t, self.stats)

    def scale_grads(self, factor: float) -> None:
        # The gradients the update reads are p.grad's local shards (FSDP2 reduced them already).
        for p in self.setup.params():
            if p.grad is not None:
                p.grad.to_local().mul_(factor)

    def step(self, scale: float) -> None:
        setup = self.setup
        pending: list[tuple[Piece, torch.Tensor, torch.Tensor]] = []  # straddling pieces: new fp32 (m, v)
        absmax: Optional[torch.Tensor] = None
        for gi, group in enumerate(setup.param_groups):
            hyper = GroupHyper.of(group)
            offsets = None
            # Runs of one step count share the step's scalars: fused_updates takes them together (one Triton launch
            # per storage combination on CUDA, one kernel call on the CPU) instead of one launch per local shard.
            by_step: dict[int, list[Run]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue  # like torch.optim.AdamW
                if offsets is None:
                    offsets = setup.policy.layout_offsets(group["params"])
                st = self._state(p)
                st.step += 1
                sc = StepScalars.for_group(hyper, st.step, scale, gi)
                flat = p.to_local().detach().view(-1)
                grad = p.grad.to_local().detach().reshape(-1)
                for pc in st.pieces:
                    run = Run(
                        param=flat.narrow(0, pc.local, pc.numel),
                        grad=grad.narrow(0, pc.local, pc.numel),
                        moments=pc.moments,
                        master=pc.master,
                        index_base=offsets[p] + pc.start,
                    )
                    if pc.straddle is None:
                        by_step.setdefault(st.step, []).append(run)
                        continue
                    m, v = _update_fp32(run, sc)
                    if absmax is None:
                        absmax = torch.zeros(2 * self.num_slots, dtype=torch.float32, device=m.device)
                    absmax[2 * pc.straddle] = torch.maximum(absmax[2 * pc.straddle], m.abs().max())
                    absmax[2 * pc.straddle + 1] = torch.maximum(absmax[2 * pc.straddle + 1], v.max())
                    pending.append((pc, m, v))
            for step, runs in by_step.items():
                fused_updates(runs, StepScalars.for_group(hyper, step, scale, gi), setup.backend)
        if self.num_slots:
            # Every rank joins, with zeros when it holds no straddling piece that stepped (see the note).
            if absmax is None:
                absmax = torch.zeros(2 * self.num_slots, dtype=torch.float32, device=self._device())
            self.stats.add("all_reduce", absmax)
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=self.group.pg)
            for pc, m, v in pending:
                _store_with_scale(pc.moments, m, v, absmax[2 * pc.straddle], absmax[2 * pc.straddle + 1])
        self._end_step()

    def _device(self) -> torch.device:
        return next(p for g in self.setup.param_groups for p in g["params"]).to_local().device

    def _end_step(self) -> None:
        self._last_stats = self.stats.snapshot()
        self.stats.reset()

    def after_skip(self) -> None:
        self._end_step()

    def zero_grad(self) -> None:
        pass

    def no_sync(self) -> "contextlib.AbstractContextManager[None]":
        # FSDP2 reduces gradients itself; model.set_requires_gradient_sync(False) defers that.
        return contextlib.nullcontext()

    def comm_stats(self) -> dict[str, Any]:
        return self._last_stats

    def memory_stats(self) -> dict[str, int]:
        params = [p for g in self.setup.param_groups for p in g["params"]]
        stats = {
            "param_bytes": sum(p.to_local().numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.grad.to_local().numel() * p.element_size() for p in params if p.grad is not None),
            "state_bytes": 0,
            "master_bytes": 0,
            "buffer_bytes": 0,  # FSDP2 allocates and owns the communication buffers
        }
        for st in self.setup.state.values():
            if isinstance(st, DTensorParamState):
                stats["state_bytes"] += sum(pc.moments.nbytes() for pc in st.pieces)
                stats["master_bytes"] += sum(pc.master.nbytes() for pc in st.pieces)
        return stats

    # ---------------------------------------------------------------- state dicts
    def has_state(self) -> bool:
        return any(isinstance(st, DTensorParamState) for st in self.setup.state.values())

    def local_ranges(self) -> dict[torch.Tensor, tuple[int, int]]:
        out = {}
        for p in self.setup.params():
            s, e = _local_range(p, self.mesh_dim)
            if s < e:
                out[p] = (s, e)
        return out

    def shard_entries(self) -> Entries:
        raise RuntimeError(
            "zeroadam.checkpoint does not take FSDP2 (DTensor) parameters: their state dict is already made of "
            "DTensors; save it with torch.distributed.checkpoint (dcp.save({'optim': optimizer.state_dict()}, ...)) "
            "or get_optimizer_state_dict"
        )

    def full_entries(self, to: int = 0) -> dict[torch.Tensor, dict[str, Any]]:
        """Every parameter's entry, of DTensors placed like it (see [Note: DTensor state dicts]), on every rank;
        collective (``ZeroAdam.state_dict()`` calls it)."""
        setup = self.setup
        entries: dict[torch.Tensor, dict[str, Any]] = {}
        scale_jobs: list[tuple[DTensor, DTensorParamState]] = []
        for group in setup.param_groups:
            for p in group["params"]:
                st = setup.state.get(p)
                if isinstance(st, DTensorParamState):
                    entries[p] = self._entry(p, st)
                    if setup.policy.moment_format(p.numel()) == "int8":
                        scale_jobs.append((p, st))
        # Scales of whole parameters, one all-reduce (MAX) for all: each rank fills the blocks it holds.
        sizes = [quant.num_blocks(p.numel()) for p, _ in scale_jobs]
        if scale_jobs:
            flat = torch.zeros(2 * sum(sizes), dtype=torch.float32, device=self._device())
            off = 0
            for (p, st), nb in zip(scale_jobs, sizes):
                for pc in st.pieces:
                    b0, k = pc.start // BLOCK_SIZE, quant.num_blocks(pc.numel)
                    flat[off + b0 : off + b0 + k] = pc.moments.exp_avg_scale
                    flat[off + nb + b0 : off + nb + b0 + k] = pc.moments.exp_avg_sq_scale
                off += 2 * nb
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.group.pg)
            off = 0
            for (p, _), nb in zip(scale_jobs, sizes):
                rep = [Replicate()] * p.device_mesh.ndim
                for k, lo in (("exp_avg_scale", off), ("exp_avg_sq_scale", off + nb)):
                    entries[p][k] = DTensor.from_local(flat[lo : lo + nb].clone(), p.device_mesh, rep, run_check=False)
                off += 2 * nb
        return entries

    def _entry(self, p: DTensor, st: DTensorParamState) -> dict[str, Any]:
        local_shape = p.to_local().shape

        def like_param(parts: list[torch.Tensor], dtype: torch.dtype) -> DTensor:
            local = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=p.to_local().device)
            return DTensor.from_local(
                local.view(local_shape), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )

        out: dict[str, Any] = {"step": torch.tensor(float(st.step))}
        fmt = self.setup.policy.moment_format(p.numel())
        kind = self.setup.policy.master_kind(p)
        # Element-wise tensors are placed like the parameter; int8 block scales are added by full_entries.
        for t in (*MOMENT_TENSORS[fmt], *MASTER_TENSORS[kind]):
            if not t.per_block:
                out[t.key] = like_param([{**pc.moments.tensors(), **pc.master.tensors()}[t.key] for pc in st.pieces], t.dtype)
        return out

    def load_entries(self, checked: list[CheckedEntry]) -> None:
        """Install validated entries: of DTensors (any mesh), or of whole plain tensors; any format. Collective
        when an entry must be gathered (another placement, or a format conversion)."""
        new = {p: self._load_entry(p, step, entry) for p, _gi, step, entry in checked}
        self.setup.state.clear()
        self.setup.state.update(new)

    def _load_entry(self, p: DTensor, step: int, entry: dict[str, Any]) -> DTensorParamState:
        fmt = self.setup.policy.moment_format(p.numel())
        src_fmt = moment_format_of(entry)  # validated: one of the formats
        st = self._init_state(p)
        st.step = step
        local = p.to_local().detach().reshape(-1)
        s, _ = _local_range(p, self.mesh_dim)
        # Same format: this rank's elements are enough. Another format: whole tensors, so that a straddling
        # block gets the absmax of all its elements after conversion.
        whole = src_fmt != fmt
        windows = {k: _flat_window(t, p, whole, s) for k, t in entry.items() if isinstance(t, torch.Tensor) and k != "step"}

        def sub_entry(start: int, n: int) -> dict[str, torch.Tensor]:
            out = {}
            for spec in MOMENT_TENSORS[src_fmt]:
                if spec.per_block:  # whole-parameter scale vectors, from the first block the range touches
                    b0, nb = start // BLOCK_SIZE, (start + n - 1) // BLOCK_SIZE - start // BLOCK_SIZE + 1
                    out[spec.key] = windows[spec.key][0].narrow(0, b0, nb)
                else:
                    t, base = windows[spec.key]
                    out[spec.key] = t.narrow(0, start - base, n)
            return out

        for pc in st.pieces:
            if pc.straddle is not None and whole:
                # Convert the whole block, then keep this piece's part with the block's scales.
                b0 = pc.start // BLOCK_SIZE * BLOCK_SIZE
                n = min(BLOCK_SIZE, p.numel() - b0)
                block = convert_moments(sub_entry(b0, n), fmt, n, local.device, step, index_base=b0)
                k = pc.start - b0
                pc.moments.exp_avg.copy_(block.exp_avg.narrow(0, k, pc.numel))
                pc.moments.exp_avg_sq.copy_(block.exp_avg_sq.narrow(0, k, pc.numel))
                pc.moments.exp_avg_scale.copy_(block.exp_avg_scale)  # one block: its scales are the piece's
                pc.moments.exp_avg_sq_scale.copy_(block.exp_avg_sq_scale)
            else:
                m = convert_moments(sub_entry(pc.start, pc.numel), fmt, pc.numel, local.device, step, index_base=pc.start)
                for k, t in pc.moments.tensors().items():
                    t.copy_(m.tensors()[k])
            master_entry = {}
            for k in ("master", "master_residual"):
                if k in windows:
                    t, base = windows[k]
                    master_entry[k] = t.narrow(0, pc.start - base, pc.numel)
            master = convert_master(master_entry, pc.master.kind, local.narrow(0, pc.local, pc.numel))
            for k, t in pc.master.tensors().items():
                t.copy_(master.tensors()[k])
        return st


# ---------------------------------------------------------------------------------------------- helpers
def _update_fp32(run: Run, sc: StepScalars) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference update of a straddling piece; returns its new fp32 moments (stored after the exchange)."""
    h = sc.hyper
    g = run.grad.float() * sc.grad_scale
    x = run.master.read(run.param)
    m, v = run.moments.load()
    adamw_reference(x, g, m, v, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay, step=sc.step)
    _, _, seed_p = sc.seeds()
    run.master.write(x, run.param, index_base=run.index_base, seed=seed_p)
    return m, v


def _store_with_scale(moments: Moments, m: torch.Tensor, v: torch.Tensor, scale_m: torch.Tensor, scale_v: torch.Tensor) -> None:
    """Quantize a straddling piece with its block's scales (the absmax over every rank's part), as
    ``quant.quantize`` would for the whole block."""
    for codes, scales, x, s, kind in (
        (moments.exp_avg, moments.exp_avg_scale, m, scale_m, "signed"),
        (moments.exp_avg_sq, moments.exp_avg_sq_scale, v, scale_v, "unsigned"),
    ):
        scale = s.reshape(1).to(torch.float32)
        codes.copy_(quant.encode_blocks(x, scale.expand(quant.num_blocks(x.numel())), kind))  # type: ignore[arg-type]
        scales.fill_(float(s))


def _flat_window(t: torch.Tensor, p: DTensor, whole: bool, start: int) -> tuple[torch.Tensor, int]:
    """A state tensor flattened, with the global index of its element 0: this rank's elements (from ``start``) if it
    is a DTensor placed like ``p`` and ``whole`` is False; otherwise all of them (gathered from a DTensor)."""
    if isinstance(t, DTensor):
        if not whole and t.device_mesh == p.device_mesh and t.placements == p.placements and t.shape == p.shape:
            return t.to_local().reshape(-1), start
        return t.full_tensor().reshape(-1), 0
    return t.reshape(-1), 0
