"""Launch helpers shared by the Triton kernels: tile sizes, grids, argument checks.

[Note: tiles under the interpreter]
Under ``TRITON_INTERPRET=1`` every program of the grid is a Python loop iteration that runs each ``tl`` operation
as one numpy call, so the cost is (programs x operations) and hardly depends on the tile size. One bf16-moment
launch over 16384 elements took 0.83 s of CPU as 16 programs of 1024, 0.17 s as 4 of 4096, 0.056 s as one of
16384. The interpreter therefore gets large tiles; a GPU gets small ones, so that a shard fills every SM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from zeroadam import _compat
from zeroadam.options import BLOCK_SIZE

__all__ = ["Tile", "elementwise_tile", "block_tile", "launch_options", "check_flat"]

# GPU tiles: 1024 elements (4 warps x 32 threads x 8 elements) per program. A heuristic for a memory-bound
# elementwise kernel, not yet measured on a GPU.
_GPU_TILE = 1024
_GPU_WARPS = 4
# Interpreter tile: see [Note: tiles under the interpreter]. Runs up to 16384 elements take one program.
_INTERPRET_TILE = 16384


@dataclass(frozen=True)
class Tile:
    """How one launch covers a run."""

    size: int  # elements per program; a power of two (a multiple of BLOCK_SIZE for block tiles)
    programs: int  # grid size along axis 0
    num_warps: int

    @property
    def rows(self) -> int:
        """Quantization blocks per program (block tiles only)."""
        return self.size // BLOCK_SIZE


def _tile_limit() -> int:
    return _INTERPRET_TILE if _compat.triton_interpret() else _GPU_TILE


def elementwise_tile(numel: int) -> Tile:
    """A 1D tile for kernels whose elements are independent."""
    limit = _tile_limit()
    # The interpreter shrinks the tile for tiny runs (no recompilation to fear there); a GPU keeps one size.
    size = min(limit, triton.next_power_of_2(max(numel, 1))) if _compat.triton_interpret() else limit
    return Tile(size=size, programs=triton.cdiv(numel, size), num_warps=_GPU_WARPS)


def block_tile(numel: int) -> Tile:
    """A tile of whole BLOCK_SIZE-element quantization blocks, so one program can reduce each block's absmax."""
    blocks = triton.cdiv(numel, BLOCK_SIZE)
    max_rows = max(_tile_limit() // BLOCK_SIZE, 1)
    rows = min(max_rows, triton.next_power_of_2(max(blocks, 1))) if _compat.triton_interpret() else max_rows
    return Tile(size=rows * BLOCK_SIZE, programs=triton.cdiv(blocks, rows), num_warps=_GPU_WARPS)


def launch_options(tile: Tile) -> dict[str, object]:
    """Compile options for a launch (the interpreter ignores them).

    fp fusion is off so that LLVM does not contract a separate multiply and add into an fma: the reference rounds
    after each torch op, and the kernels spell out with ``tl.fma`` exactly the fmas that torch's kernels use.
    """
    return {"num_warps": tile.num_warps, "enable_fp_fusion": False}


def check_flat(name: str, t: torch.Tensor, numel: int, dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    """Raise ValueError unless t is a contiguous 1D tensor of numel elements, of an allowed dtype, on device."""
    if t.dim() != 1 or t.numel() != numel or not t.is_contiguous():
        raise ValueError(
            f"zeroadam Triton update: {name} must be a contiguous 1D tensor of {numel} elements, "
            f"got shape {tuple(t.shape)} with strides {t.stride()}"
        )
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"zeroadam Triton update: {name} has dtype {t.dtype}; expected one of {allowed}")
    if t.device != device:
        raise ValueError(f"zeroadam Triton update: {name} is on {t.device}, the parameter on {device}")
