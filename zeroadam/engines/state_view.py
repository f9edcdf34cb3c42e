"""``optimizer.state[p]`` for the sharded engines (stages 1-3, offload, FSDP2): live views of the state this rank holds.

Tools walk ``optimizer.state`` as a mapping of parameters to dicts of tensors, as ``torch.optim.AdamW`` keeps it
(Lightning's ``optimizer_to_device``, loggers, torch's ``get_optimizer_state_dict``, which steps an optimizer whose
``state`` is empty to create its state). ``FlatEngine`` and ``Zero3Engine`` keep their state in flat shards, and
``DTensorEngine`` in pieces of each local shard, so ``optimizer.state[p]`` is a ``ShardState``: for a parameter of
which this rank holds elements [start, end) of its flattened value, its keys are those of the state dict — ``step``
and ``exp_avg`` / ``exp_avg_sq`` (fp32, bf16), or ``exp_avg_codes`` / ``exp_avg_sq_codes`` with ``exp_avg_scale`` /
``exp_avg_sq_scale`` (int8), and ``master`` / ``master_residual`` for 16-bit parameters — each a 1D view of the
engine's buffers.

[Note: state views]
- Only elements [start, end) are there (``ShardState.elements``), so the tensors are 1D, not shaped like the
  parameter. start lies on a 256-element block of the parameter and end on a block boundary or at the parameter's
  end (see [Note: block-aligned layout]): the int8 scales of the view are exactly those of its blocks, one per
  block, which no other rank holds. FSDP2 (DTensor parameters) cuts rows, possibly inside a block: there the scales
  are those of every block [start, end) touches, a cut block's on both ranks (see [Note: blocks across shard
  boundaries] in engines/dtensor.py).
- A parameter this rank holds nothing of, or whose state has not been created (no step, nothing loaded), is absent,
  as in AdamW before its first step.
- Writing into a view writes the state. Assigning a key copies the value into ZeroAdam's buffer (same dtype and
  number of elements, any device): the state stays where ZeroAdam keeps it, so ``st[k] = st[k].to(device)`` keeps
  it whatever the device. ``step`` is a copy of the engine's count (a sharded param group steps together), so it
  can only be assigned its own value. Keys cannot be deleted.
"""
from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from zeroadam.formats.state import Master, Moments

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.engines.base import Engine

__all__ = ["LocalState", "ShardState", "publish"]


class _Stepped(Protocol):
    step: int  # the engine's step count for this state (a FlatSpace or a stage-3 Piece)


@dataclass(frozen=True)
class LocalState:
    """What a sharded engine holds of one parameter: elements [start, end) of its flattened value."""

    holder: _Stepped  # whose ``step`` counts this state's steps
    start: int  # a block boundary of the parameter (FSDP2: where its shard begins)
    end: int
    moments: Moments  # views of the engine's buffers: [end - start] elements, the scales of the blocks it touches
    master: Master  # views, [end - start]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.moments.tensors(), **self.master.tensors()}


_FIX = "change the state through optimizer.load_state_dict, or zeroadam.checkpoint.load"


class ShardState(MutableMapping):
    """``optimizer.state[p]`` of a sharded or DTensor engine: see [Note: state views]."""

    def __init__(self, local: LocalState) -> None:
        self._local = local

    @property
    def elements(self) -> tuple[int, int]:
        """The elements [start, end) of the flattened parameter that this rank holds and the tensors cover."""
        return self._local.start, self._local.end

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "step":
            return torch.tensor(float(self._local.holder.step))  # as AdamW's: a float tensor
        return self._local.tensors()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "step":
            one = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
            if not one or float(value) != float(self._local.holder.step):
                raise ValueError(
                    f"ZeroAdam: optimizer.state[p]['step'] = {value!r}: ZeroAdam keeps the step count itself (step "
                    f"{self._local.holder.step}; a sharded param group steps together), so it cannot be set here; "
                    f"{_FIX}"
                )
            return
        tensors = self._local.tensors()
        if key not in tensors:
            raise KeyError(f"ZeroAdam: no state {key!r} for this parameter; its keys are {list(self)}")
        t = tensors[key]
        if value is t:
            return  # what moving a state to the device it is on hands back
        if not isinstance(value, torch.Tensor) or value.dtype != t.dtype or value.numel() != t.numel():
            got = type(value).__name__
            if isinstance(value, torch.Tensor):
                got = f"a {value.dtype} tensor of {value.numel()} elements"
            raise ValueError(
                f"ZeroAdam: optimizer.state[p][{key!r}] must stay a {t.dtype} tensor of {t.numel()} elements (this "
                f"rank's elements {self.elements} of the parameter), got {got}; its values are copied into ZeroAdam's "
                "buffer, which stays where ZeroAdam keeps it"
            )
        with torch.no_grad():
            t.copy_(value.reshape(-1))

    def __delitem__(self, key: str) -> None:
        raise TypeError(
            f"ZeroAdam: optimizer.state[p][{key!r}] cannot be deleted: the state lives in ZeroAdam's shards; {_FIX}"
        )

    def __iter__(self) -> Iterator[str]:
        return iter(["step", *self._local.tensors()])

    def __len__(self) -> int:
        return 1 + len(self._local.tensors())

    def __reduce__(self) -> Any:
        # A copy (copy.deepcopy, pickle) is a plain dict of the values: views of shards cannot travel.
        return (dict, (dict(self),))

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}: {tuple(t.shape)} {t.dtype}" for k, t in self._local.tensors().items())
        return f"ShardState(step={self._local.holder.step}, elements={self.elements}, {keys})"


def publish(engine: "Engine", state: dict[Any, Any]) -> None:
    """Make ``state`` (the optimizer's) hold a ``ShardState`` for every parameter of which ``engine`` holds a part
    with state, and none for the others; a no-op for engines that keep their own entries there (``local_states``
    returns None). Called after the first step and after a load: the views stay valid until the engine replaces its
    buffers, which only a load does."""
    views = engine.local_states()
    if views is None:
        return
    for p in [p for p, st in state.items() if isinstance(st, ShardState)]:
        del state[p]
    for p, local in views.items():
        if local.holder.step > 0:
            state[p] = ShardState(local)
