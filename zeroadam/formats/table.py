"""The one table of storage formats: which tensors each moment format and master kind stores, under which
state-dict key, in which dtype, and how many elements for a run of n.

Every place that builds, validates, converts, checks or reads state takes its shapes from here: ``Moments`` and
``Master`` (zeroadam/formats/state.py), state-dict validation (zeroadam/state_dict/entries.py), the kernels' argument
checks, the checkpoint reader and DTensor entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from zeroadam.formats.quant import num_blocks

__all__ = ["StateTensor", "MOMENT_TENSORS", "MASTER_TENSORS", "moment_format_of", "key_dtypes", "expected"]


@dataclass(frozen=True)
class StateTensor:
    key: str  # the state-dict key (standard names: exp_avg / exp_avg_sq, whatever the format)
    dtype: torch.dtype
    per_block: bool = False  # one value per 256-element block (int8 scales) instead of one per element

    def numel(self, n: int) -> int:
        """How many values a run of ``n`` elements stores."""
        return num_blocks(n) if self.per_block else n


MOMENT_TENSORS: dict[str, tuple[StateTensor, ...]] = {
    "fp32": (StateTensor("exp_avg", torch.float32), StateTensor("exp_avg_sq", torch.float32)),
    "bf16": (StateTensor("exp_avg", torch.bfloat16), StateTensor("exp_avg_sq", torch.bfloat16)),
    "int8": (
        StateTensor("exp_avg", torch.int8),  # signed codes
        StateTensor("exp_avg_sq", torch.uint8),  # unsigned codes
        StateTensor("exp_avg_scale", torch.float32, per_block=True),  # absmax of each block
        StateTensor("exp_avg_sq_scale", torch.float32, per_block=True),
    ),
}
"""Moment format -> its tensors, in the order of ``Moments``' fields."""

MASTER_TENSORS: dict[str, tuple[StateTensor, ...]] = {
    "param": (),  # an fp32 parameter is its own master
    "none": (),  # 16-bit parameter, stochastic rounding, nothing stored
    "fp32": (StateTensor("master", torch.float32),),
    "compact": (StateTensor("master_residual", torch.int8),),  # rounding error in units of ulp / 254
}
"""Master kind -> its tensors."""


def moment_format_of(exp_avg_dtype: torch.dtype) -> Optional[str]:
    """The moment format whose exp_avg has this dtype (each has its own), or None."""
    for fmt, tensors in MOMENT_TENSORS.items():
        if tensors[0].dtype == exp_avg_dtype:
            return fmt
    return None


def key_dtypes(moments: str, master: str) -> dict[str, torch.dtype]:
    """State-dict key -> dtype of the tensors of one parameter's state."""
    return {t.key: t.dtype for t in (*MOMENT_TENSORS[moments], *MASTER_TENSORS[master])}


def expected(moments: str, master: str, n: int) -> dict[str, tuple[int, torch.dtype]]:
    """State-dict key -> (numel, dtype) of the state of a run of ``n`` elements."""
    return {t.key: (t.numel(n), t.dtype) for t in (*MOMENT_TENSORS[moments], *MASTER_TENSORS[master])}
