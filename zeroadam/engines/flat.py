"""ZeRO stages 1 and 2 (and CPU offload): flat block-aligned buffers, one shard of state per rank.

Each param group is split into spaces (dtype, device, moment format); each space's parameters become views into
one flat buffer laid out by ``FlatLayout`` (see [Note: block-aligned layout]). Rank r owns the contiguous range
``layout.shard_range(r)``: its moments, master weights and fp32 gradient shard exist only for that range.

One step: gradients are averaged into the shards (stage 1: one reduce-scatter at ``step()``; stage 2: buckets
during backward, ``buckets.py``) → one all-reduce of the squared norm (also the non-finite flag: a NaN or inf
anywhere makes the sum non-finite on every rank, so all ranks skip together) → the fused update of each shard →
an all-gather of the parameter shards into the flat buffers, which the parameters view.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from zeroadam.comm.agreement import check_same_on_every_rank
from zeroadam.engines import offload
from zeroadam.engines.base import CheckedEntry, Engine, EngineSetup, TensorStep, refuse_meta_params, refuse_sparse_grad
from zeroadam.engines.buckets import Bucket, GradBuckets
from zeroadam.engines.grad_norm import shards_sq_sum
from zeroadam.engines.release import SECOND_BACKWARD, Release
from zeroadam.comm.collectives import (
    CommStats,
    Group,
    all_gather_into,
    broadcast_from_first,
    all_reduce_sum,
    reduce_scatter_avg,
)
from zeroadam.comm.mesh import Topology, stats_by_dim
from zeroadam.comm.quantized import quantized_all_gather, quantized_all_reduce, quantized_reduce_scatter
from zeroadam.update.contract import Run, StepScalars
from zeroadam.update.dispatch import fused_update, fused_updates, grads_sq_sum
from zeroadam.engines.grad_sync import (
    DDPWatch,
    ResolvedSync,
    copy_local_shards,
    replicated,
    warn_not_replicated,
    wrapper_averages_gradients,
)
from zeroadam.layout import FlatLayout, group_spaces
from zeroadam.engines.offload import HostGradSink, HostParamCopies, host_buffer
from zeroadam.engines.state_view import LocalState
from zeroadam.options import BLOCK_SIZE, GroupHyper, grad_dtype_for
from zeroadam.formats.state import Master, MasterKind, Moments
from zeroadam.sizes import grad_shard_bytes, stage1_chunk, stage1_staging_numel
from zeroadam.state_dict.entries import convert_master, convert_moments, entry_of, entry_piece, piece_entry

__all__ = ["FlatSpace", "FlatEngine"]


@dataclass(eq=False)
class FlatSpace(TensorStep):
    group_index: int
    fmt: str
    master_kind: MasterKind
    params: list[torch.Tensor]
    layout: FlatLayout
    flat: torch.Tensor  # 1D [layout.total], parameter dtype; the parameters are views into it
    lo: int  # this rank's shard [lo, hi) in flat coordinates
    hi: int
    grad_shard: torch.Tensor  # 1D [shard] grad_dtype, on the state device
    moments: Moments  # [shard], on the state device
    master: Master  # [shard], on the state device
    param_host: Optional[HostParamCopies]  # the shard's host copy when offloading from a GPU, else None
    sink: HostGradSink  # adds reduced gradient pieces into grad_shard (device-to-host when offloading)
    step_tensor: torch.Tensor = field(default_factory=lambda: torch.zeros((), device="cpu"))  # see TensorStep
    grad_dtype: torch.dtype = torch.float32  # the shard's, buckets' and reductions' dtype (ZeroOptions.grad_dtype)
    # release_grads: steps each parameter missed because its bucket was skipped for a non-finite gradient; its
    # own step count is step - lag (every member of a bucket misses the same steps).
    lag: dict[torch.Tensor, int] = field(default_factory=dict)

    def step_of(self, p: torch.Tensor) -> int:
        return self.step - self.lag.get(p, 0)

    def param_shard(self) -> torch.Tensor:
        return self.flat.narrow(0, self.lo, self.hi - self.lo)


def _own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view`` through a storage object of its own that aliases the same memory (DLPack). Views of one flat buffer
    share a storage, and tools that take tensors sharing a storage for duplicates drop all but one of them
    (safetensors' save_model, used by Accelerate's save_state, silently; transformers' save_pretrained)."""
    return torch.from_dlpack(view)


def _copy_grads(sp: FlatSpace, lo: int, dst: torch.Tensor) -> None:
    """Copy the gradients of flat range [lo, lo + len(dst)) into dst (other elements are left as they are)."""
    hi = lo + dst.numel()
    for p, slot in zip(sp.params, sp.layout.slots):
        a, b = max(lo, slot.start), min(hi, slot.end)
        if a < b and p.grad is not None:
            dst.narrow(0, a - lo, b - a).copy_(p.grad.detach().reshape(-1).narrow(0, a - slot.start, b - a))


class FlatEngine(Engine):
    """Stages 1-2 and offload (see the module docstring)."""

    gathers_state_dict = True
    averages_gradients = True

    def __init__(self, setup: EngineSetup, topology: Topology) -> None:
        group = topology.shard
        self.setup = setup
        self.group = group
        # A 2-D mesh: the replicas average the reduced shards (see [Note: hybrid sharding] in comm/mesh.py).
        self.topology = topology if topology.replicate.world > 1 else None
        self.replicas = topology.replicate
        self.stage = setup.options.stage if group.world > 1 else 0
        self.offload = setup.options.offload
        self.stats = CommStats(group.world)
        self.replicate_stats = CommStats(self.replicas.world)
        self._last_stats: dict[str, Any] = self.stats.snapshot()
        self._reduced = False
        self._stage1_buffer: Optional[torch.Tensor] = None  # stage-1 reduce-scatter staging, kept between steps (bytes)
        # Who averages gradients; "auto" is decided at the first backward or step (see grad_sync.py).
        sync = setup.options.gradient_sync
        self._grad_sync: Optional[ResolvedSync] = None if sync == "auto" else sync  # type: ignore[assignment]
        self._ddp_watch: Optional[DDPWatch] = None
        if self._grad_sync is None and self.everyone.world > 1:
            self._ddp_watch = DDPWatch(p for g in setup.param_groups for p in g["params"])
        self._warned_not_replicated = False
        self._check_fingerprint()
        # release_grads (stage 2): each bucket's owner pieces are updated as soon as they are reduced.
        self.release: Optional[Release] = None
        if setup.options.release_grads:
            self.release = Release(group, self.stats, setup.options.skip_nonfinite)
        # One rank with CPU parameters (offload without sharding): the update reads each p.grad where it is, so
        # no gradient is copied at all (see _step_direct).
        self._direct = self.everyone.world == 1 and all(p.device.type == "cpu" for g in setup.param_groups for p in g["params"])
        self.spaces: list[FlatSpace] = []
        for gi, pg in enumerate(setup.param_groups):
            for params in group_spaces(pg["params"], setup.policy.format_of).values():
                self.spaces.append(self._build_space(gi, params))
        self.buckets: Optional[GradBuckets] = None
        if self.stage >= 2:
            position = {p: i / len(g["params"]) for g in setup.param_groups for i, p in enumerate(g["params"])}
            self.buckets = GradBuckets(
                self.spaces, group, setup.options.bucket_size, self.stats, position, setup.options.quantized_gradients
            )
            self.buckets.takes_grads = lambda: not self.grads_from_wrapper()
            if self.release is not None:
                self.buckets.on_reduced = self._update_bucket
        # Backward passes since the last step, told to the other ranks with the norm (see backward_passes).
        self._passes = 0
        self._in_pass = False
        self._pass_hooks = []
        if self.everyone.world > 1:
            for p in setup.params():
                if p.requires_grad:
                    self._pass_hooks.append(p.register_post_accumulate_grad_hook(self._count_pass))

    # ---------------------------------------------------------------- construction
    def _check_fingerprint(self) -> None:
        """Every rank built the same thing (collective; [Note: fingerprints]), then what each rank can check alone:
        after the agreement, so that every rank raises the same error."""
        check_same_on_every_rank(
            self.everyone,
            [("mesh (replicate, shard)", (self.replicas.world, self.group.world))] + self.setup.fingerprint(),
            "ZeroAdam",
            "their parameters and options",
            "every rank must build the same model, param groups and ZeroAdam options",
        )
        for gi, pg in enumerate(self.setup.param_groups):
            devices = {p.device for p in pg["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"ZeroAdam: param_groups[{gi}] has parameters on different devices {sorted(map(str, devices))}; "
                    "move the model to one device before building the optimizer"
                )
        refuse_meta_params(self.setup)

    def _build_space(self, gi: int, params: list[torch.Tensor]) -> FlatSpace:
        setup, g = self.setup, self.group
        layout = FlatLayout.build(params, g.world)
        dev = params[0].device
        flat = torch.zeros(layout.total, dtype=params[0].dtype, device=dev)
        with torch.no_grad():
            for p, slot in zip(params, layout.slots):
                flat.narrow(0, slot.start, slot.numel).copy_(p.detach().reshape(-1))
            broadcast_from_first(self.everyone, flat)  # like DDP: every rank starts from rank 0's values
            for p, slot in zip(params, layout.slots):
                p.data = _own_storage(flat.narrow(0, slot.start, slot.numel).view(slot.shape))
        lo, hi = layout.shard_range(g.rank)
        state_dev, pin = offload.state_placement(self.offload, dev)
        fmt = setup.policy.format_of(params[0])
        shard = flat.narrow(0, lo, hi - lo)
        param_host = offload.param_copies(self.offload, hi - lo, flat.dtype, dev)
        kind = setup.policy.master_kind(params[0])
        grad_dtype = grad_dtype_for(setup.options.grad_dtype, params[0].dtype)
        if self._direct or self.release is not None:
            grad_shard = torch.zeros(0, dtype=grad_dtype)  # unused: the update reads p.grad / the bucket
        elif pin:
            grad_shard = host_buffer(hi - lo, grad_dtype, pin=True)
        else:
            grad_shard = torch.zeros(hi - lo, dtype=grad_dtype, device=state_dev)
        return FlatSpace(
            group_index=gi,
            fmt=fmt,
            master_kind=kind,
            params=params,
            layout=layout,
            flat=flat,
            lo=lo,
            hi=hi,
            grad_shard=grad_shard,
            moments=Moments.zeros(fmt, hi - lo, state_dev, pin=pin),  # type: ignore[arg-type]
            master=Master.create(kind, shard, device=state_dev, pin=pin),
            param_host=param_host,
            sink=HostGradSink(grad_shard, dev),
            grad_dtype=grad_dtype,
        )

    # ---------------------------------------------------------------- gradients
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients of the backward passes inside stay local in ``p.grad`` (accumulated by autograd)."""
        if self.buckets is None:
            yield
            return
        old = self.buckets.sync
        self.buckets.sync = False
        try:
            yield
        finally:
            self.buckets.sync = old

    def _reduce_stage1(self) -> None:
        """Average every parameter's gradient into the shards, without a full-size copy of the gradients: each
        reduce-scatter covers the same slice [k, k + c) of every rank's shard, c * world <= bucket_size, through
        one staging buffer kept between steps. One rank (offload alone) adds each gradient in place."""
        world = self.group.world
        for sp in self.spaces:
            if world == 1:
                for p, slot in zip(sp.params, sp.layout.slots):
                    if p.grad is not None:
                        sp.sink.add(slot.start, p.grad.detach().reshape(-1), 1.0)
                sp.sink.drain()
                continue
            shard = sp.hi - sp.lo
            c = stage1_chunk(self.setup.options.bucket_size, world, shard)
            numel = stage1_staging_numel(self.setup.options.bucket_size, world, shard)
            buf = self._staging(numel, sp.grad_dtype, sp.flat.device)
            out = buf.narrow(0, world * c, c)  # the received chunk, after the world chunks sent
            for k in range(0, shard, c):
                n = min(c, shard - k)
                chunk = buf.narrow(0, 0, world * n).view(world, n)
                chunk.zero_()  # padding and parameters without a gradient count as zeros
                for r in range(world):
                    _copy_grads(sp, r * shard + k, chunk[r])
                if self.setup.options.quantized_gradients:
                    ranges = [(r * n, (r + 1) * n) for r in range(world)]
                    quantized_reduce_scatter(self.group, out.narrow(0, 0, n), chunk.view(-1), ranges, self.stats)
                    out.narrow(0, 0, n).mul_(1.0 / world)
                else:
                    reduce_scatter_avg(self.group, out.narrow(0, 0, n), chunk.view(-1), self.stats)
                sp.sink.add(k, out.narrow(0, 0, n), 1.0)
            sp.sink.drain()

    def _staging(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable buffer of at least ``numel`` elements of ``dtype`` (allocating ~100 MB each step costs more
        than the reduction on a CPU: fresh pages are zeroed by the kernel). Kept as bytes, so that spaces with
        fp32 and bf16 gradient shards (grad_dtype="auto") share it."""
        nbytes = numel * dtype.itemsize
        buf = self._stage1_buffer
        if buf is None or buf.numel() < nbytes or buf.device != device:
            buf = self._stage1_buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf.narrow(0, 0, nbytes).view(dtype)

    def grads_from_wrapper(self) -> bool:
        """Whether a DDP wrapper averages the gradients (see [Note: gradients averaged by a wrapper])."""
        if self.everyone.world == 1:
            return False
        if self._grad_sync is None:
            ddp_seen = self._ddp_watch is not None and self._ddp_watch.seen
            self._grad_sync = "wrapper" if ddp_seen or wrapper_averages_gradients() else "optimizer"
            self._close_ddp_watch()
        return self._grad_sync == "wrapper"

    def _count_pass(self, p: torch.Tensor) -> None:
        if not self._in_pass:
            self._in_pass = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    def _end_pass(self) -> None:
        self._in_pass = False
        self._passes += 1

    def backward_passes(self) -> int:
        return self._passes

    def amp_owns_gradients(self) -> bool:
        # Not when a DDP wrapper averages the gradients: p.grad then holds all of them, and GradScaler's own unscale
        # and skip (a step it does not call) keep Accelerate's step_was_skipped right, as with torch.optim.AdamW.
        return not self.grads_from_wrapper()

    def hides_gradients(self) -> bool:
        return self.buckets is not None and not self.grads_from_wrapper()

    def defer_gradient_sync(self, deferred: bool) -> None:
        if self.buckets is not None:
            self.buckets.sync = not deferred

    def set_gradient_sync(self, sync: ResolvedSync) -> None:  # type: ignore[override]
        """Decide who averages gradients before the first backward (an integration that knows it does)."""
        self._grad_sync = sync
        self._close_ddp_watch()

    def _close_ddp_watch(self) -> None:
        if self._ddp_watch is not None:
            self._ddp_watch.close()
            self._ddp_watch = None

    def rebind_moved_params(self) -> None:
        """Make every parameter view its flat buffer again after ``Module.to()`` gave it new storage.

        Accelerate's device placement does that even on the same device (``.to("cpu:0")`` copies CPU tensors);
        ZeroAdam would then update buffers the model no longer reads. Values are taken back from the parameters,
        so this is exact; a move to another device or dtype cannot be followed and raises."""
        for sp in self.spaces:
            base, esz = sp.flat.data_ptr(), sp.flat.element_size()
            for p, slot in zip(sp.params, sp.layout.slots):
                if p.data_ptr() == base + slot.start * esz and p.device == sp.flat.device:
                    continue
                if p.device != sp.flat.device or p.dtype != sp.flat.dtype:
                    raise RuntimeError(
                        f"ZeroAdam: a parameter of shape {tuple(p.shape)} moved from {sp.flat.device} ({sp.flat.dtype}) "
                        f"to {p.device} ({p.dtype}) after ZeroAdam(stage={self.setup.options.stage}) was built; build "
                        "the optimizer after moving the model (with Accelerate: model.to(accelerator.device) first)"
                    )
                view = sp.flat.narrow(0, slot.start, slot.numel)
                with torch.no_grad():
                    view.copy_(p.detach().reshape(-1))
                p.data = _own_storage(view.view(slot.shape))

    def ensure_reduced(self) -> None:
        if self._reduced:
            return
        for sp in self.spaces:
            for p in sp.params:
                refuse_sparse_grad(p)
        self.rebind_moved_params()
        if self._direct:
            pass  # the update reads p.grad where it is
        elif self.grads_from_wrapper():
            if replicated(self.group, self.spaces, self.stats):
                copy_local_shards(self.spaces, self.group.rank)
            else:
                if not self._warned_not_replicated:
                    self._warned_not_replicated = True
                    warn_not_replicated()
                self._reduce_stage1()
        elif self.buckets is not None:
            # Gradients still in p.grad (produced under no_sync, or by a backward that bypassed the hooks).
            leftover = [p for sp in self.spaces for p in sp.params if p.grad is not None]
            for p in leftover:
                self.buckets.take(p)
            self.buckets.finish_pass()
        else:
            self._reduce_stage1()
        if self.replicas.world > 1 and not self.grads_from_wrapper():
            self._average_replicas()
        self._reduced = True

    def _average_replicas(self) -> None:
        """Average the reduced gradient shards over the mesh's "replicate" dim (see [Note: hybrid sharding])."""
        for sp in self.spaces:
            if self.setup.options.quantized_gradients:
                quantized_all_reduce(self.replicas, sp.grad_shard, self.replicate_stats)
            else:
                all_reduce_sum(self.replicas, sp.grad_shard, self.replicate_stats)
            sp.grad_shard.mul_(1.0 / self.replicas.world)

    def scale_grads(self, factor: float) -> None:
        """Multiply every gradient this rank holds for the update (GradScaler.unscale_)."""
        self.ensure_reduced()
        if self._direct:
            for sp in self.spaces:
                for p in sp.params:
                    if p.grad is not None:
                        p.grad.mul_(factor)
            return
        for sp in self.spaces:
            sp.grad_shard.mul_(factor)

    def local_grad_sq_sum(self) -> torch.Tensor:
        self.ensure_reduced()
        if self._direct:
            return grads_sq_sum([p.grad for sp in self.spaces for p in sp.params if p.grad is not None])
        # Taken as the reduced gradients landed; a pass over a shard written otherwise since (GradScaler's unscale,
        # a mesh's replica average, a DDP wrapper's gradients): [Note: the norm where gradients land].
        total = shards_sq_sum([(sp.grad_shard, sp.sink.norm) for sp in self.spaces])
        return grads_sq_sum([]) if total is None else total

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.group, t, self.stats)

    # ---------------------------------------------------------------- step
    def before_step(self) -> None:
        if self.release is not None and self.grads_from_wrapper():
            raise RuntimeError(
                "ZeroAdam(stage=2, release_grads=True) updates each bucket as ZeroAdam reduces it during backward, "
                "but a DistributedDataParallel wrapper averages these gradients: unwrap the model (ZeroAdam averages "
                "them itself; with Accelerate use ZeroAccelerator), or use release_grads=False"
            )
        self.ensure_reduced()

    def _clear_grads(self) -> None:
        for sp in self.spaces:
            sp.grad_shard.zero_()
            sp.sink.norm.reset()
        self._reduced = False

    def _end_step(self) -> None:
        self._passes = 0
        self._clear_grads()
        self._last_stats = self._snapshot_stats()
        self.stats.reset()
        self.replicate_stats.reset()

    def after_skip(self) -> None:
        self._end_step()

    def step(self, scale: float) -> None:
        setup = self.setup
        handles = []
        if self.release is not None:  # backward updated the shards; count the step and gather the parameters
            assert self.buckets is not None
            for b in self.buckets.buckets:
                b.updated = False
            for sp in self.spaces:
                sp.step += 1
                handles.append(all_gather_into(self.group, sp.flat, sp.param_shard(), self.stats))
            for h in handles:
                h.wait()
            self._end_step()
            return
        for sp in self.spaces:
            hyper = GroupHyper.of(setup.param_groups[sp.group_index])
            sp.step += 1
            if self._direct:
                self._step_direct(sp, StepScalars.for_group(hyper, sp.step, scale, sp.group_index))
                continue
            shard = sp.param_shard()
            sc = StepScalars.for_group(hyper, sp.step, scale, sp.group_index)
            ranges = self._updated_ranges(sp)
            if sp.param_host is None:
                fused_updates([self._chunk_run(sp, a, shard.narrow(0, a, b - a)) for a, b in ranges], sc, setup.backend)
            else:
                def update_chunk(start: int, chunk: torch.Tensor) -> None:
                    for a, b in ranges:
                        lo, hi = max(a, start), min(b, start + chunk.numel())
                        if lo < hi:
                            fused_update(self._chunk_run(sp, lo, chunk.narrow(0, lo - start, hi - lo)), sc, setup.backend)

                sp.param_host.update(shard, update_chunk)
            if self.group.world > 1 and setup.options.quantized_weights:
                # The other ranks' pieces arrive as int8 blocks; this rank's own piece, its exact parameters (the
                # master of fp32 parameters), is kept ([Note: quantized collectives]).
                exact = shard.clone()
                quantized_all_gather(self.group, sp.flat, shard, self.stats)
                shard.copy_(exact)
            elif self.group.world > 1:
                # In place: the shard is this rank's slice of the flat buffer, as NCCL and gloo allow (a copy of a
                # shard each step would be a large allocation; on a CPU its fresh pages cost a kernel zeroing).
                handles.append(all_gather_into(self.group, sp.flat, shard, self.stats))
        for h in handles:
            h.wait()
        self._end_step()

    def _update_bucket(self, b: Bucket, pieces: list[tuple[int, int, torch.Tensor]]) -> None:
        """release_grads: update this rank's reduced pieces [s, e) (flat coordinates, summed over the ranks) of a
        bucket during backward; the bucket's buffer is freed after. Collective (the finite check)."""
        assert self.release is not None
        sp = b.space
        if b.updated:
            raise RuntimeError(SECOND_BACKWARD)
        b.updated = True
        if not self.release.all_finite([piece for _, _, piece in pieces]):
            for p, _ in b.members:
                sp.lag[p] = sp.lag.get(p, 0) + 1
            return
        hyper = GroupHyper.of(self.setup.param_groups[sp.group_index])
        # Every member of a bucket has the same step count (see FlatSpace.lag).
        step = sp.step_of(b.members[0][0]) + 1
        sc = StepScalars.for_group(hyper, step, 1.0 / self.group.world, sp.group_index)
        runs = [
            Run(
                param=sp.flat.narrow(0, s, e - s),
                grad=piece,
                moments=sp.moments.narrow(s - sp.lo, e - s),
                master=sp.master.narrow(s - sp.lo, e - s),
                index_base=s,
            )
            for s, e, piece in pieces
        ]
        fused_updates(runs, sc, self.setup.backend)

    def _updated_ranges(self, sp: FlatSpace) -> list[tuple[int, int]]:
        """The ranges [a, b) of the shard that this step updates, in shard coordinates.

        Sharded (more than one rank): the whole shard; a parameter without a gradient counts as zeros on every rank,
        since no rank can know whether another had one. One rank (offload alone, stage 0): only the parameters
        with a gradient, as torch.optim.AdamW does, so that frozen parameters get no weight decay. Ranges start
        on block boundaries (every parameter starts a block)."""
        n = sp.hi - sp.lo
        if self.everyone.world > 1 or all(p.grad is not None for p in sp.params):
            return [(0, n)]
        out: list[tuple[int, int]] = []
        for p, slot in zip(sp.params, sp.layout.slots):
            if p.grad is None:
                continue
            if out and out[-1][1] >= slot.start - BLOCK_SIZE:  # adjacent (only padding between): one range
                out[-1] = (out[-1][0], slot.end)
            else:
                out.append((slot.start, slot.end))
        return out

    @staticmethod
    def _chunk_run(sp: FlatSpace, start: int, param: torch.Tensor) -> Run:
        """The run of the shard's elements [start, start + len(param)) with ``param`` holding their values."""
        n = param.numel()
        return Run(
            param=param,
            grad=sp.grad_shard.narrow(0, start, n),
            moments=sp.moments.narrow(start, n),
            master=sp.master.narrow(start, n),
            index_base=sp.lo + start,
        )

    def _step_direct(self, sp: FlatSpace, sc: StepScalars) -> None:
        """Update parameter by parameter, reading p.grad in place; a parameter without a gradient is left alone,
        as torch.optim.AdamW does (see _updated_ranges). All in one call of the backend (fused_updates)."""
        runs = [
            Run(
                param=sp.flat.narrow(0, slot.start, slot.numel),
                grad=p.grad.detach().reshape(-1),
                moments=sp.moments.narrow(slot.start, slot.numel),
                master=sp.master.narrow(slot.start, slot.numel),
                index_base=slot.start,
            )
            for p, slot in zip(sp.params, sp.layout.slots)
            if p.grad is not None
        ]
        fused_updates(runs, sc, self.setup.backend)

    def zero_grad(self) -> None:
        if self.buckets is not None and self.buckets._in_pass:
            self.buckets.finish_pass()
        self._clear_grads()

    # ---------------------------------------------------------------- introspection
    def comm_stats(self) -> dict[str, Any]:
        return self._last_stats

    def _snapshot_stats(self) -> dict[str, Any]:
        return stats_by_dim(self.stats.snapshot(), self.replicate_stats.snapshot() if self.topology else None)

    def memory_stats(self) -> dict[str, int]:
        grads = sum(grad_shard_bytes(sp.grad_shard.numel(), sp.grad_dtype.itemsize) for sp in self.spaces)
        grads += sum(p.grad.numel() * p.grad.element_size() for sp in self.spaces for p in sp.params if p.grad is not None)
        if self.buckets is not None:
            grads += self.buckets.live_bytes()
        return {
            "param_bytes": sum(sp.flat.numel() * sp.flat.element_size() for sp in self.spaces),
            "grad_bytes": grads,
            "state_bytes": sum(sp.moments.nbytes() for sp in self.spaces),
            "master_bytes": sum(sp.master.nbytes() for sp in self.spaces),
            # [Note: communication buffers] in sizes.py: the stage-1 staging buffer (kept between steps) and the
            # most bytes of stage-2 buckets alive at once so far.
            "buffer_bytes": (0 if self._stage1_buffer is None else self._stage1_buffer.numel())
            + (0 if self.buckets is None else self.buckets.peak_live_bytes),
            # The gradient shards and p.grad held now, plus the most bucket bytes alive at once so far.
            "peak_grad_bytes": grads + (0 if self.buckets is None else self.buckets.peak_live_bytes),
        }

    # ---------------------------------------------------------------- state dicts
    def _gather_to(self, t: torch.Tensor, to: int) -> Optional[torch.Tensor]:
        """Every rank's shard of a state tensor, concatenated in CPU memory on rank ``to`` (None elsewhere).

        Point to point, one shard in flight at a time: rank ``to`` never holds the whole state on its accelerator.
        Collective over the group."""
        g = self.group
        comm_dev = self.spaces[0].flat.device  # where the backend takes tensors (NCCL: the GPU)
        if g.rank != to:
            dist.send(t.to(comm_dev).contiguous(), dst=g.global_rank(to), group=g.pg)
            return None
        n = t.numel()
        full = torch.empty(n * g.world, dtype=t.dtype)
        buf = torch.empty(n, dtype=t.dtype, device=comm_dev)
        for r in range(g.world):
            if r == to:
                full.narrow(0, r * n, n).copy_(t)
            else:
                dist.recv(buf, src=g.global_rank(r), group=g.pg)
                full.narrow(0, r * n, n).copy_(buf)
        return full

    def full_entries(self, to: int = 0) -> Optional[dict[torch.Tensor, dict[str, Any]]]:
        """Every parameter's whole state entry on rank ``to`` (CPU tensors; None on the other ranks).

        Collective when the group has more than one rank; with one rank the entries view the live state."""
        out: Optional[dict[torch.Tensor, dict[str, Any]]] = {} if self.group.rank == to else None
        for sp in self.spaces:
            if sp.step == 0:
                continue
            if self.group.world == 1:
                m, mt = sp.moments.tensors(), sp.master.tensors()
            else:
                m = {k: self._gather_to(t, to) for k, t in sp.moments.tensors().items()}
                mt = {k: self._gather_to(t, to) for k, t in sp.master.tensors().items()}
            if out is None:
                continue
            full_m = Moments.of(sp.fmt, m)  # type: ignore[arg-type]
            full_master = Master.of(sp.master_kind, mt)
            for p, slot in zip(sp.params, sp.layout.slots):
                out[p] = entry_of(
                    sp.step_of(p), full_m.narrow(slot.start, slot.numel), full_master.narrow(slot.start, slot.numel), p.shape
                )
                if self.group.world == 1:
                    out[p]["step"] = sp.step_tensor  # live, as the moments are
        return out

    def has_state(self) -> bool:
        # Every rank steps every space together, so every rank answers alike without asking the others.
        return any(sp.step > 0 for sp in self.spaces)

    def shard_entries(self) -> dict[torch.Tensor, dict[str, Any]]:
        """This rank's shard entry of every parameter with state: the elements inside [lo, hi), views of the live
        state (no communication). A parameter outside the shard gets an empty piece, which still carries its step
        (see [Note: full state and shards] in state_dict.py)."""
        out: dict[torch.Tensor, dict[str, Any]] = {}
        for sp in self.spaces:
            if sp.step == 0:
                continue
            for p, slot in zip(sp.params, sp.layout.slots):
                a, b = max(slot.start, sp.lo), min(slot.end, sp.hi)
                if a >= b:
                    a = b = sp.lo  # an empty piece
                    start = 0
                else:
                    start = a - slot.start
                out[p] = piece_entry(
                    sp.step_of(p), sp.moments.narrow(a - sp.lo, b - a), sp.master.narrow(a - sp.lo, b - a), start, start + b - a
                )
        return out

    def local_ranges(self) -> dict[torch.Tensor, tuple[int, int]]:
        out = {}
        for sp in self.spaces:
            for p, slot in zip(sp.params, sp.layout.slots):
                a, b = max(slot.start, sp.lo), min(slot.end, sp.hi)
                if a < b:
                    out[p] = (a - slot.start, b - slot.start)
        return out

    def local_states(self) -> dict[torch.Tensor, LocalState]:
        out = {}
        for sp in self.spaces:
            for p, slot in zip(sp.params, sp.layout.slots):
                a, b = max(slot.start, sp.lo), min(slot.end, sp.hi)
                if a < b:
                    piece = (a - sp.lo, b - a)
                    out[p] = LocalState(sp, a - slot.start, b - slot.start, sp.moments.narrow(*piece), sp.master.narrow(*piece))
        return out

    def check_entries(self, checked: list[CheckedEntry]) -> None:
        step_of = {p: step for p, _gi, step, _e in checked}
        for sp in self.spaces:
            steps = {step_of[p] for p in sp.params if p in step_of}
            if len(steps) > 1:
                raise ValueError(
                    f"ZeroAdam.load_state_dict: parameters of param_groups[{sp.group_index}] have different step "
                    f"counts {sorted(steps)}; a sharded ZeroAdam steps a whole group together"
                )

    def load_entries(self, checked: list[CheckedEntry]) -> None:
        """Install validated per-parameter entries (whole, or shard entries that cover this rank's elements; any
        format, any source world size) into the shards. Only shard-sized buffers are built; nothing changes until
        every space is staged."""
        by_param = {p: (step, entry) for p, _gi, step, entry in checked}
        staged = []
        for sp in self.spaces:
            dev = sp.grad_shard.device
            shard_m = Moments.zeros(sp.fmt, sp.hi - sp.lo, dev)  # type: ignore[arg-type]
            shard_master = Master.create(sp.master_kind, sp.param_shard().to(dev))
            steps = set()
            for p, slot in zip(sp.params, sp.layout.slots):
                if p not in by_param:
                    continue
                step, entry = by_param[p]
                steps.add(step)
                a, b = max(slot.start, sp.lo), min(slot.end, sp.hi)
                if a >= b:
                    continue
                piece = entry_piece(entry, a - slot.start, b - slot.start, slot.numel)
                moments = convert_moments(piece, sp.fmt, b - a, dev, step, index_base=a - slot.start)
                for k, t in shard_m.narrow(a - sp.lo, b - a).tensors().items():
                    t.copy_(moments.tensors()[k])
                param_piece = p.detach().reshape(-1).narrow(0, a - slot.start, b - a).to(dev)
                master = convert_master(piece, sp.master_kind, param_piece)
                for k, t in shard_master.narrow(a - sp.lo, b - a).tensors().items():
                    t.copy_(master.tensors()[k])
            # validate_state_dict already refused a group with different step counts.
            assert len(steps) <= 1, steps
            staged.append((sp, max(steps) if steps else 0, shard_m, shard_master))
        for sp, step, shard_m, shard_master in staged:
            for k, t in sp.moments.tensors().items():
                t.copy_(shard_m.tensors()[k])
            for k, t in sp.master.tensors().items():
                t.copy_(shard_master.tensors()[k])
            sp.step = step
            sp.lag.clear()
