"""The optimizer side of ZeRO stage 3: state for the pieces of parameters that this rank's unit shards hold.

``shard_model`` (``sharded_model.py``) owns the parameter shards and fills a gradient shard per unit flat (fp32,
or bf16 with ``grad_dtype``) during backward. Here each parameter's local piece — its intersection with this rank's shard, block-aligned —
gets moments and master storage in the parameter's own format, and is updated in place in the shard with the
fused kernel. No all-gather follows the step: the next forward gathers the updated shards. Communication per
step is the ZeRO paper's 3Ψ: all-gather in forward, again in backward, and a reduce-scatter of gradients. With
``release_grads`` each unit's pieces are updated as soon as its reduce-scatter lands, during backward, and its
gradient shard freed ([Note: released gradients] in ``release.py``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from zeroadam.comm.agreement import check_same_on_every_rank
from zeroadam.comm.collectives import Group, all_gather_objects, all_reduce_sum
from zeroadam.engines import offload
from zeroadam.engines.base import CheckedEntry, Engine, EngineSetup, refuse_sparse_grad
from zeroadam.engines.offload import HostParamCopies
from zeroadam.update.contract import Run, StepScalars
from zeroadam.update.dispatch import fused_update, grads_sq_sum
from zeroadam.options import GroupHyper, grad_dtype_for
from zeroadam.engines.release import SECOND_BACKWARD, Release
from zeroadam.sharding.model import ShardedModel, Unit, UnitFlat
from zeroadam.formats.state import Master, Moments
from zeroadam.sizes import grad_shard_bytes
from zeroadam.state_dict.entries import convert_master, convert_moments, entry_of, entry_piece, piece_entry

__all__ = ["Zero3Engine", "Piece"]


@dataclass(eq=False)
class Piece:
    """This rank's part of one parameter: elements [start, start + numel) of its flattened value."""

    param: torch.nn.Parameter
    group_index: int
    flat: UnitFlat
    offset: int  # position of the piece in flat.shard
    start: int  # position of the piece in the parameter (a block boundary)
    numel: int
    index_base: int  # hash index of element 0 (see [Note: stochastic rounding])
    moments: Moments
    master: Master
    param_host: Optional[HostParamCopies] = None  # the piece's host copy when offloading from a GPU
    step: int = 0

    def param_view(self) -> torch.Tensor:
        return self.flat.shard.narrow(0, self.offset, self.numel)


class Zero3Engine(Engine):
    """Stage 3 (see the module docstring)."""

    gathers_state_dict = True
    averages_gradients = True

    def __init__(self, setup: EngineSetup, sharded: ShardedModel) -> None:
        self.setup = setup
        self.sharded = sharded
        self.group: Group = sharded.group
        self.offload = setup.options.offload
        self._last_stats: dict[str, Any] = sharded.stats.snapshot()
        self.pieces: list[Piece] = []
        self.step_count = 0  # steps taken (or loaded); every piece steps together
        self.flats: list[UnitFlat] = [f for u in sharded.units for f in u.flats]
        for f in self.flats:  # before the first backward allocates a gradient buffer
            f.grad_dtype = grad_dtype_for(setup.options.grad_dtype, f.shard.dtype)
            if f.grad_shard is not None:
                f.grad_shard = f.grad_shard.to(f.grad_dtype)
        for gi, group in enumerate(setup.param_groups):
            offsets = setup.policy.layout_offsets(group["params"])
            for p in group["params"]:
                u, f, i = sharded.unit_of[p]
                slot = f.layout.slots[i]
                lo, hi = f.layout.shard_range(self.group.rank)
                a, b = max(slot.start, lo), min(slot.end, hi)
                if a >= b:
                    continue
                view = f.shard.narrow(0, a - lo, b - a)
                dev, pin = offload.state_placement(self.offload, view.device)
                self.pieces.append(
                    Piece(
                        param=p,
                        group_index=gi,
                        flat=f,
                        offset=a - lo,
                        start=a - slot.start,
                        numel=b - a,
                        index_base=offsets[p] + (a - slot.start),
                        moments=Moments.zeros(setup.policy.moment_format(p.numel()), b - a, dev, pin=pin),  # type: ignore[arg-type]
                        master=Master.create(setup.policy.master_kind(p), view, device=dev, pin=pin),
                        param_host=offload.param_copies(self.offload, b - a, view.dtype, view.device),
                    )
                )

        # release_grads: each unit is updated as soon as its gradients are reduced ([Note: released gradients]).
        self.release: Optional[Release] = None
        self._pieces_of: dict[UnitFlat, list[Piece]] = {}
        self._updated: set[int] = set()  # units updated by backward since the last step
        for pc in self.pieces:
            self._pieces_of.setdefault(pc.flat, []).append(pc)
        sharded.on_reduced = None
        if setup.options.release_grads:
            self.release = Release(sharded.grad_group, sharded.stats)
            sharded.on_reduced = self._update_unit

    @staticmethod
    def create(setup: EngineSetup, process_group: Optional[Any]) -> "Zero3Engine":
        params = setup.params()
        owners = {getattr(p, "_zeroadam_sharded", None) for p in params}
        if None in owners or len(owners) != 1:
            raise ValueError(
                "ZeroAdam: stage=3 needs parameters of a model sharded by zeroadam.shard_model(model); "
                "call it before building the optimizer (or use stage=1 or 2)"
            )
        sharded: ShardedModel = owners.pop()  # type: ignore[assignment]
        if process_group is not None and process_group is not sharded.group.pg:
            raise ValueError(
                "ZeroAdam: stage=3 uses the process group the model was sharded with; pass the same "
                "process_group to shard_model and ZeroAdam (or none to either)"
            )
        # Before anything else: a rank with another lr or state_dtype would train differently or save a checkpoint
        # the others cannot load ([Note: fingerprints]; shard_model already checked the model itself).
        check_same_on_every_rank(
            sharded.group,
            setup.fingerprint(),
            "ZeroAdam",
            "their parameters and options",
            "every rank must build the same model, param groups and ZeroAdam options",
        )
        return Zero3Engine(setup, sharded)

    # ---------------------------------------------------------------- gradients
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside communicate nothing: their gradients stay whole in ``p.grad``, where autograd
        sums them, and the next backward outside reduce-scatters that sum once per unit (as FSDP's ``no_sync``).
        That trades memory for communication. Without it, gradient accumulation reduce-scatters every micro-batch
        into the fp32 gradient shards, where they add up, and no rank ever holds whole gradients (as DeepSpeed's
        ZeRO-3); that is what the Accelerate and DeepSpeed integrations do at stage 3."""
        old = self.sharded.sync
        self.sharded.sync = False
        try:
            yield
        finally:
            self.sharded.sync = old

    def hides_gradients(self) -> bool:
        return True  # each unit's gradients are reduce-scattered into its shard during backward

    def _grad_of(self, piece: Piece) -> torch.Tensor:
        g = piece.flat.grad_shard
        if g is None:
            return torch.zeros(piece.numel, dtype=piece.flat.grad_dtype, device=piece.flat.shard.device)
        return g.narrow(0, piece.offset, piece.numel)

    def before_step(self) -> None:
        leftover = [p for p in self.sharded.unit_of if p.grad is not None]
        for p in leftover:
            refuse_sparse_grad(p)
        if leftover:
            raise RuntimeError(
                "ZeroAdam(stage=3): parameters still hold local gradients from backward passes run under "
                "no_sync(); run the last micro-batch's backward outside no_sync() so they are reduced"
            )

    def scale_grads(self, factor: float) -> None:
        """Multiply every gradient shard (GradScaler.unscale_)."""
        for f in self.flats:
            if f.grad_shard is not None:
                f.grad_shard.mul_(factor)

    def local_grad_sq_sum(self) -> torch.Tensor:
        grads = [f.grad_shard for f in self.flats if f.grad_shard is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=self.flats[0].shard.device)
        return grads_sq_sum(grads)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.group, t, self.sharded.stats)

    # ---------------------------------------------------------------- step
    def _update_unit(self, u: Unit) -> None:
        """release_grads: update this rank's pieces of a unit whose gradients were just reduced, then free them."""
        flats = [f for f in u.flats if f.grad_shard is not None]
        if not flats:
            return
        if u.index in self._updated:
            raise RuntimeError(SECOND_BACKWARD)
        self._updated.add(u.index)
        assert self.release is not None
        if self.release.all_finite([f.grad_shard for f in flats]):
            for f in flats:
                for piece in self._pieces_of.get(f, []):
                    self._update_piece(piece, 1.0)
        for f in flats:
            f.grad_shard = None  # no rank keeps a gradient shard ([Note: released gradients])

    def _update_piece(self, piece: Piece, scale: float) -> None:
        setup = self.setup
        hyper = GroupHyper.of(setup.param_groups[piece.group_index])
        piece.step += 1
        sc = StepScalars.for_group(hyper, piece.step, scale, piece.group_index)
        view = piece.param_view()
        if piece.param_host is None:
            fused_update(self._chunk_run(piece, 0, view), sc, setup.backend)
        else:  # the same chunked device-host pipeline as stages 1-2 (zeroadam/engines/offload.py)
            piece.param_host.update(view, lambda a, chunk: fused_update(self._chunk_run(piece, a, chunk), sc, setup.backend))

    def step(self, scale: float) -> None:
        if self.release is not None:  # backward made the updates; finish the step
            self._updated.clear()
            self.sharded.release_all()
            self.step_count += 1
            self._end_step()
            return
        for piece in self.pieces:
            self._update_piece(piece, scale)
        self.sharded.release_all()  # a unit still gathered holds the old values: [Note: stale full buffers]
        self.step_count += 1
        self._end_step()

    def _chunk_run(self, piece: Piece, start: int, param: torch.Tensor) -> Run:
        """The run of the piece's elements [start, start + len(param)) with ``param`` holding their values; the
        gradient goes where the state is (the host, when offloading)."""
        n = param.numel()
        grad = self._grad_of(piece).narrow(0, start, n)
        state_dev = piece.moments.exp_avg.device
        return Run(
            param=param,
            grad=grad if grad.device == state_dev else grad.to(state_dev),
            moments=piece.moments.narrow(start, n),
            master=piece.master.narrow(start, n),
            index_base=piece.index_base + start,
        )

    def _clear_grads(self) -> None:
        for f in self.flats:
            if f.grad_shard is not None:
                f.grad_shard.zero_()

    def _end_step(self) -> None:
        self._clear_grads()
        self._last_stats = self.sharded.stats.snapshot()
        self.sharded.stats.reset()
        self._peak_grad_bytes = self.sharded.peak_grad_bytes
        self.sharded.peak_grad_bytes = 0

    def after_skip(self) -> None:
        self._end_step()

    def zero_grad(self) -> None:
        self._clear_grads()

    # ---------------------------------------------------------------- introspection
    def comm_stats(self) -> dict[str, Any]:
        return self._last_stats

    def memory_stats(self) -> dict[str, int]:
        st = self.sharded
        grads = sum(grad_shard_bytes(f.grad_shard.numel(), f.grad_dtype.itemsize) for f in self.flats if f.grad_shard is not None)
        grads += sum(f.grad_full.numel() * f.grad_full.element_size() for f in self.flats if f.grad_full is not None)
        grads += sum(p.grad.numel() * p.grad.element_size() for p in st.unit_of if p.grad is not None)
        return {
            "param_bytes": sum(f.shard.numel() * f.shard.element_size() for f in self.flats) + st.live_bytes,
            "grad_bytes": grads,
            "state_bytes": sum(pc.moments.nbytes() for pc in self.pieces),
            "master_bytes": sum(pc.master.nbytes() for pc in self.pieces),
            # The most bytes of gathered units and fp32 gradient buffers at once so far ([Note: communication
            # buffers] in sizes.py); those alive now are also in param_bytes and grad_bytes.
            "buffer_bytes": st.peak_buffer_bytes,
            # The most bytes of gradient buffers and shards at once during the last step (backward to step()).
            "peak_grad_bytes": max(st.peak_grad_bytes, getattr(self, "_peak_grad_bytes", 0)),
        }

    # ---------------------------------------------------------------- state dicts
    def has_state(self) -> bool:
        # Every rank steps every piece together, so every rank answers alike without asking the others.
        return self.step_count > 0

    def shard_entries(self) -> dict[torch.Tensor, dict[str, Any]]:
        """This rank's piece of every parameter's state (views, no communication); a parameter this rank holds
        nothing of gets an empty piece that still carries its step."""
        out: dict[torch.Tensor, dict[str, Any]] = {}
        if not self.has_state():
            return out
        for pc in self.pieces:
            out[pc.param] = piece_entry(pc.step, pc.moments, pc.master, pc.start, pc.start + pc.numel)
        for group in self.setup.param_groups:
            for p in group["params"]:
                if p not in out:
                    fmt = self.setup.policy.moment_format(p.numel())
                    empty = Moments.zeros(fmt, 0, p.device)  # type: ignore[arg-type]
                    out[p] = piece_entry(self.step_count, empty, Master.create(self.setup.policy.master_kind(p), p.detach().reshape(-1)[:0]), 0, 0)
        return out

    def full_entries(self, to: int = 0) -> Optional[dict[torch.Tensor, dict[str, Any]]]:
        """Every parameter's whole state entry on rank ``to`` (CPU tensors; None elsewhere). Collective: the
        pieces travel as objects, which is simple and fine for state dicts, not for checkpoints of big models
        (``zeroadam.checkpoint`` writes pieces where they are)."""
        index = {p: i for i, p in enumerate(p for g in self.setup.param_groups for p in g["params"])}
        mine = [
            (index[pc.param], pc.start, pc.step, {k: t.cpu() for k, t in {**pc.moments.tensors(), **pc.master.tensors()}.items()})
            for pc in self.pieces
            if pc.step > 0
        ]
        everyone = all_gather_objects(self.group, mine)
        if self.group.rank != to:
            return None
        by_index = {i: p for p, i in index.items()}
        parts: dict[int, list[tuple[int, int, dict[str, torch.Tensor]]]] = {}
        for theirs in everyone:
            for i, start, step, tensors in theirs:
                parts.setdefault(i, []).append((start, step, tensors))
        out: dict[torch.Tensor, dict[str, Any]] = {}
        for i, pieces in parts.items():
            p = by_index[i]
            pieces.sort(key=lambda x: x[0])
            whole = {k: torch.cat([pt[2][k] for pt in pieces]) for k in pieces[0][2]}
            fmt = self.setup.policy.moment_format(p.numel())
            moments = Moments.of(fmt, whole)  # type: ignore[arg-type]
            master = Master.of(self.setup.policy.master_kind(p), whole)
            out[p] = entry_of(pieces[0][1], moments, master, p.shape)
        return out

    def local_ranges(self) -> dict[torch.Tensor, tuple[int, int]]:
        return {pc.param: (pc.start, pc.start + pc.numel) for pc in self.pieces}

    def load_entries(self, checked: list[CheckedEntry]) -> None:
        """Install validated entries (whole, or pieces covering this rank's part) into the pieces; nothing
        changes until every piece is converted."""
        by_param = {p: (step, entry) for p, _gi, step, entry in checked}
        staged = []
        for pc in self.pieces:
            dev = pc.moments.exp_avg.device
            if pc.param not in by_param:
                staged.append((pc, 0, Moments.zeros(pc.moments.fmt, pc.numel, dev), pc.master))  # type: ignore[arg-type]
                continue
            step, entry = by_param[pc.param]
            part = entry_piece(entry, pc.start, pc.start + pc.numel, pc.param.numel())
            moments = convert_moments(part, pc.moments.fmt, pc.numel, dev, step)
            master = convert_master(part, pc.master.kind, pc.param_view().to(dev))
            staged.append((pc, step, moments, master))
        for pc, step, moments, master in staged:
            pc.moments, pc.master, pc.step = moments, master, step
        self.step_count = max((step for _, step, _, _ in staged), default=0)
