"""ZeRO stage 3: a model's parameters sharded across ranks, gathered per unit just in time.

``shard_model(model)`` splits the model into *units* (by default each transformer block, plus the root for the
rest). Each unit's parameters of one dtype are laid out in a block-aligned flat buffer (``FlatLayout``) and only
this rank's shard of it is kept. Parameters stay the same ``nn.Parameter`` objects with the same names and
shapes; they are views into the unit's full buffer, whose storage is released (resized to zero bytes) whenever
the unit is not in use.

[Note: stage-3 schedule]
* forward pre-hook: all-gather the unit (waiting for a prefetch if one is in flight), then start gathering the
  next ``prefetch`` units of the recorded forward order;
* forward post-hook: release the unit when ``reshard_after_forward`` (the root stays until backward ends), and
  hook the unit's outputs so that their gradient re-gathers the unit before its backward runs;
* post-accumulate-grad hooks: copy each gradient into the unit's fp32 gradient buffer and free ``p.grad``; when
  the unit is complete, reduce-scatter it into the fp32 gradient shard and release the unit again;
* end of backward: reduce-scatter whatever is left (zeros for parameters without gradient) and release all;
  under ``no_sync`` nothing is reduce-scattered: the gradients stay whole in ``p.grad`` for autograd to sum, and
  the next synchronized backward reduce-scatters that sum once. A flat none of whose parameters requires a
  gradient is never reduce-scattered (every rank agrees, since requires_grad is the same everywhere).
Reduce-scatters are issued in one fixed order (the reverse of the forward order), each deferred until its
predecessors have gone, and on a process group of their own, so a gather and a reduction are never matched
against each other. That does not make differing graphs safe: a unit that runs on some ranks only (a branch taken
on one rank) leaves the others waiting in its gather or reduce-scatter, which then fails after
ZEROADAM_COLLECTIVE_TIMEOUT on gloo (see [Note: collective timeout] in comm/collectives.py).

[Note: stale full buffers]
A gathered unit's full buffer is a copy of the shards at the time of the gather. The root unit stays gathered
from its forward until the end of backward, so a forward without backward (``torch.no_grad()`` evaluation) leaves
it gathered; with ``reshard_after_forward=False`` every unit stays; a prefetch the forward did not use stays in
flight. Whoever writes the shards (the optimizer step, ``load_full_state_dict``) therefore calls
``ShardedModel.release_all()`` so that the next forward gathers the new values; otherwise it would silently run on
the old weights.

[Note: parameter offload]
With ``shard_model(offload_params=True)`` a unit's persistent shard lives in host memory (pinned when the model
computes on a GPU) and the device holds nothing of the unit between uses. A gather copies the host shard into a
device staging shard and all-gathers that into the full buffer (on one rank it copies the host shard straight
into the full buffer); on CUDA both run on a side stream (``copy_stream``)
that first waits for the compute queued so far (the allocator may hand the full buffer a block the compute stream
freed), so a prefetched unit's copy and all-gather overlap the compute of the unit in use, and the compute stream
waits for them only where it needs the unit. The staging shard is dropped once the gather is waited for. Gradients
are reduce-scattered on the device as usual; each unit's averaged shard goes to a host fp32 gradient shard
(``HostGradSink``: an asynchronous device-to-host copy, added once backward ends). ZeroAdam(stage=3,
offload="cpu") then updates the host shard in place: the parameters have no device copy between steps. Parameter
offload without optimizer offload is refused (``Zero3Engine.create``): the update would need the state on the
device and the parameters copied there and back every step, which saves only the parameters' bytes while paying
two copies of them; DeepSpeed allows that combination, ZeroAdam asks for offload="cpu" instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from zeroadam.comm.agreement import check_same_on_every_rank
from zeroadam.comm.collectives import CommStats, Group, all_gather_into, broadcast_from_first, reduce_scatter_sum
from zeroadam.comm.mesh import Topology, resolve_topology
from zeroadam.comm.quantized import quantized_all_gather, quantized_reduce_scatter
from zeroadam.engines.base import SPARSE_GRAD_FIX, refuse_sparse_grad
from zeroadam.engines.grad_norm import ShardNorm
from zeroadam.engines.offload import HostBuffers, HostGradSink, host_buffer
from zeroadam.layout import FlatLayout
from zeroadam.sizes import DEFAULT_PREFETCH

__all__ = ["shard_model", "full_state_dict", "ShardedModel", "Unit", "UnitFlat", "DEFAULT_UNIT_CLASS_NAMES"]

# Transformer blocks of torch and of common Hugging Face models, matched by class name so that no optional
# package has to be imported.
DEFAULT_UNIT_CLASS_NAMES = frozenset(
    {
        "TransformerEncoderLayer",
        "TransformerDecoderLayer",
        "GPT2Block",
        "GPTNeoBlock",
        "GPTJBlock",
        "GPTNeoXLayer",
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "MixtralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "GemmaDecoderLayer",
        "Gemma2DecoderLayer",
        "PhiDecoderLayer",
        "Phi3DecoderLayer",
        "OPTDecoderLayer",
        "BloomBlock",
        "FalconDecoderLayer",
        "BertLayer",
        "RobertaLayer",
        "T5Block",
        "ViTLayer",
        "Block",
    }
)
_SIZE_THRESHOLD = 50_000_000  # a module with at least this many parameters becomes a unit of its own

UnitPolicy = Union[None, Sequence[type], Callable[[str, nn.Module], bool]]


@dataclass(eq=False)
class UnitFlat:
    """One dtype's parameters of one unit: the persistent shard and the releasable full buffer."""

    params: list[nn.Parameter]
    layout: FlatLayout
    shard: torch.Tensor  # 1D [layout.shard], parameter dtype: what this rank stores between uses
    full: torch.Tensor  # 1D [layout.total]; storage resized to 0 bytes while released; parameters view it
    grad_full: Optional[torch.Tensor] = None  # 1D [layout.total] grad_dtype while backward collects gradients
    grad_shard: Optional[torch.Tensor] = None  # 1D [layout.shard] grad_dtype: averaged gradients for the optimizer
    filled: int = 0
    offloaded: bool = False  # shard and grad_shard live on the host: see [Note: parameter offload]
    grad_sink: Optional[HostGradSink] = None  # moves reduced gradient shards to the host (offloaded only)
    # grad_shard's squared norm, taken as its reductions land ([Note: the norm where gradients land]); the sink's
    # when offloaded.
    _grad_norm: Optional[ShardNorm] = None

    def grad_norm(self) -> Optional[ShardNorm]:
        """The norm tracker of the current ``grad_shard`` (None without one)."""
        if self.grad_sink is not None:
            return self.grad_sink.norm
        if self.grad_shard is None:
            return None
        if self._grad_norm is None or self._grad_norm.shard is not self.grad_shard:
            self._grad_norm = ShardNorm(self.grad_shard, exact=False)  # a shard it has not seen land
        return self._grad_norm

    @property
    def device(self) -> torch.device:
        """Where the unit computes (and the full buffer lives), whatever holds the shard."""
        return self.full.device
    grad_dtype: torch.dtype = torch.float32  # set by the optimizer (ZeroOptions.grad_dtype)

    @property
    def full_bytes(self) -> int:
        return self.layout.total * self.full.element_size()

    def is_materialized(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def materialize(self) -> None:
        if not self.is_materialized():
            self.full.untyped_storage().resize_(self.full_bytes)

    def release(self) -> None:
        self.full.untyped_storage().resize_(0)


@dataclass(eq=False)
class Unit:
    index: int
    name: str
    module: nn.Module
    flats: list[UnitFlat]
    gathered: bool = False
    handles: list[Any] = field(default_factory=list)
    staged: list[torch.Tensor] = field(default_factory=list)  # device copies of offloaded shards, until the gather is waited for
    copied: Optional[Any] = None  # CUDA event: the side stream's copies and gathers of this unit are queued
    reduced: bool = False

    @property
    def numel(self) -> int:
        return sum(len(f.params) for f in self.flats)

    @property
    def grad_params(self) -> int:
        return sum(1 for f in self.flats for p in f.params if p.requires_grad)


class ShardedModel:
    """The stage-3 state of one model (attached to it as ``model._zeroadam_sharded``)."""

    def __init__(
        self, model: nn.Module, topology: Topology, units: list[Unit], reshard_after_forward: bool, prefetch: int,
        offload_params: bool = False,
    ) -> None:
        group = topology.shard
        self.model = model
        self.offload_params = offload_params
        device = units[-1].flats[0].device if units[-1].flats else next((f.device for u in units for f in u.flats), None)
        # Host-to-device copies and gathers of offloaded shards: see [Note: parameter offload].
        self.copy_stream = torch.cuda.Stream(device) if offload_params and device is not None and device.type == "cuda" else None
        self.group = group  # parameters are sharded over these ranks (a 2-D mesh's "shard" dim)
        self.topology = topology  # the replicas of a 2-D mesh hold the same shards ([Note: hybrid sharding])
        # Reduce-scatters travel on a group of their own: see [Note: stage-3 schedule].
        self.grad_group = topology.new_shard_group()
        # 8-bit collectives, set by ZeroAdam(quantized_weights=..., quantized_gradients=...) (comm/quantized.py).
        self.quantized_weights = False
        self.quantized_gradients = False
        self.units = units
        self.root = units[-1]
        self.reshard_after_forward = reshard_after_forward
        self.prefetch = prefetch
        self.stats = CommStats(group.world)
        self.sync = True
        self.forward_order: list[Unit] = []
        self._last_forward_order: list[Unit] = []
        self._in_backward = False
        self._rs_order: list[Unit] = []
        self._rs_next = 0
        self.live_bytes = 0
        self.peak_live_bytes = 0
        self.grad_live_bytes = 0  # gradient buffers (grad_full) alive
        self._host_buffers = HostBuffers()  # kept bytes of the host gradient buffers
        self.peak_grad_bytes = 0  # most bytes of gradient buffers and shards at once since reset (memory_stats)
        # Called with each unit once its gradients are reduced into the shards (ZeroAdam(release_grads=True)).
        self.on_reduced: Optional[Callable[[Unit], None]] = None
        self.peak_buffer_bytes = 0  # most bytes of gathered units and gradient buffers at once
        self.unit_of: dict[nn.Parameter, tuple[Unit, UnitFlat, int]] = {}
        for u in units:
            for f in u.flats:
                for i, p in enumerate(f.params):
                    self.unit_of[p] = (u, f, i)
        self._hooks: list[Any] = []
        for u in units:
            self._hooks.append(u.module.register_forward_pre_hook(self._make_pre_forward(u)))
            self._hooks.append(u.module.register_forward_hook(self._make_post_forward(u)))
        for p in self.unit_of:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._views_allowed = 0
        self._hooks.append(model.register_state_dict_post_hook(lambda *args: self._check_state_dict(*args)))

    # ---------------------------------------------------------------- model.state_dict()
    @contextlib.contextmanager
    def state_dict_views(self) -> Iterator[None]:
        """Inside, ``model.state_dict()`` returns the parameters as they are (released ones hold no values):
        for code that needs names, shapes or the parameter objects, never the values."""
        self._views_allowed += 1
        try:
            yield
        finally:
            self._views_allowed -= 1

    def _check_state_dict(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        # A released unit's parameters have no storage: torch.save would write them, and torch.load then fail
        # ("Trying to resize storage that is not resizable"). Gathering here would be a collective that a rank
        # saving alone (rank 0) would hang in, so the values are refused and the collective way named.
        if self._views_allowed:
            return
        for name, t in state_dict.items():
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().nbytes() == 0:
                raise RuntimeError(
                    f"model.state_dict() of a model sharded by zeroadam.shard_model has no values for {name!r} (its "
                    "unit is released): call zeroadam.full_state_dict(model) on every rank (rank 0 gets the whole "
                    "state dict; rank0_only=True leaves the others empty), or zeroadam.checkpoint.save(path, model, "
                    "optimizer)"
                )

    # ---------------------------------------------------------------- gather / release
    def _start_gather(self, u: Unit) -> None:
        if u.gathered or u.handles or u.copied is not None:
            return
        sync_done = False
        for f in u.flats:
            # Allocated on the compute stream, which frees it in release(): see [Note: parameter offload].
            was = f.is_materialized()
            f.materialize()
            if not was:
                self.live_bytes += f.full_bytes
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for f in u.flats:
                src = f.shard
                if f.offloaded and self.group.world > 1:  # on one rank the host shard is copied straight into full
                    src = torch.empty(f.shard.numel(), dtype=f.shard.dtype, device=f.device)
                    src.copy_(f.shard, non_blocking=True)
                    u.staged.append(src)
                    self.live_bytes += src.numel() * src.element_size()
                if self.group.world > 1 and self.quantized_weights:
                    quantized_all_gather(self.group, f.full, src, self.stats)  # synchronous: no prefetch overlap
                    sync_done = True
                elif self.group.world > 1:
                    u.handles.append(all_gather_into(self.group, f.full, src, self.stats))
                else:
                    f.full.copy_(src, non_blocking=True)
            if stream is not None:
                u.copied = torch.cuda.Event()
                u.copied.record(stream)
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self.live_bytes + self.grad_live_bytes)
        if sync_done:
            u.gathered = True  # a prefetch that completed: the gather before forward has nothing left to do

    def gather(self, u: Unit) -> None:
        try:
            self._start_gather(u)
            for h in u.handles:
                h.wait()
            if u.copied is not None:
                torch.cuda.current_stream(self.copy_stream.device).wait_event(u.copied)  # type: ignore[union-attr]
        except RuntimeError as e:
            # gloo: "Received data size doesn't match expected size"; NCCL would hang instead.
            raise RuntimeError(
                f"zeroadam: gathering the parameters of unit {u.name!r} failed on rank {self.group.rank} ({e}). Every "
                "rank runs every forward, backward and step() of a model sharded by zeroadam.shard_model (each forward "
                "all-gathers); a rank that skipped one of them leaves the others waiting here. To evaluate on one "
                "rank only, run the forward on all ranks, or build an unsharded copy from "
                "zeroadam.full_state_dict(model) (every rank calls it) and evaluate that"
            ) from e
        u.handles.clear()
        self.live_bytes -= sum(t.numel() * t.element_size() for t in u.staged)
        u.staged.clear()  # allocated on the side stream, read only there and by the collective (which records it)
        u.copied = None
        u.gathered = True

    def release(self, u: Unit) -> None:
        if u.handles or u.copied is not None:
            self.gather(u)  # never free a buffer a collective is still writing
        for f in u.flats:
            if f.is_materialized():
                self.live_bytes -= f.full_bytes
            f.release()
        u.gathered = False

    def load_shards(self, values: dict[nn.Parameter, torch.Tensor]) -> None:
        """Copy this rank's pieces of whole parameter values into the shards (local); parameters not in ``values``
        keep theirs. Gathered units are released first (see [Note: stale full buffers])."""
        self.release_all()
        rank = self.group.rank
        with torch.no_grad():
            for u in self.units:
                for f in u.flats:
                    lo, hi = f.layout.shard_range(rank)
                    for p, slot in zip(f.params, f.layout.slots):
                        a, b = max(slot.start, lo), min(slot.end, hi)
                        if p in values and a < b:
                            src = values[p].reshape(-1).narrow(0, a - slot.start, b - a)
                            f.shard.narrow(0, a - lo, b - a).copy_(src)

    def release_all(self) -> None:
        """Release every unit, waiting out gathers in flight: the shards changed (see [Note: stale full buffers]).
        Between passes only; local, no communication."""
        for u in self.units:
            self.release(u)

    def _prefetch_after(self, u: Unit, order: list[Unit]) -> None:
        if u not in order:
            return
        i = order.index(u)
        for nxt in order[i + 1 : i + 1 + self.prefetch]:
            self._start_gather(nxt)

    # ---------------------------------------------------------------- forward
    def _make_pre_forward(self, u: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if u is self.root and not self._in_backward:
                self._last_forward_order = self.forward_order or self._last_forward_order
                self.forward_order = []
            if not self._in_backward and u not in self.forward_order:
                self.forward_order.append(u)
            self.gather(u)
            self._prefetch_after(u, self._last_forward_order)

        return hook

    def _make_post_forward(self, u: Unit) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.reshard_after_forward and u is not self.root and not self._in_backward:
                self.release(u)
            if torch.is_grad_enabled():
                for t in pytree.tree_leaves(output):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(self._make_pre_backward(u))
            return output

        return hook

    # ---------------------------------------------------------------- backward
    def _make_pre_backward(self, u: Unit) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self._in_backward:
                self._begin_backward()
            if not u.gathered:
                self.gather(u)
                self._prefetch_after(u, list(reversed(self.forward_order)))

        return hook

    def _begin_backward(self) -> None:
        self._in_backward = True
        seen = list(reversed(self.forward_order))
        self._rs_order = seen + [u for u in self.units if u not in seen]
        self._rs_next = 0
        for u in self.units:
            u.reduced = False
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.sync or p.grad is None:
            return
        refuse_sparse_grad(p)
        if not self._in_backward:
            self._begin_backward()
        u, f, i = self.unit_of[p]  # type: ignore[index]
        self._grad_buffer(f)
        slot = f.layout.slots[i]
        f.grad_full.narrow(0, slot.start, slot.numel).copy_(p.grad.detach().reshape(-1))
        p.grad = None
        f.filled += 1
        self._launch_ready()

    def _scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized 1D buffer for one reduction: pooled bytes on the host (see ``HostBuffers``)."""
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        return self._host_buffers.take(numel * dtype.itemsize).view(dtype)

    def _give_back(self, t: torch.Tensor) -> None:
        if t.device.type == "cpu":
            self._host_buffers.give(t)

    def _grad_buffer(self, f: UnitFlat) -> torch.Tensor:
        """The flat's gradient buffer, allocated (and counted) at its first use in a backward pass."""
        if f.grad_full is None:
            f.grad_full = self._scratch(f.layout.total, f.grad_dtype, f.device)
            f.grad_full.zero_()  # parameters without a gradient count as zeros
            self.grad_live_bytes += f.layout.total * f.grad_dtype.itemsize
            self._note_grad_bytes()
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, self.live_bytes + self.grad_live_bytes)
        return f.grad_full

    def _complete(self, u: Unit) -> bool:
        return sum(f.filled for f in u.flats) >= u.grad_params

    def _launch_ready(self, force: bool = False) -> None:
        while self._rs_next < len(self._rs_order):
            u = self._rs_order[self._rs_next]
            if not (force or self._complete(u)):
                return
            self._reduce(u)
            self._rs_next += 1

    def _reduce(self, u: Unit) -> None:
        """Average the unit's gradients into its shards, then release its parameters."""
        for f in u.flats:
            if not any(p.requires_grad for p in f.params):
                continue  # frozen: nothing to reduce (see [Note: stage-3 schedule])
            self._grad_buffer(f)
            # The first reduction of a step lands in the shard itself; later ones (accumulation) go through a
            # buffer added into it. With release_grads every reduction is a first one: one shard, no buffer. An
            # offloaded shard lives on the host: reductions go through a device buffer and the sink
            # ([Note: parameter offload]).
            fresh = f.grad_shard is None
            if fresh:
                if f.offloaded:
                    f.grad_shard = host_buffer(f.layout.shard, f.grad_dtype, pin=f.device.type == "cuda")
                    f.grad_shard.zero_()
                    f.grad_sink = HostGradSink(f.grad_shard, f.device)
                else:
                    f.grad_shard = torch.empty(f.layout.shard, dtype=f.grad_dtype, device=f.device)
            direct = fresh and f.grad_sink is None  # the reduction can write the shard itself
            out = f.grad_shard if direct else self._scratch(f.layout.shard, f.grad_dtype, f.device)
            if self.group.world > 1 and self.quantized_gradients:
                n = f.layout.shard
                ranges = [(r * n, (r + 1) * n) for r in range(self.group.world)]
                quantized_reduce_scatter(self.grad_group, out, f.grad_full, ranges, self.stats)
            elif self.group.world > 1:
                reduce_scatter_sum(self.grad_group, out, f.grad_full, self.stats)
            else:
                out.copy_(f.grad_full)
            alpha = 1.0 / self.group.world
            if f.grad_sink is not None:
                f.grad_sink.add(0, out, alpha)
            else:  # the average lands in the shard with its squared norm (whole-shard landings: always exact)
                f.grad_norm().land(0, None if direct else out, alpha)  # type: ignore[union-attr]
            self._note_grad_bytes(0 if direct else out.numel() * out.element_size())
            if not direct:
                self._give_back(out)
            self._give_back(f.grad_full)
            f.grad_full = None
            self.grad_live_bytes -= f.layout.total * f.grad_dtype.itemsize
            f.filled = 0
        u.reduced = True
        if self.on_reduced is not None:
            self.on_reduced(u)
        if u is not self.root:
            self.release(u)

    def _note_grad_bytes(self, extra: int = 0) -> None:
        shards = sum(f.grad_shard.numel() * f.grad_shard.element_size() for u in self.units for f in u.flats
                     if f.grad_shard is not None)
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.grad_live_bytes + shards + extra)

    def _end_backward(self) -> None:
        if self.sync:
            self._launch_ready(force=True)
            for u in self.units:
                for f in u.flats:
                    if f.grad_sink is not None:
                        f.grad_sink.drain()  # the host gradient shards are complete before step() reads them
        # Under no_sync the gradients wait in p.grad and no unit was reduced (see [Note: stage-3 schedule]).
        for u in self.units:
            self.release(u)
        self._in_backward = False

    # ---------------------------------------------------------------- state
    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def full_flat(self, f: UnitFlat) -> torch.Tensor:
        """The whole flat buffer of one unit dtype (collective), without touching the parameters' storage."""
        if self.group.world == 1:
            return f.shard
        full = torch.empty(f.layout.total, dtype=f.shard.dtype, device=f.device)
        all_gather_into(self.group, full, f.shard.to(f.device), None).wait()  # a host shard goes through the device
        return full


# -------------------------------------------------------------------- construction
def _is_unit(name: str, module: nn.Module, policy: UnitPolicy) -> bool:
    if policy is None:
        if type(module).__name__ in DEFAULT_UNIT_CLASS_NAMES:
            return True
        return sum(p.numel() for p in module.parameters()) >= _SIZE_THRESHOLD and any(True for _ in module.children())
    if callable(policy) and not isinstance(policy, (list, tuple)):
        return bool(policy(name, module))
    return isinstance(module, tuple(policy))


def _assign_units(model: nn.Module, policy: UnitPolicy) -> list[tuple[str, nn.Module, list[nn.Parameter]]]:
    """(name, module, own parameters) per unit, the root last; a parameter held by several units, or by a unit and
    a module outside every unit, goes to the root."""
    unit_modules: list[tuple[str, nn.Module]] = []
    claimed: set[int] = set()
    for name, m in model.named_modules():
        if m is model or any(name.startswith(n + ".") for n, _ in unit_modules):
            continue
        if _is_unit(name, m, policy):
            unit_modules.append((name, m))
    if policy is not None and not unit_modules:
        raise ValueError(
            f"zeroadam.shard_model: units={policy!r} selects no module of {type(model).__name__}; pass the classes "
            "of its blocks (for example units=[MyBlock]) or a predicate (name, module) -> bool"
        )
    owners: dict[nn.Parameter, set[int]] = {}
    for ui, (_, m) in enumerate(unit_modules):
        for p in m.parameters():
            owners.setdefault(p, set()).add(ui)
    # The root holds what modules outside every unit use; a parameter that a unit holds too (an embedding tied to
    # an LM head that is a unit) must be gathered whenever the root is, so it belongs to the root.
    root, inside = len(unit_modules), {id(m) for _, m in unit_modules}
    stack, seen = [model], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(p, set()).add(root)
        stack.extend(c for c in m._modules.values() if c is not None and id(c) not in inside)
    out = []
    for ui, (name, m) in enumerate(unit_modules):
        own = [p for p in m.parameters() if owners[p] == {ui}]
        claimed.update(id(p) for p in own)
        out.append((name, m, own))
    rest = [p for p in model.parameters() if id(p) not in claimed]
    out.append(("", model, rest))
    return out


def _build_flats(
    params: list[nn.Parameter],
    topology: Topology,
    device: torch.device,
    fill: Callable[[list[nn.Parameter], FlatLayout, torch.Tensor], None],
    rebound: dict[nn.Parameter, nn.Parameter],
    offload_params: bool = False,
) -> list[UnitFlat]:
    """Flat buffers per dtype: parameters become views of the full buffer, ``fill`` writes their values, this rank
    keeps its shard and the full buffer is released. A meta parameter cannot view real memory, so it is replaced
    by a new Parameter (recorded in ``rebound``) that ``_rebind`` installs in every module that held it."""
    group = topology.shard
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    flats = []
    for dtype, ps in by_dtype.items():
        layout = FlatLayout.build(ps, group.world)
        full = torch.zeros(layout.total, dtype=dtype, device=device)
        views = [full.narrow(0, s.start, s.numel).view(s.shape) for s in layout.slots]
        live = []
        with torch.no_grad():
            for p, v in zip(ps, views):
                if not p.is_meta:
                    v.copy_(p.detach())
                if p.is_meta:
                    rebound[p] = nn.Parameter(v, requires_grad=p.requires_grad)
                    live.append(rebound[p])
                else:
                    p.data = v
                    live.append(p)
            fill(live, layout, full)
            # Like DDP: every rank starts from rank 0's values (and rank 0 alone read a state dict).
            broadcast_from_first(topology.everyone, full)
        lo, hi = layout.shard_range(group.rank)
        if offload_params:  # the persistent shard lives on the host: [Note: parameter offload]
            shard = host_buffer(hi - lo, dtype, pin=device.type == "cuda")
            shard.copy_(full.narrow(0, lo, hi - lo))
        else:
            shard = full.narrow(0, lo, hi - lo).clone()
        f = UnitFlat(live, layout, shard, full, offloaded=offload_params)
        f.release()
        flats.append(f)
    return flats


@contextlib.contextmanager
def _others_on_meta(module: nn.Module, live: set[int]) -> Iterator[None]:
    """Hide the module's parameters that are not being filled behind meta stand-ins while ``init_fn`` runs. Those
    already built view a released buffer (another dtype, or another unit when a tied weight took the module's
    unit to the root), and writing them would write through a zero-byte storage."""
    hidden = {
        n: q for n, q in module._parameters.items() if q is not None and id(q) not in live and not q.is_meta
    }
    for n, q in hidden.items():
        module._parameters[n] = nn.Parameter(torch.empty(q.shape, dtype=q.dtype, device="meta"), q.requires_grad)
    try:
        yield
    finally:
        module._parameters.update(hidden)


def _rebind(model: nn.Module, rebound: dict[nn.Parameter, nn.Parameter]) -> None:
    for m in model.modules():
        for name, q in list(m._parameters.items()):
            if q is not None and q in rebound:
                m._parameters[name] = rebound[q]


def shard_model(
    model: nn.Module,
    *,
    process_group: Optional[Any] = None,
    mesh: Optional[Any] = None,
    units: UnitPolicy = None,
    reshard_after_forward: bool = True,
    prefetch: int = DEFAULT_PREFETCH,
    device: Optional[Union[str, torch.device]] = None,
    full_state_dict: Optional[dict[str, torch.Tensor]] = None,
    init_fn: Optional[Callable[[nn.Module], None]] = None,
    seed: int = 0,
    offload_params: bool = False,
) -> nn.Module:
    """Shard a model's parameters across the ranks of ``process_group`` (ZeRO stage 3), in place.

    Every parameter keeps its name, shape and identity, so param groups built by name or dimension keep working;
    build ``ZeroAdam(model.parameters(), stage=3)`` afterwards. Units: ``units=None`` picks transformer blocks of
    torch and Hugging Face models (and any module of >= 50M parameters), or pass classes or a predicate
    ``(name, module) -> bool``; the root unit holds the rest.

    A model built on the meta device is materialized unit by unit on ``device``, never whole: from
    ``full_state_dict`` given on rank 0 (the other ranks pass None), or by ``init_fn(submodule)`` applied to every
    submodule of each unit under ``torch.manual_seed(seed + unit index)`` on every rank.

    ``mesh``: instead of ``process_group``, a DeviceMesh; with dims ``("replicate", "shard")`` the parameters are
    sharded over "shard" only and every replica holds the same shards (hybrid sharding, see zeroadam/comm/mesh.py).
    Pass the same mesh to ``ZeroAdam``.

    ``offload_params=True`` keeps each rank's parameter shards in host memory (pinned on a GPU machine): a unit's
    shard is copied to the device right before its all-gather (prefetched like the gather) and nothing of the unit
    stays on the device after its release. Build ``ZeroAdam(..., stage=3, offload="cpu")`` with it, which updates
    the host shards in place (see [Note: parameter offload]).
    """
    topology = resolve_topology(mesh, process_group, "zeroadam.shard_model")
    group, everyone = topology.shard, topology.everyone
    # Every rank checks alone, then all agree ([Note: fingerprints]) before any other collective: a rank that
    # raised here while the others went on would leave them waiting in the first gather.
    try:
        _check_shard_arguments(model, prefetch, device, offload_params)
        assigned = _assign_units(model, units)
        error: Optional[ValueError] = None
    except ValueError as e:
        assigned, error = [], e
    if error is not None:
        mine = [("error", str(error))]
    else:
        mine = _model_fingerprint(model, assigned, reshard_after_forward, prefetch, device, offload_params)
    check_same_on_every_rank(
        everyone, [("mesh (replicate, shard)", topology.shape)] + mine, "zeroadam.shard_model", "the model", "every rank must build the same model and call shard_model alike"
    )
    if error is not None:
        raise error
    on_meta = any(p.is_meta for p in model.parameters())
    target = torch.device(device) if device is not None else next(model.parameters()).device
    source = "params"
    if on_meta:
        has_sd = [full_state_dict is not None]
        if everyone.world > 1:
            dist.broadcast_object_list(has_sd, src=everyone.global_rank(0), group=everyone.pg)
        if has_sd[0]:
            source = "state_dict"
        elif init_fn is not None:
            source = "init_fn"
        else:
            raise ValueError(
                "zeroadam.shard_model: a meta-device model needs full_state_dict= (on rank 0) or init_fn= to "
                "initialize its parameters"
            )
    names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
    built: list[Unit] = []
    rebound: dict[nn.Parameter, nn.Parameter] = {}
    for ui, (uname, module, own) in enumerate(assigned):
        def fill(ps: list[nn.Parameter], layout: FlatLayout, full: torch.Tensor, ui: int = ui, module: nn.Module = module, own: list = own) -> None:
            originals = [p for p in own if p.dtype == full.dtype]
            if source == "params":
                return  # _build_flats copied the parameters' values before they became views
            if source == "state_dict":
                if everyone.rank == 0:
                    for p, slot in zip(originals, layout.slots):
                        if names[p] not in full_state_dict:  # type: ignore[operator]
                            raise KeyError(f"zeroadam.shard_model: full_state_dict has no entry {names[p]!r}")
                        full.narrow(0, slot.start, slot.numel).copy_(full_state_dict[names[p]].reshape(-1))  # type: ignore[index]
                return
            torch.manual_seed(seed + ui)
            live = {id(p) for p in ps}
            swapped = []
            for sub in module.modules():
                for n, q in list(sub._parameters.items()):
                    if q is not None and q in rebound and id(rebound[q]) in live:
                        sub._parameters[n] = rebound[q]
                        swapped.append(sub)
            for sub in module.modules():
                if sub in swapped or any(id(q) in live for q in sub.parameters(recurse=False)):
                    with _others_on_meta(sub, live):
                        init_fn(sub)  # type: ignore[misc]

        flats = _build_flats(own, topology, target, fill, rebound, offload_params)
        built.append(Unit(ui, uname or "<root>", module, flats))
    _rebind(model, rebound)
    if on_meta:
        _materialize_buffers(model, target, full_state_dict if source == "state_dict" else None, everyone)
    sharded = ShardedModel(model, topology, built, reshard_after_forward, prefetch, offload_params)
    model._zeroadam_sharded = sharded  # type: ignore[assignment]
    # DistributedDataParallel(model) would broadcast the released parameters (0 bytes of storage) and crash the
    # process with no Python error; told to ignore them, it raises instead ("not needed when a module doesn't have
    # any parameter that requires a gradient"): ZeroAdam(stage=3) already averages the gradients.
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [n for n, _ in model.named_parameters(remove_duplicate=False)]
    )
    for p in sharded.unit_of:
        p._zeroadam_sharded = sharded  # how ZeroAdam(stage=3) finds the shards of the parameters it is given
    return model


def _check_shard_arguments(model: nn.Module, prefetch: Any, device: Any, offload_params: Any) -> None:
    if hasattr(model, "_zeroadam_sharded"):
        raise ValueError("zeroadam.shard_model: this model is already sharded")
    if not isinstance(offload_params, bool):
        raise ValueError(
            f"zeroadam.shard_model: invalid offload_params={offload_params!r}; expected True (parameter shards in "
            "host memory) or False"
        )
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ValueError(f"zeroadam.shard_model: invalid prefetch={prefetch!r}; expected an integer >= 0")
    if device is None and any(p.is_meta for p in model.parameters()):
        raise ValueError("zeroadam.shard_model: the model is on the meta device; pass device= to materialize it on")
    for name, m in model.named_modules():
        # A sparse gradient cannot enter a unit's flat gradient buffer; say so now rather than in backward.
        if getattr(m, "sparse", False) is True and isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            raise ValueError(
                f"zeroadam.shard_model: {name or type(m).__name__} is {type(m).__name__}(sparse=True); ZeroAdam does "
                f"not support sparse gradients: {SPARSE_GRAD_FIX}"
            )


def _model_fingerprint(
    model: nn.Module,
    assigned: list[tuple[str, nn.Module, list[nn.Parameter]]],
    reshard_after_forward: bool,
    prefetch: int,
    device: Any,
    offload_params: bool = False,
) -> list[tuple[str, Any]]:
    """What every rank's shard_model must agree on: the options that change the order of gathers, whether the
    model is on the meta device, and per unit its name and its parameters' names, shapes, dtypes and whether
    they take gradients; then the buffers (a meta buffer is broadcast)."""
    names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
    items: list[tuple[str, Any]] = [
        ("reshard_after_forward", bool(reshard_after_forward)),
        ("prefetch", prefetch),
        ("offload_params", offload_params),
        ("device", None if device is None else torch.device(device).type),
        ("on_meta", any(p.is_meta for p in model.parameters())),
        ("units", len(assigned)),
    ]
    for ui, (uname, _, own) in enumerate(assigned):
        items.append((f"unit {ui}", uname or "<root>"))
        for p in own:
            items.append((f"parameter {names.get(p, '?')!r}", (tuple(p.shape), str(p.dtype), p.requires_grad)))
    for name, b in model.named_buffers():
        items.append((f"buffer {name!r}", (tuple(b.shape), str(b.dtype), b.is_meta)))
    return items


def _materialize_buffers(model: nn.Module, device: torch.device, sd: Optional[dict[str, torch.Tensor]], group: Group) -> None:
    for mname, m in model.named_modules():
        for bname, b in list(m._buffers.items()):
            if b is None or not b.is_meta:
                continue
            key = f"{mname}.{bname}" if mname else bname
            nb = torch.zeros(b.shape, dtype=b.dtype, device=device)
            if sd is not None and group.rank == 0 and key in sd:
                nb.copy_(sd[key])
            broadcast_from_first(group, nb)
            m._buffers[bname] = nb


def sharded_state(model: nn.Module) -> ShardedModel:
    st = getattr(model, "_zeroadam_sharded", None)
    if st is None:
        raise ValueError(
            f"zeroadam: {type(model).__name__} is not sharded; call zeroadam.shard_model(model) first "
            "(for an unsharded model use model.state_dict())"
        )
    return st


def full_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, keys as ``model.state_dict()`` (collective on every rank).

    With ``rank0_only`` the other ranks get an empty dict.
    """
    st = sharded_state(model)
    out: dict[str, torch.Tensor] = {}
    keep = not rank0_only or st.group.rank == 0
    seen: dict[nn.Parameter, torch.Tensor] = {}
    for u in st.units:
        for f in u.flats:
            full = st.full_flat(f)
            for p, slot in zip(f.params, f.layout.slots):
                seen[p] = full.narrow(0, slot.start, slot.numel).view(slot.shape).cpu().clone()
    with st.state_dict_views():
        own = model.state_dict(keep_vars=True)
    for name, t in own.items():
        if not keep:
            continue
        out[name] = seen[t] if t in seen else t.detach().cpu().clone()
    return out


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict into a sharded model: each rank copies the pieces of its shards;
    buffers load as usual. Not collective. Keys and shapes must match ``model.state_dict()`` exactly."""
    st = sharded_state(model)
    with st.state_dict_views():
        own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"zeroadam.load_full_state_dict: keys differ from the model's: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, t in own.items():
        if tuple(state_dict[name].shape) != tuple(t.shape):
            raise ValueError(
                f"zeroadam.load_full_state_dict: {name!r} has shape {tuple(state_dict[name].shape)}, the model {tuple(t.shape)}"
            )
    st.load_shards({p: state_dict[n] for n, p in own.items() if isinstance(p, nn.Parameter)})
    with torch.no_grad():
        for name, t in own.items():
            if not isinstance(t, nn.Parameter):
                t.copy_(state_dict[name])
