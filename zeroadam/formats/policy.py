"""Which storage a parameter's state gets: the moment format, the master kind, and the rounding-index offsets.

Built once from the optimizer's options and handed to the engines, so that no engine reads the optimizer for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from zeroadam.formats.state import MasterKind
from zeroadam.layout import FlatLayout, group_spaces
from zeroadam.options import MIN_QUANT_NUMEL, MasterWeights, StateDtype

__all__ = ["FormatPolicy"]


@dataclass(frozen=True)
class FormatPolicy:
    state_dtype: StateDtype
    master_weights: MasterWeights

    def moment_format(self, numel: int) -> str:
        """"int8", "bf16" or "fp32": small tensors (under MIN_QUANT_NUMEL elements) always keep fp32 moments."""
        return self.state_dtype if numel >= MIN_QUANT_NUMEL else "fp32"

    def format_of(self, p: torch.Tensor) -> str:
        return self.moment_format(p.numel())

    def master_kind(self, p: torch.Tensor) -> MasterKind:
        """fp32 parameters are their own master; 16-bit ones get what ``master_weights`` asks ("auto": compact)."""
        if p.dtype == torch.float32:
            return "param"
        mw = self.master_weights
        return "compact" if mw == "auto" else mw  # type: ignore[return-value]

    def layout_offsets(self, params: Sequence[torch.Tensor]) -> dict[torch.Tensor, int]:
        """Each parameter's start in its space's block-aligned layout (the rounding hash index): the positions the
        sharded stages use, so stochastic rounding draws identical bits in every stage."""
        out = {}
        for space in group_spaces(params, self.format_of).values():
            for slot, p in zip(FlatLayout.build(space, 1).slots, space):
                out[p] = slot.start
        return out
