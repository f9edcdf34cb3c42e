"""The squared norm of a gradient shard, taken where reduced gradients land in it.

[Note: the norm where gradients land]
The step needs the global squared norm of the gradients before it writes anything: for clipping, and as the
non-finite flag (a NaN or inf anywhere makes the sum non-finite, every rank skips; see ``ZeroAdam._global_norm``).
A pass of its own over every gradient shard at ``step()`` would read 4 bytes per element on top of the update's 28
(fp32): 1/8 of a memory-bound step. Instead, every reduced gradient that lands in a shard — a stage-2 bucket piece
added at the end of its reduction, a stage-1 chunk added after its reduce-scatter, a stage-3 unit's reduced shard,
an offloaded piece added on the host after its device-to-host copy — is added by ``land_sq_sum``, which returns the
sum of squares of the range it has just written (on a CPU in the same pass: ``add_sq_sum_compiled``). A ``ShardNorm``
keeps the latest sum of each landed range; with gradient accumulation a range lands once per micro-batch and its
last sum is that of the accumulated gradient. At the step the shard's squared norm is the sum of its ranges' sums
(ranges that never landed hold the zeros the shard was cleared to).

The sums stand for the shard only while nothing else has written it: every in-place torch op bumps the shard's
version counter (views share it; the compiled kernel bumps it too), so a shard whose version is not the one left by
its last landing — scaled by a GradScaler's unscale, averaged over a mesh's replicas, copied from a DDP wrapper's
gradients, changed by hand — has its sums dropped until it is cleared, and the step takes a pass over it as before.
So the skip keeps its guarantee: a shard's sum either is the sum of what it holds or is recomputed from it.
Stage 0 (gradients in ``p.grad``, written by autograd) and FSDP2's shards keep the pass.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from zeroadam.update.dispatch import grads_sq_sum, land_sq_sum

__all__ = ["ShardNorm", "shards_sq_sum", "sum_of"]

Sum = Union[float, torch.Tensor]


class ShardNorm:
    """The squared norm of one 1-D gradient shard, kept range by range as gradients land in it."""

    def __init__(self, shard: torch.Tensor, exact: bool = True) -> None:
        """``exact``: the shard holds zeros (a fresh tracker of a shard with other contents says False: its sums
        stand for it only after a whole-shard landing or a reset)."""
        self.shard = shard
        self._sums: dict[int, tuple[int, Sum]] = {}  # start -> (numel, sum of squares of shard[start:start+numel])
        self._version = shard._version
        self._exact = exact

    def land(self, start: int, src: Optional[torch.Tensor], alpha: float) -> None:
        """shard[start : start + n] += alpha * src (``*= alpha`` when src is None, n the shard's length then
        too) and keep the range's sum of squares."""
        n = self.shard.numel() - start if src is None else src.numel()
        stale = self.shard._version != self._version  # written elsewhere since the last landing
        s = land_sq_sum(self.shard.narrow(0, start, n), src, alpha)
        if start == 0 and n == self.shard.numel():
            self._sums = {0: (n, s)}  # the whole shard (stage 3): its sum, whatever it held before
            self._exact = True
        else:
            known = self._sums.get(start)
            # Written elsewhere, or ranges that overlap differently (their sums would not add up): a pass until the
            # next reset.
            if stale or (known is not None and known[0] != n):
                self._exact = False
            self._sums[start] = (n, s)
        self._version = self.shard._version

    def reset(self) -> None:
        """The shard was cleared (zeros): no range holds anything."""
        self._sums.clear()
        self._version = self.shard._version
        self._exact = True

    def sq_sum(self, shard: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The shard's sum of squares from its landed ranges, or None when they no longer describe it (it was
        written elsewhere, or ``shard`` is another tensor than the one tracked): the caller then takes a pass."""
        if (shard is not None and shard is not self.shard) or not self._exact or self.shard._version != self._version:
            return None
        return sum_of([s for _, (_, s) in sorted(self._sums.items())], self.shard.device)


def sum_of(sums: list[Sum], device: torch.device) -> torch.Tensor:
    """The total of host floats and tensors, in order, in fp64 (one launch for the tensors on an accelerator)."""
    host = 0.0
    on_device = []
    for s in sums:
        if isinstance(s, float):
            host += s
        elif s.device.type == "cpu":
            host += float(s)
        else:
            on_device.append(s.to(torch.float64))
    if device.type == "cpu" or not on_device:
        return torch.tensor(host, dtype=torch.float64, device=device)
    return torch.stack(on_device).sum() + host


def shards_sq_sum(shards: list[tuple[torch.Tensor, Optional[ShardNorm]]]) -> Optional[torch.Tensor]:
    """The squared norm of gradient shards, each with its tracker: the landed sums where they stand, one pre-pass
    (``grads_sq_sum``) over the others; None for no shards."""
    landed: list[Sum] = []
    passes: list[torch.Tensor] = []
    for shard, norm in shards:
        s = None if norm is None else norm.sq_sum(shard)
        if s is None:
            passes.append(shard)
        else:
            landed.append(s)
    if not passes:
        return sum_of(landed, shards[0][0].device) if landed else None
    total = grads_sq_sum(passes)
    return total + sum_of(landed, total.device).to(total.dtype) if landed else total
