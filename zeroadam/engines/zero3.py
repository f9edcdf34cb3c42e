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
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from zeroadam.comm.agreement import check_same_on_every_rank
from zeroadam.comm.collectives import CommStats, Group, all_gather_objects, all_reduce_sum
from zeroadam.comm.mesh import resolve_topology, stats_by_dim
from zeroadam.comm.quantized import quantized_all_reduce
from zeroadam.engines import offload
from zeroadam.engines.base import CheckedEntry, Engine, EngineSetup, TensorStep, refuse_sparse_grad
from zeroadam.engines.offload import HostParamCopies
from zeroadam.engines.state_view import LocalState
from zeroadam.update.contract import Run, StepScalars
from zeroadam.engines.grad_norm import shards_sq_sum
from zeroadam.update.dispatch import fused_update, grads_sq_sum
from zeroadam.options import GroupHyper, grad_dtype_for
from zeroadam.engines.release import SECOND_BACKWARD, Release
from zeroadam.sharding.model import ShardedModel, Unit, UnitFlat
from zeroadam.formats.state import Master, Moments
from zeroadam.sizes import grad_shard_bytes
from zeroadam.state_dict.entries import convert_master, convert_moments, entry_of, entry_piece, piece_entry

__all__ = ["Zero3Engine", "Piece"]


@dataclass(eq=False)
class Piece(TensorStep):
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
    step_tensor: torch.Tensor = field(default_factory=lambda: torch.zeros((), device="cpu"))  # see TensorStep

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
        topo = sharded.topology
        self.topology = topo if topo.replicate.world > 1 else None
        self.replicas = topo.replicate
        self.replicate_stats = CommStats(topo.replicate.world)
        self._replicas_averaged = False
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
                # f.device, not view.device: an offloaded shard is on the host, its unit computes on the device.
                dev, pin = offload.state_placement(self.offload, f.device)
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
                        # An offloaded shard is updated where it lives: [Note: parameter offload] in sharding/model.py.
                        param_host=None if f.offloaded else offload.param_copies(self.offload, b - a, view.dtype, view.device),
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
            self.release = Release(sharded.grad_group, sharded.stats, setup.options.skip_nonfinite)
            sharded.on_reduced = self._update_unit

    @staticmethod
    def create(setup: EngineSetup, process_group: Optional[Any], mesh: Optional[Any] = None) -> "Zero3Engine":
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
        if mesh is not None and resolve_topology(mesh, None).shape != sharded.topology.shape:
            raise ValueError(
                f"ZeroAdam: stage=3 uses the mesh the model was sharded with (replicate, shard) = "
                f"{sharded.topology.shape}, but mesh= has shape {tuple(mesh.shape)}; pass the same mesh to "
                "shard_model and ZeroAdam (or leave it out of ZeroAdam)"
            )
        if sharded.offload_params and setup.options.offload != "cpu":
            raise ValueError(
                f"ZeroAdam: offload={setup.options.offload!r} with a model sharded by shard_model(offload_params=True); "
                "parameter offload needs the optimizer offloaded too: pass offload=\"cpu\" (the update then runs on "
                "the host shards), or shard the model with offload_params=False"
            )
        # Before anything else: a rank with another lr or state_dtype would train differently or save a checkpoint
        # the others cannot load ([Note: fingerprints]; shard_model already checked the model itself).
        check_same_on_every_rank(
            sharded.topology.everyone,
            setup.fingerprint(),
            "ZeroAdam",
            "their parameters and options",
            "every rank must build the same model, param groups and ZeroAdam options",
        )
        sharded.quantized_weights = setup.options.quantized_weights
        sharded.quantized_gradients = setup.options.quantized_gradients
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
                "no_sync(); run the last micro-batch's backward outside no_sync() so they are reduced. (Gradients "
                "set by hand are not reduced either; torch's get/set_optimizer_state_dict set them on an optimizer "
                "that has not stepped: save and load with zeroadam.checkpoint, or optimizer.load_state_dict.)"
            )
        self._average_replicas()

    def _average_replicas(self) -> None:
        """Average the reduced gradient shards over a 2-D mesh's "replicate" dim, once per step (collective over
        the replicas; see [Note: hybrid sharding])."""
        if self.replicas.world == 1 or self._replicas_averaged:
            return
        for f in self.flats:
            if any(p.requires_grad for p in f.params):
                if f.grad_shard is None:  # no backward reached this unit: zeros, as on the other ranks
                    f.grad_shard = torch.zeros(f.layout.shard, dtype=torch.float32, device=f.shard.device)
                if self.setup.options.quantized_gradients:
                    quantized_all_reduce(self.replicas, f.grad_shard, self.replicate_stats)
                else:
                    all_reduce_sum(self.replicas, f.grad_shard, self.replicate_stats)
                f.grad_shard.mul_(1.0 / self.replicas.world)
        self._replicas_averaged = True

    def scale_grads(self, factor: float) -> None:
        """Multiply every gradient shard (GradScaler.unscale_)."""
        self._average_replicas()
        for f in self.flats:
            if f.grad_shard is not None:
                f.grad_shard.mul_(factor)

    def local_grad_sq_sum(self) -> torch.Tensor:
        self._average_replicas()
        # Taken as each unit's reduction landed; a pass over a shard written otherwise since (GradScaler's
        # unscale, a mesh's replica average): [Note: the norm where gradients land].
        total = shards_sq_sum([(f.grad_shard, f.grad_norm()) for f in self.flats if f.grad_shard is not None])
        if total is None:
            return torch.zeros((), dtype=torch.float32, device=self.flats[0].shard.device)
        return total

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
        self._replicas_averaged = False
        for f in self.flats:
            if f.grad_shard is not None:
                f.grad_shard.zero_()
                f.grad_norm().reset()  # type: ignore[union-attr]

    def _end_step(self) -> None:
        self._clear_grads()
        self._last_stats = stats_by_dim(
            self.sharded.stats.snapshot(), self.replicate_stats.snapshot() if self.topology else None
        )
        self.sharded.stats.reset()
        self.replicate_stats.reset()
        self._replicas_averaged = False
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
        """Bytes by category (wherever they live), then ``device_bytes`` and ``host_bytes``: where the design
        places them (offloaded shards and state on the host, even when CPU tensors stand in for the device), the
        host adding its pinned copies and staging buffers; ``buffer_bytes``, a peak, is in neither."""
        st = self.sharded
        shard_bytes = {True: 0, False: 0}  # offloaded -> bytes of parameter shards
        grad_shards = {True: 0, False: 0}
        staging = 0  # pinned host buffers the device-to-host gradient copies land in (CUDA only)
        for f in self.flats:
            shard_bytes[f.offloaded] += f.shard.numel() * f.shard.element_size()
            if f.grad_shard is not None:
                grad_shards[f.offloaded] += grad_shard_bytes(f.grad_shard.numel(), f.grad_dtype.itemsize)
            if f.grad_sink is not None:
                staging += f.grad_sink.staging_bytes()
        grad_device = sum(f.grad_full.numel() * f.grad_full.element_size() for f in self.flats if f.grad_full is not None)
        grad_device += sum(p.grad.numel() * p.grad.element_size() for p in st.unit_of if p.grad is not None)
        state = sum(pc.moments.nbytes() for pc in self.pieces)
        master = sum(pc.master.nbytes() for pc in self.pieces)
        copies = sum(pc.param_host.host.numel() * pc.param_host.host.element_size() for pc in self.pieces if pc.param_host)
        on_host = self.offload == "cpu"
        return {
            "param_bytes": shard_bytes[True] + shard_bytes[False] + st.live_bytes,
            "grad_bytes": grad_shards[True] + grad_shards[False] + grad_device,
            "state_bytes": state,
            "master_bytes": master,
            # The most bytes of gathered units and fp32 gradient buffers at once so far ([Note: communication
            # buffers] in sizes.py); those alive now are also in param_bytes and grad_bytes.
            "buffer_bytes": st.peak_buffer_bytes,
            "device_bytes": shard_bytes[False] + st.live_bytes + grad_shards[False] + grad_device
            + (0 if on_host else state + master),
            "host_bytes": shard_bytes[True] + grad_shards[True] + copies + staging + (state + master if on_host else 0),
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
        if self.group.world == 1:
            # One rank holds every parameter whole, in one piece: the live state, as torch.optim hands it out (an
            # in-place DCP load sets it, step included).
            return {
                pc.param: {**entry_of(pc.step, pc.moments, pc.master, pc.param.shape), "step": pc.step_tensor}
                for pc in self.pieces
                if pc.step > 0
            }
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

    def local_states(self) -> dict[torch.Tensor, LocalState]:
        return {pc.param: LocalState(pc, pc.start, pc.start + pc.numel, pc.moments, pc.master) for pc in self.pieces}

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
