"""Collectives with an explicit process group, async handles and byte counts.

[Note: communication accounting]
``CommStats`` counts, per collective type, the elements and bytes of the full tensor each collective covers on
this rank: a reduce-scatter of a Ψ-element buffer counts Ψ, an all-gather into a Ψ-element buffer counts Ψ, a
reduce of an n-element piece counts n. This is the accounting of the ZeRO paper (stages 1 and 2 move 2Ψ
elements per step, the same as DDP's all-reduce, itself a reduce-scatter plus an all-gather). A ring
implementation sends (W - 1) / W of that over each link; ``ring_bytes`` reports that figure too.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor collectives (the old names warn); older releases have only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = [
    "all_gather_single",
    "reduce_scatter_single",
    "CommStats",
    "Group",
    "reduce_scatter_avg",
    "reduce_to",
    "all_gather_into",
    "all_reduce_sum",
    "all_gather_objects",
]


@dataclass
class CommStats:
    world: int
    elements: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, t: torch.Tensor) -> None:
        self.elements[kind] += t.numel()
        self.bytes[kind] += t.numel() * t.element_size()

    def reset(self) -> None:
        self.elements.clear()
        self.bytes.clear()

    def snapshot(self) -> dict[str, Any]:
        total = sum(self.bytes.values())
        return {
            "elements": dict(self.elements),
            "bytes": dict(self.bytes),
            "total_bytes": total,
            "ring_bytes": total * (self.world - 1) // max(self.world, 1),
        }


@dataclass(frozen=True)
class Group:
    """A process group with this rank's position in it (world 1 when torch.distributed is not in use)."""

    pg: Optional[Any]
    rank: int
    world: int

    @staticmethod
    def resolve(process_group: Optional[Any]) -> "Group":
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError(
                    "ZeroAdam: process_group was given but torch.distributed is not initialized; call "
                    "torch.distributed.init_process_group first (torchrun does it for you)"
                )
            return Group(None, 0, 1)
        pg = process_group if process_group is not None else dist.group.WORLD
        rank = dist.get_rank(pg)
        if rank < 0:
            raise ValueError(
                f"ZeroAdam: process_group={process_group!r} does not contain this rank "
                f"(global rank {dist.get_rank()}); pass a group that includes every rank that calls ZeroAdam"
            )
        return Group(pg, rank, dist.get_world_size(pg))

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.pg, rank) if self.pg is not dist.group.WORLD else rank


def reduce_scatter_avg(group: Group, out: torch.Tensor, full: torch.Tensor, stats: CommStats) -> None:
    """out = mean over ranks of this rank's chunk of ``full`` (synchronous)."""
    stats.add("reduce_scatter", full)
    reduce_scatter_single(out, full, op=dist.ReduceOp.SUM, group=group.pg)
    out.mul_(1.0 / group.world)


def reduce_to(group: Group, piece: torch.Tensor, dst: int, stats: CommStats) -> Any:
    """Async sum of ``piece`` into rank ``dst``'s copy; returns the work handle."""
    stats.add("reduce", piece)
    return dist.reduce(piece, dst=group.global_rank(dst), op=dist.ReduceOp.SUM, group=group.pg, async_op=True)


def all_gather_into(group: Group, full: torch.Tensor, shard: torch.Tensor, stats: CommStats) -> Any:
    """Async all-gather of equal shards into ``full``; returns the work handle."""
    stats.add("all_gather", full)
    return all_gather_single(full, shard, group=group.pg, async_op=True)


def _cpu_capable(group: Group) -> bool:
    """Whether the group's backend reduces CPU tensors: NCCL alone does not (a "cpu:gloo,cuda:nccl" group does)."""
    backend = str(dist.get_backend(group.pg))
    return backend != "nccl"


def all_reduce_sum(group: Group, t: torch.Tensor, stats: Optional[CommStats] = None) -> torch.Tensor:
    """Sum ``t`` over the group in place and return it. A CPU tensor (a norm over offloaded gradient shards) goes
    through the current GPU when the group's backend is NCCL alone."""
    if group.world > 1:
        if stats is not None:
            stats.add("all_reduce", t)
        if t.device.type == "cpu" and not _cpu_capable(group):
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group.pg)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group.pg)
    return t


def all_gather_objects(group: Group, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if group.world == 1:
        return [obj]
    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, obj, group=group.pg)
    return out
