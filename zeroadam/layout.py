"""Block-aligned flat layouts: where each parameter lives in its flat buffer, and which range each rank owns.

[Note: block-aligned layout]
The parameters of one *space* (a param group's parameters of one dtype, device and moment format) are laid out
in order, each starting on a 256-element block boundary; the total is padded to a whole number of blocks per
rank. Quantization blocks therefore follow each parameter's own flattened index, and a parameter's position in
the layout does not depend on the world size: state quantized at one world size is bit-identical at another,
and the stochastic-rounding hash (indexed by layout position) draws the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from zeroadam.sizes import padded, shard_numel

__all__ = ["Slot", "FlatLayout", "padded", "space_key", "group_spaces"]


def space_key(p: torch.Tensor, fmt: str) -> tuple[torch.dtype, torch.device, str]:
    return (p.dtype, p.device, fmt)


def group_spaces(
    params: Sequence[torch.Tensor], fmt_of: Callable[[torch.Tensor], str]
) -> dict[Hashable, list[torch.Tensor]]:
    """A param group's parameters split into spaces (dtype, device, moment format), keeping their order."""
    spaces: dict[Hashable, list[torch.Tensor]] = {}
    for p in params:
        spaces.setdefault(space_key(p, fmt_of(p)), []).append(p)
    return spaces


@dataclass(frozen=True)
class Slot:
    """One parameter's place in a flat layout."""

    index: int  # position in the space's parameter list
    start: int  # first element in the flat buffer (a block boundary)
    numel: int
    shape: torch.Size

    @property
    def end(self) -> int:
        return self.start + self.numel


@dataclass(frozen=True)
class FlatLayout:
    slots: tuple[Slot, ...]
    world: int
    total: int  # flat buffer length: whole blocks per rank, times world
    shard: int  # elements per rank (a multiple of BLOCK_SIZE)

    @staticmethod
    def build(params: Sequence[torch.Tensor], world: int) -> "FlatLayout":
        slots, off = [], 0
        for i, p in enumerate(params):
            slots.append(Slot(i, off, p.numel(), p.shape))
            off += padded(p.numel())
        per_rank = shard_numel(off, world)
        return FlatLayout(tuple(slots), world, per_rank * world, per_rank)

    def shard_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard, (rank + 1) * self.shard

    def owner_pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(rank, start, end) pieces of the flat range [lo, hi) by owning rank."""
        out = []
        r = lo // self.shard
        while lo < hi:
            end = min(hi, (r + 1) * self.shard)
            out.append((r, lo, end))
            lo, r = end, r + 1
        return out

    def local_slots(self, rank: int) -> list[tuple[Slot, int, int]]:
        """(slot, start, end) of every parameter part inside this rank's shard, in flat coordinates."""
        lo, hi = self.shard_range(rank)
        return [(s, max(s.start, lo), min(s.end, hi)) for s in self.slots if s.start < hi and s.end > lo]
