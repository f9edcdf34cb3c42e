"""8-bit collectives: block-wise int8 values with one fp32 scale per block (ZeRO++'s qwZ and qgZ, arXiv 2306.10209).

[Note: quantized collectives]
Values travel as linear absmax int8 codes, one scale per ``BLOCK_SIZE`` elements counted from the start of each
piece (pieces start on block boundaries of the flat layout, so blocks follow the parameters' global index), about
1.02 bytes per element against 4 (fp32) or 2 (bf16).

* ``quantized_all_gather`` (qwZ, ``quantized_weights=True``): each rank quantizes its parameter shard, all ranks
  gather codes and scales and decode them. Every rank uses the decoded values, its own piece included, so that all
  ranks run forward and backward on the same weights; the shard the update writes stays exact.
* ``quantized_reduce_scatter`` (qgZ, ``quantized_gradients=True``): summing codes quantized with different scales
  is wrong, so a reduction is an all-to-all: rank r sends each other rank the codes of that rank's piece, and the
  receiver decodes the W contributions and sums them in fp32.
* ``quantized_all_reduce``: a quantized reduce-scatter, then a quantized all-gather of the sums (every rank,
  the piece's owner included, keeps the decoded sum, so all end with the same values).

A non-finite value makes its block's scale non-finite and every decoded value of the block NaN, so the step's
non-finite check still sees it on every rank.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from zeroadam.comm.collectives import CommStats, Group, Pending, all_gather_single
from zeroadam.options import BLOCK_SIZE

__all__ = [
    "quantize_blocks",
    "dequantize_blocks",
    "quantized_all_gather",
    "quantized_reduce_scatter",
    "quantized_all_reduce",
    "padded",
]


def padded(n: int) -> int:
    """``n`` rounded up to whole blocks."""
    return -(-n // BLOCK_SIZE) * BLOCK_SIZE


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [padded(n)], scales fp32 [padded(n) / BLOCK_SIZE]) of a 1-D tensor; code = round(x / s * 127)
    with s the block's absolute maximum (a non-finite block gets scale NaN)."""
    n = x.numel()
    blocks = torch.zeros(padded(n), dtype=torch.float32, device=x.device)
    blocks[:n] = x
    blocks = blocks.view(-1, BLOCK_SIZE)
    scales = blocks.abs().amax(dim=1)
    scales = torch.where(torch.isfinite(scales), scales, torch.full_like(scales, float("nan")))
    inv = torch.where(scales > 0, 127.0 / scales, torch.zeros_like(scales))
    codes = torch.round(blocks * inv[:, None]).clamp_(-127, 127).nan_to_num_(0.0).to(torch.int8)
    return codes.view(-1), scales


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 [n] from ``quantize_blocks``' output."""
    values = codes.view(-1, BLOCK_SIZE).to(torch.float32) * (scales / 127.0)[:, None]
    return values.view(-1)[:n]


def _count(stats: Optional[CommStats], kind: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
    if stats is not None:
        stats.add(kind, codes)
        stats.add(kind + "_scales", scales)


def quantized_all_gather(group: Group, full: torch.Tensor, shard: torch.Tensor, stats: Optional[CommStats]) -> None:
    """``full`` (world equal shards, each a multiple of BLOCK_SIZE) = every rank's decoded shard (synchronous)."""
    n = shard.numel()
    assert n % BLOCK_SIZE == 0 and full.numel() == n * group.world
    codes, scales = quantize_blocks(shard)
    all_codes = torch.empty(n * group.world, dtype=torch.int8, device=shard.device)
    all_scales = torch.empty(scales.numel() * group.world, dtype=torch.float32, device=shard.device)
    _count(stats, "all_gather_int8", all_codes, all_scales)
    works = [
        all_gather_single(all_codes, codes, group=group.pg, async_op=True),
        all_gather_single(all_scales, scales, group=group.pg, async_op=True),
    ]
    for w in works:
        Pending(w, group, "quantized parameter all-gather").wait()
    full.copy_(dequantize_blocks(all_codes, all_scales, full.numel()))


def quantized_reduce_scatter(
    group: Group, out: torch.Tensor, full: torch.Tensor, ranges: Sequence[tuple[int, int]], stats: Optional[CommStats]
) -> None:
    """``out`` = the sum over ranks of their ``full[a:b]``, where (a, b) = ``ranges[this rank]`` (fp32, synchronous).

    ``ranges[r]`` is rank r's piece of ``full`` (empty pieces allowed; every rank passes the same ranges)."""
    w, me = group.world, group.rank
    sizes = [padded(b - a) for a, b in ranges]
    parts = [quantize_blocks(full[a:b]) if b > a else None for a, b in ranges]
    send_codes = torch.cat([p[0] for p in parts if p is not None] or [torch.empty(0, dtype=torch.int8)])
    send_scales = torch.cat([p[1] for p in parts if p is not None] or [torch.empty(0)])
    mine = sizes[me]
    recv_codes = torch.empty(mine * w, dtype=torch.int8, device=full.device)
    recv_scales = torch.empty(mine // BLOCK_SIZE * w, dtype=torch.float32, device=full.device)
    _count(stats, "all_to_all_int8", send_codes, send_scales)
    works = [
        dist.all_to_all_single(recv_codes, send_codes.to(full.device), [mine] * w, sizes, group=group.pg, async_op=True),
        dist.all_to_all_single(
            recv_scales, send_scales.to(full.device), [mine // BLOCK_SIZE] * w, [s // BLOCK_SIZE for s in sizes],
            group=group.pg, async_op=True,
        ),
    ]
    for work in works:
        Pending(work, group, "quantized gradient reduce-scatter").wait()
    n = ranges[me][1] - ranges[me][0]
    total = torch.zeros(n, dtype=torch.float32, device=full.device)
    nb = mine // BLOCK_SIZE
    for r in range(w):
        total += dequantize_blocks(recv_codes[r * mine : (r + 1) * mine], recv_scales[r * nb : (r + 1) * nb], n)
    out.copy_(total)


def quantized_all_reduce(group: Group, t: torch.Tensor, stats: Optional[CommStats]) -> None:
    """``t`` = the sum over ranks of ``t``, in place, through 8-bit pieces (see [Note: quantized collectives])."""
    w = group.world
    piece = padded(-(-t.numel() // w))
    flat = torch.zeros(piece * w, dtype=torch.float32, device=t.device)
    flat[: t.numel()] = t
    ranges = [(r * piece, (r + 1) * piece) for r in range(w)]
    summed = torch.empty(piece, dtype=torch.float32, device=t.device)
    quantized_reduce_scatter(group, summed, flat, ranges, stats)
    quantized_all_gather(group, flat, summed, stats)
    t.copy_(flat[: t.numel()])
