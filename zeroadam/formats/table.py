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
    field: str  # the attribute of Moments / Master that holds it
    key: str  # the state-dict key: see [Note: int8 keys]
    dtype: torch.dtype
    per_block: bool = False  # one value per 256-element block (int8 scales) instead of one per element

    def numel(self, n: int) -> int:
        """How many values a run of ``n`` elements stores."""
        return num_blocks(n) if self.per_block else n


# [Note: int8 keys]
# fp32 and bf16 moments keep torch.optim.AdamW's keys, exp_avg / exp_avg_sq: AdamW loads them as the values they
# are (bf16 cast to the parameter's dtype). int8 codes are not values: under those keys a stock AdamW would load
# them, cast them to float and train on numbers up to 127 and 255 without a word. So the codes are stored as
# exp_avg_codes / exp_avg_sq_codes (beside their block scales): AdamW then finds no exp_avg in a non-empty state
# and fails on its first step with a KeyError, and `zeroadam consolidate` converts the state for it. State dicts
# saved before this change (codes under exp_avg) still load: see state_dict/entries.py migrate_entry. Checkpoint
# directories keep their on-disk names (checkpoint/format.py).
MOMENT_TENSORS: dict[str, tuple[StateTensor, ...]] = {
    "fp32": (StateTensor("exp_avg", "exp_avg", torch.float32), StateTensor("exp_avg_sq", "exp_avg_sq", torch.float32)),
    "bf16": (
        StateTensor("exp_avg", "exp_avg", torch.bfloat16),
        StateTensor("exp_avg_sq", "exp_avg_sq", torch.bfloat16),
    ),
    "int8": (
        StateTensor("exp_avg", "exp_avg_codes", torch.int8),  # signed codes
        StateTensor("exp_avg_sq", "exp_avg_sq_codes", torch.uint8),  # unsigned codes
        StateTensor("exp_avg_scale", "exp_avg_scale", torch.float32, per_block=True),  # absmax of each block
        StateTensor("exp_avg_sq_scale", "exp_avg_sq_scale", torch.float32, per_block=True),
    ),
}
"""Moment format -> its tensors, in the order of ``Moments``' fields."""

MASTER_TENSORS: dict[str, tuple[StateTensor, ...]] = {
    "param": (),  # an fp32 parameter is its own master
    "none": (),  # 16-bit parameter, stochastic rounding, nothing stored
    "fp32": (StateTensor("fp32", "master", torch.float32),),
    "compact": (StateTensor("residual", "master_residual", torch.int8),),  # rounding error in units of ulp / 254
}
"""Master kind -> its tensors."""


def moment_format_of(entry: dict) -> Optional[str]:
    """The moment format of a state entry (by its first moment's key and dtype), or None."""
    for fmt, tensors in MOMENT_TENSORS.items():
        first = entry.get(tensors[0].key)
        if isinstance(first, torch.Tensor) and first.dtype == tensors[0].dtype:
            return fmt
    return None


def key_dtypes(moments: str, master: str) -> dict[str, torch.dtype]:
    """State-dict key -> dtype of the tensors of one parameter's state."""
    return {t.key: t.dtype for t in (*MOMENT_TENSORS[moments], *MASTER_TENSORS[master])}


def expected(moments: str, master: str, n: int) -> dict[str, tuple[int, torch.dtype]]:
    """State-dict key -> (numel, dtype) of the state of a run of ``n`` elements."""
    return {t.key: (t.numel(n), t.dtype) for t in (*MOMENT_TENSORS[moments], *MASTER_TENSORS[master])}
