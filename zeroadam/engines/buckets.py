"""Stage-2 gradient buckets, fed by post-accumulate-grad hooks.

As backward produces a parameter's gradient, its hook copies the gradient into the parameter's bucket (a buffer of
the gradient dtype, fp32 or bf16, covering a contiguous range of the flat layout) and frees ``p.grad``. A complete
bucket is reduced, piece by piece, to the ranks that own each piece, asynchronously, while backward goes on; when
the next bucket is launched the previous one is awaited, added into the owners' gradient shards, and its buffer
freed, so at most about two buckets of full gradients exist at a time.

[Note: collective order]
Buckets are launched strictly in their index order, and at the end of every backward pass the ones still
incomplete (parameters that got no gradient) are launched with zeros for the missing parts. Every rank therefore
issues the same reduces in the same order, whatever its data did, and an unused parameter counts as a zero
gradient instead of leaving a collective unmatched.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from zeroadam.comm.collectives import CommStats, Group, reduce_to
from zeroadam.comm.quantized import quantized_reduce_scatter
from zeroadam.engines.base import refuse_sparse_grad
from zeroadam.engines.offload import HostBuffers
from zeroadam.layout import Slot

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.engines.flat import FlatSpace

__all__ = ["Bucket", "GradBuckets"]


@dataclass(eq=False)
class Bucket:
    space: "FlatSpace"
    lo: int  # flat range [lo, hi) of the space's layout
    hi: int
    members: list[tuple[torch.Tensor, Slot]]
    buffer: Optional[torch.Tensor] = None  # 1D [hi - lo] space.grad_dtype, alive while filling or in flight
    filled: int = 0
    handles: list[tuple[Any, int, int, int]] = field(default_factory=list)  # (work, rank, start, end)
    updated: bool = False  # release_grads: updated by a backward since the last step
    taken: set[int] = field(default_factory=set)  # indices of the members whose gradient is in the buffer
    raw: Optional[torch.Tensor] = None  # the pooled bytes behind a CPU buffer (see HostBuffers)

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    @functools.cached_property
    def gaps(self) -> list[tuple[int, int]]:
        """Buffer ranges that no member's gradient covers (padding between tensors); fixed by the layout."""
        out, at = [], 0
        for _, slot in sorted(self.members, key=lambda m: m[1].start):
            if slot.start - self.lo > at:
                out.append((at, slot.start - self.lo))
            at = max(at, slot.end - self.lo)
        if at < self.numel:
            out.append((at, self.numel))
        return out

    def ensure_buffer(self, pool: "HostBuffers") -> torch.Tensor:
        if self.buffer is None:
            if self.space.flat.device.type == "cpu":
                self.raw = pool.take(self.numel * self.space.grad_dtype.itemsize)
                self.buffer = self.raw.view(self.space.grad_dtype)
                for a, b in self.gaps:
                    self.buffer.narrow(0, a, b - a).zero_()
            else:  # the caching allocator pools device memory, and knows the streams that still read a buffer
                self.buffer = torch.zeros(self.numel, dtype=self.space.grad_dtype, device=self.space.flat.device)
        return self.buffer

    def zero_missing(self) -> None:
        """Zeros in the slots of members that got no gradient (an incomplete bucket launched at the end of a pass)."""
        for i, (_, slot) in enumerate(self.members):
            if i not in self.taken:
                self.buffer.narrow(0, slot.start - self.lo, slot.numel).zero_()  # type: ignore[union-attr]

    def free(self, pool: "HostBuffers") -> None:
        if self.raw is not None:
            pool.give(self.raw)
        self.buffer = self.raw = None
        self.filled = 0
        self.taken.clear()


class GradBuckets:
    def __init__(
        self,
        spaces: list["FlatSpace"],
        group: Group,
        bucket_size: int,
        stats: CommStats,
        position: dict[torch.Tensor, float],  # each parameter's relative place in its param group, 0 .. 1
        quantized: bool = False,  # reduce as int8 blocks through an all-to-all ([Note: quantized collectives])
    ) -> None:
        self.group = group
        self.quantized = quantized
        self.stats = stats
        self.sync = True
        self.takes_grads: Callable[[], bool] = lambda: True  # False: a DDP wrapper averages p.grad (grad_sync.py)
        # release_grads: called with a reduced bucket and this rank's summed pieces (start, end, values) instead of
        # adding them into the gradient shard (see FlatEngine._update_bucket).
        self.on_reduced: Optional[Callable[["Bucket", list[tuple[int, int, torch.Tensor]]], None]] = None
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[torch.Tensor, tuple[Bucket, Slot]] = {}
        self._member_index: dict[torch.Tensor, int] = {}  # a parameter's index in its bucket's members
        # Backward visits parameters roughly in reverse order of definition: fill each space's buckets from the
        # end, then launch them in the order they are expected to complete, judged by the earliest-defined member
        # (its relative position in its param group), so that a space of small tensors spread over the whole
        # model (norms, biases) goes last instead of holding back every bucket behind it. The order depends only
        # on the param groups, so it is the same on every rank.
        for space in spaces:
            current: list[tuple[torch.Tensor, Slot]] = []
            size = 0
            for p, slot in reversed(list(zip(space.params, space.layout.slots))):
                current.append((p, slot))
                size += slot.numel
                if size >= bucket_size:
                    self._add(space, current)
                    current, size = [], 0
            if current:
                self._add(space, current)
        self.buckets.sort(key=lambda b: -min(position[p] for p, _ in b.members))
        self.peak_live_bytes = 0  # most bytes of bucket buffers alive at once (full gradients held)
        self.pool = HostBuffers()
        self._next = 0  # index of the next bucket to launch in this pass
        self._in_pass = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.bucket_of]

    def _add(self, space: "FlatSpace", members: list[tuple[torch.Tensor, Slot]]) -> None:
        lo = min(s.start for _, s in members)
        hi = max(s.end for _, s in members)
        b = Bucket(space, lo, hi, members)
        self.buckets.append(b)
        for i, (p, s) in enumerate(members):
            self.bucket_of[p] = (b, s)
            self._member_index[p] = i

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()

    def live_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets if b.buffer is not None)

    # ---------------------------------------------------------------- backward
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.sync or p.grad is None or not self.takes_grads():
            return
        if not self._in_pass:
            self._in_pass = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_pass)
        self.take(p)

    def take(self, p: torch.Tensor) -> None:
        """Move p.grad into its bucket and launch every bucket that is complete, in order."""
        refuse_sparse_grad(p)
        self._in_pass = True
        b, slot = self.bucket_of[p]
        buf = b.ensure_buffer(self.pool)
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes())
        buf.narrow(0, slot.start - b.lo, slot.numel).copy_(p.grad.detach().reshape(-1))
        p.grad = None
        b.filled += 1
        b.taken.add(self._member_index[p])
        while self._next < len(self.buckets) and self.buckets[self._next].filled == len(self.buckets[self._next].members):
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        b = self.buckets[i]
        buf = b.ensure_buffer(self.pool)
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes())  # end of a pass: zeros for the missing
        if b.filled < len(b.members):
            b.zero_missing()
        if self.quantized:
            self._reduce_quantized(b)
            self._next = i + 1
            return
        for r, s, e in b.space.layout.owner_pieces(b.lo, b.hi):
            b.handles.append((reduce_to(self.group, buf.narrow(0, s - b.lo, e - s), r, self.stats), r, s, e))
        self._next = i + 1
        if i > 0:
            self._complete(self.buckets[i - 1])

    def _reduce_quantized(self, b: Bucket) -> None:
        """One all-to-all of the bucket's int8 pieces, each to its owner, summed there in fp32 (synchronous)."""
        ranges = [(0, 0)] * self.group.world
        for r, s, e in b.space.layout.owner_pieces(b.lo, b.hi):
            ranges[r] = (s - b.lo, e - b.lo)
        a, e = ranges[self.group.rank]
        out = torch.empty(e - a, dtype=torch.float32, device=b.buffer.device)  # type: ignore[union-attr]
        quantized_reduce_scatter(self.group, out, b.buffer, ranges, self.stats)  # type: ignore[arg-type]
        if self.on_reduced is not None:  # release_grads: the engine updates from the summed piece
            self.on_reduced(b, [(b.lo + a, b.lo + e, out)] if e > a else [])
        elif e > a:
            lo, _ = b.space.layout.shard_range(self.group.rank)
            b.space.sink.add(b.lo + a - lo, out, 1.0 / self.group.world)
        b.free(self.pool)

    def _complete(self, b: Bucket) -> None:
        """Wait for a launched bucket, add this rank's pieces into its gradient shard, free the buffer."""
        if b.buffer is None:
            return
        lo, _ = b.space.layout.shard_range(self.group.rank)
        mine = []
        for work, r, s, e in b.handles:
            work.wait()
            if r == self.group.rank:
                piece = b.buffer.narrow(0, s - b.lo, e - s)
                if self.on_reduced is None:
                    b.space.sink.add(s - lo, piece, 1.0 / self.group.world)
                else:
                    mine.append((s, e, piece))
        if self.on_reduced is not None:
            self.on_reduced(b, mine)
        b.handles.clear()
        b.free(self.pool)

    def finish_pass(self) -> None:
        """End of a backward pass: launch what is left (zeros for missing gradients), in order, and drain."""
        if not self._in_pass:
            return
        while self._next < len(self.buckets):
            self._launch(self._next)
        for b in self.buckets:
            self._complete(b)
        for space in {id(b.space): b.space for b in self.buckets}.values():
            space.sink.drain()
        self._next = 0
        self._in_pass = False
