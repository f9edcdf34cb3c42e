"""Sizing rules: how many elements and bytes each buffer of the engines holds, as pure functions of counts.

The engines size their buffers with these functions and ``zeroadam.tools.memory`` predicts with the same ones, so
the estimate cannot drift from the implementation again (it did: after the in-place all-gather and the reusable
stage-1 staging buffer the estimator still budgeted a full fp32 copy of the gradients). Nothing here allocates or
imports torch; tests/test_memory.py checks these numbers against what a 2-rank run holds.

[Note: communication buffers]
What one rank holds beyond its parameters, gradients and optimizer state, by stage:

* stage 1: one fp32 staging buffer, kept between steps, for the chunked reduce-scatter at ``step()``
  (``ZeroEngine._reduce_stage1``): ``world`` chunks of the gradients to scatter plus the chunk this rank receives.
  A chunk covers the same slice of every rank's shard, ``world * chunk <= bucket_size`` (one block at least), so
  the buffer is about ``bucket_size`` elements, not a copy of the gradients. The all-gather after the update is
  in place (the shard is a slice of the flat buffer), with no buffer at all.
* stage 2: fp32 gradient buckets (``buckets.py``), each a contiguous range of a flat buffer that closes once it
  covers ``bucket_size`` elements, so a bucket is ``bucket_size`` plus up to one tensor. Launching a bucket waits
  for the previous one and frees it: ``BUCKETS_IN_FLIGHT`` consecutive buckets are alive (one reducing, one
  filling), and a bucket of another space (the small tensors with fp32 moments, spread over the whole model)
  fills for the whole backward pass next to them.
* stage 3 (``sharding/model.py``): the root unit stays gathered from its forward to the end of backward, with
  its fp32 gradient buffer, which fills from the first gradient (the output head) to the last (the embedding);
  of the other units the one in use and ``prefetch`` more are gathered, and one fp32 gradient buffer fills at a
  time (the reduce-scatter of a complete unit is synchronous). With ``offload_params`` each gather also copies the
  unit's host shard into a device staging shard that lives until the gather is waited for: the prefetched units'
  staging shards (``stage3_staging_bytes``) come on top.
"""
from __future__ import annotations

from typing import Literal, Sequence

from zeroadam.options import BLOCK_SIZE

__all__ = [
    "GRAD_BYTES",
    "BUCKETS_IN_FLIGHT",
    "DEFAULT_PREFETCH",
    "MASTER_BYTES",
    "padded",
    "shard_numel",
    "num_blocks",
    "moment_bytes",
    "master_bytes",
    "grad_shard_bytes",
    "stage1_chunk",
    "stage1_staging_numel",
    "bucket_extents",
    "stage2_peak_bucket_numel",
    "stage3_peak_buffer_bytes",
    "stage3_staging_bytes",
]

MomentFormat = Literal["int8", "bf16", "fp32"]
MasterKind = Literal["param", "fp32", "compact", "none"]

GRAD_BYTES = 4
"""Bytes of a gradient element the optimizer reads by default (``grad_dtype="fp32"``) whatever the parameters:
shards, buckets, staging and stage-3 buffers; ``grad_dtype="bf16"`` makes every one of them 2."""
BUCKETS_IN_FLIGHT = 2
"""Consecutive stage-2 buckets alive at once: the one being reduced and the one filling."""
DEFAULT_PREFETCH = 1
"""Stage-3 units gathered ahead of the one in use (``shard_model(prefetch=...)``)."""

# Bytes per element of one moment in each format; int8 adds one fp32 scale per started block.
_MOMENT_BYTES: dict[str, int] = {"int8": 1, "bf16": 2, "fp32": 4}
_SCALE_BYTES = 4
MASTER_BYTES: dict[str, int] = {"param": 0, "fp32": 4, "compact": 1, "none": 0}
"""Master-weight bytes per element by kind: "param" is an fp32 parameter (its own master), "compact" an int8
residual of a 16-bit parameter, "none" a 16-bit parameter rounded stochastically."""


def padded(numel: int) -> int:
    """numel rounded up to whole quantization blocks: every parameter starts a block in its flat buffer."""
    return -(-numel // BLOCK_SIZE) * BLOCK_SIZE


def shard_numel(padded_total: int, world: int) -> int:
    """Elements of each rank's shard of a flat buffer of ``padded_total`` elements: whole blocks, one at least,
    the same on every rank (the flat buffer is ``world`` times this)."""
    return max(-(-padded_total // (BLOCK_SIZE * world)), 1) * BLOCK_SIZE


def num_blocks(numel: int) -> int:
    """Quantization blocks of a run of ``numel`` elements (the last may be partial): one int8 scale each."""
    return -(-numel // BLOCK_SIZE)


def moment_bytes(fmt: MomentFormat, numel: int) -> int:
    """exp_avg + exp_avg_sq of one run of ``numel`` elements, scales included (``Moments.zeros``)."""
    out = 2 * _MOMENT_BYTES[fmt] * numel
    if fmt == "int8":
        out += 2 * _SCALE_BYTES * num_blocks(numel)
    return out


def master_bytes(kind: MasterKind, numel: int) -> int:
    """Master weights of one run (``Master.create``)."""
    return MASTER_BYTES[kind] * numel


def grad_shard_bytes(shard: int, grad_bytes: int = GRAD_BYTES) -> int:
    """The gradient shard of ``shard`` elements that the update reads (stages 1-3): fp32, or 2 bytes with
    ``grad_dtype="bf16"``."""
    return grad_bytes * shard


def stage1_chunk(bucket_size: int, world: int, shard: int) -> int:
    """Elements of every rank's shard covered by one stage-1 reduce-scatter: ``world * chunk <= bucket_size``
    in whole blocks (one block at least), never more than the shard."""
    return min(shard, max(BLOCK_SIZE, bucket_size // world // BLOCK_SIZE * BLOCK_SIZE))


def stage1_staging_numel(bucket_size: int, world: int, shard: int) -> int:
    """The stage-1 staging buffer: ``world`` chunks to reduce-scatter and the chunk this rank receives."""
    return (world + 1) * stage1_chunk(bucket_size, world, shard)


def bucket_extents(numels: Sequence[int], bucket_size: int) -> list[int]:
    """Buffer elements of each stage-2 bucket of one space whose tensors have these sizes, in layout order.

    Buckets fill from the end of the layout and close once their tensors reach ``bucket_size`` elements; a
    bucket spans from its first tensor's start to its last tensor's end, so it holds the block padding of every
    member but the last. Returned in fill order (the last tensors' bucket first)."""
    extents, run, size = [], 0, 0
    last = None  # the member with the highest start: its padding is outside the bucket
    for n in reversed(numels):
        if last is None:
            last = n
        run += padded(n)
        size += n
        if size >= bucket_size:
            extents.append(run - (padded(last) - last))
            run, size, last = 0, 0, None
    if last is not None:
        extents.append(run - (padded(last) - last))
    return extents


def stage2_peak_bucket_numel(spaces: Sequence[Sequence[int]], bucket_size: int) -> int:
    """Most bucket elements alive at once for spaces with these tensor sizes (see [Note: communication
    buffers]): ``BUCKETS_IN_FLIGHT`` consecutive buckets of the space with most, and the largest bucket of each
    other space, which fills alongside."""
    per_space = []
    for numels in spaces:
        e = bucket_extents(numels, bucket_size)
        k = min(BUCKETS_IN_FLIGHT, len(e))
        in_flight = max((sum(e[i : i + k]) for i in range(len(e) - k + 1)), default=0)
        per_space.append((in_flight, max(e, default=0)))
    if not per_space:
        return 0
    main = max(range(len(per_space)), key=lambda i: per_space[i][0])
    return per_space[main][0] + sum(largest for i, (_, largest) in enumerate(per_space) if i != main)


def stage3_peak_buffer_bytes(
    root_total: int, unit_total: int, units: int, param_bytes: int, grad_bytes: int = GRAD_BYTES,
    prefetch: int = DEFAULT_PREFETCH,
) -> int:
    """Most bytes of gathered parameters and fp32 gradient buffers at once at stage 3, during backward (see [Note:
    communication buffers]); ``root_total`` and ``unit_total`` are flat-buffer lengths (``world * shard``) of the
    root and of one of ``units`` identical blocks. Not counted: the fp32 shard each reduce-scatter receives
    (1 / world of one gradient buffer, for the length of the collective)."""
    gathered = min(units, 1 + prefetch)
    root = (param_bytes + grad_bytes) * root_total
    blocks = gathered * param_bytes * unit_total + (grad_bytes * unit_total if units else 0)
    return root + blocks


def stage3_staging_bytes(unit_total: int, world: int, param_bytes: int, prefetch: int = DEFAULT_PREFETCH) -> int:
    """Device staging shards of offloaded parameters alive at once (``shard_model(offload_params=True)``): one per
    unit gathered ahead of use (one at least: the unit being gathered), each 1 / ``world`` of a flat buffer of
    ``unit_total`` elements; none on one rank, where the host shard is copied straight into the full buffer."""
    if world == 1:
        return 0
    return max(prefetch, 1) * param_bytes * (unit_total // world)
