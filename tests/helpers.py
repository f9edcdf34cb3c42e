"""Helpers shared by the test modules: the relative error every parity check uses, and the small model and global
batches that most CPU tests train. tests/launch_train.py, which torchrun and accelerate launch as a script, imports
it too (the script's folder is on sys.path)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["rel_err", "max_rel_err", "make_model", "GLOBAL_BATCH", "batch", "force_host_copies", "moment_tensors"]

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| in the L2 norm, computed in float64 so that it measures the tensors, not
    the rounding of the norm; 0.0 exactly when they are equal."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm()).item()


def max_rel_err(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """The worst ``rel_err`` over matching tensors of two lists (parameters, usually)."""
    assert len(actual) == len(expected), (len(actual), len(expected))
    return max(rel_err(a, e) for a, e in zip(actual, expected))


def make_model(seed: int = 0) -> torch.nn.Module:
    """67 -> 97 -> 13 MLP. Its 67*97 = 6499 weights (int8 state when asked) and 97*13 = 1261 (always fp32) are not
    multiples of 256 or of the world size: shards end inside parameters, at other places on 2 and 3 ranks (on 3
    ranks one rank holds no bias at all), and blocks need padding."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(67, 97), torch.nn.Tanh(), torch.nn.Linear(97, 13))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` for ``make_model``, GLOBAL_BATCH rows; each rank takes its slice."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 67, generator=g), torch.randn(GLOBAL_BATCH, 13, generator=g)


def force_host_copies(chunk: int = 512) -> list[int]:
    """Make offload take its GPU path on CPU tensors, in this process (a spawned rank): every parameter shard gets
    a host copy, moved in chunks of ``chunk`` elements around the CPU update (zeroadam.engines.offload's
    HostParamCopies). Returns a list that then collects the element count of every shard moved."""
    from zeroadam.engines import offload

    offload.needs_host_copy = lambda device: True
    offload.HOST_CHUNK = chunk
    moved: list[int] = []
    update = offload.HostParamCopies.update

    def counted(self, shard, update_chunk):  # type: ignore[no-untyped-def]
        moved.append(shard.numel())
        update(self, shard, update_chunk)

    offload.HostParamCopies.update = counted
    return moved


def moment_tensors(entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) moment tensors of a state entry as stored: int8 codes live under exp_avg_codes /
    exp_avg_sq_codes, fp32 and bf16 values under exp_avg / exp_avg_sq ([Note: int8 keys] in formats/table.py)."""
    if "exp_avg_codes" in entry:
        return entry["exp_avg_codes"], entry["exp_avg_sq_codes"]
    return entry["exp_avg"], entry["exp_avg_sq"]
