"""CPU offload: host buffers for a shard's gradients and parameters, and the copies between device and host.

The shard's moments, master weights and fp32 gradient shard live in host memory (pinned when a GPU is present,
allocated once); the fused CPU kernel updates them. Gradient pieces arrive on the device as buckets are reduced;
``HostGradSink`` copies each one to the host on a side stream while backward goes on, and adds it into the host
shard once the copy has landed (at the end of the backward pass). On a machine without a GPU the same pipeline
runs with CPU tensors and the copies are plain additions, which is what CI checks.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _compat

__all__ = ["HostGradSink", "host_buffer"]


def host_buffer(numel: int, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """A zeroed host buffer, pinned when asked and possible (pinning needs a CUDA runtime)."""
    return torch.zeros(numel, dtype=dtype, pin_memory=pin and _compat.pin_memory_available())


class HostGradSink:
    """Accumulates device gradient pieces into a host fp32 shard with asynchronous device-to-host copies."""

    def __init__(self, shard: torch.Tensor, device: torch.device) -> None:
        self.shard = shard  # 1D [n] fp32 on the host: the gradient shard the update reads
        self.device = device
        self._staging: Optional[torch.Tensor] = None
        self._stream = None
        if device.type == "cuda":
            self._staging = host_buffer(shard.numel(), torch.float32, pin=True)
            self._stream = torch.cuda.Stream(device)
        self._pending: list[tuple[int, int, float]] = []

    def add(self, start: int, piece: torch.Tensor, alpha: float) -> None:
        """shard[start : start + len(piece)] += alpha * piece, possibly after the copy lands."""
        n = piece.numel()
        if self._stream is None:
            self.shard.narrow(0, start, n).add_(piece.to(self.shard.device), alpha=alpha)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._staging.narrow(0, start, n).copy_(piece, non_blocking=True)
        piece.record_stream(self._stream)  # the bucket buffer may be freed before the copy ends
        self._pending.append((start, n, alpha))

    def drain(self) -> None:
        """Wait for the copies in flight and add them into the shard."""
        if not self._pending:
            return
        self._stream.synchronize()
        for start, n, alpha in self._pending:
            self.shard.narrow(0, start, n).add_(self._staging.narrow(0, start, n), alpha=alpha)
        self._pending.clear()
