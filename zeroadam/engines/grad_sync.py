"""Who averages the gradients of ZeRO stages 1 and 2: ZeroAdam's own collectives, or a DDP wrapper of the model.

[Note: gradients averaged by a wrapper]
Accelerate and the HF Trainer wrap every prepared model in ``DistributedDataParallel`` when several processes train,
and DDP's backward all-reduces each gradient into ``p.grad``. A ZeroAdam that reduced them again would move every
gradient twice; worse, stage 2's post-accumulate-grad hooks run before DDP's and would take each ``p.grad`` away
before DDP sees it (DDP then averages zeros and writes them back). With ``gradient_sync="wrapper"`` ZeroAdam leaves
``p.grad`` to the wrapper and, at ``step()``, copies its own shard of it without communicating: the state is still
sharded and the parameters are still all-gathered, but stage 2 keeps full gradients like stage 1 (DDP holds them
anyway). ``"auto"`` decides at the first backward (or step): "wrapper" when a ``DistributedDataParallel`` forward
ran over any of the optimizer's parameters since it was built (``DDPWatch``: whoever made the wrapper, Accelerate,
Lightning Fabric or the script itself), or when a framework registered by an integration (Accelerate, on import of
``zeroadam.integrations.accelerate``) says it wraps prepared models in DDP;
else "optimizer". ``zeroadam.integrations.accelerate.ZeroAccelerator`` keeps models unwrapped and sets
"optimizer", which brings back stage 2's gradient memory savings.

A wrong guess would silently step each shard with one rank's gradients, so every step in "wrapper" mode first checks
that ``p.grad`` is the same on every rank: one all-reduce (MAX) of (s1, s2, -s1, -s2), where s1 and s2 are the sum
and the sum of squares of all local gradients. DDP's averages are bitwise identical on every rank and the sums are
computed by the same code on the same kind of device, so DDP always passes. Gradients that differ are reduced by
ZeroAdam instead, which is correct at the usual cost, and a warning (once) names the likely cause.
"""
from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Optional

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from zeroadam.comm.collectives import CommStats, Group

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.engines.flat import FlatSpace

__all__ = [
    "ResolvedSync",
    "DDPWatch",
    "wrapper_averages_gradients",
    "replicated",
    "copy_local_shards",
    "warn_not_replicated",
]

ResolvedSync = Literal["optimizer", "wrapper"]


class DDPWatch:
    """Notices a ``DistributedDataParallel`` forward over any of the given parameters, through a global module
    forward pre-hook (DDP's own ``__call__`` runs it) that stays until ``close()``, or until the watch is collected:
    about a microsecond per module call, paid only until ``"auto"`` is decided."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self._params = set(params)
        self.seen = False
        ref = weakref.ref(self)

        def hook(module: torch.nn.Module, args: Any) -> None:
            watch = ref()
            if watch is not None:
                watch._on_forward(module)

        # The hook holds the watch weakly, so an optimizer dropped before its first backward takes the hook along.
        self._handle: Optional[RemovableHandle] = register_module_forward_pre_hook(hook)
        self._finalizer = weakref.finalize(self, self._handle.remove)

    def _on_forward(self, module: torch.nn.Module) -> None:
        if isinstance(module, DistributedDataParallel) and any(p in self._params for p in module.module.parameters()):
            self.seen = True
            self.close()

    def close(self) -> None:
        self._finalizer()  # removes the hook, once


_WRAPPER_DETECTORS: list[Callable[[], bool]] = []


def register_wrapper_detector(detector: Callable[[], bool]) -> None:
    """Add a test for "this process runs under a framework that wraps prepared models in DistributedDataParallel".
    Integrations register theirs when imported (``zeroadam.integrations.accelerate`` does), so the core never
    imports them."""
    if detector not in _WRAPPER_DETECTORS:
        _WRAPPER_DETECTORS.append(detector)


def wrapper_averages_gradients() -> bool:
    """Whether a registered framework wraps prepared models in DistributedDataParallel."""
    return any(detect() for detect in _WRAPPER_DETECTORS)


def replicated(group: Group, spaces: list["FlatSpace"], stats: CommStats) -> bool:
    """Whether every rank holds the same ``p.grad`` for every parameter of ``spaces`` (collective).

    Compares the fp64 sums of the gradients and of their squares across ranks (see [Note: gradients averaged by a
    wrapper]); a missing gradient counts as zeros."""
    dev = spaces[0].flat.device
    s1 = torch.zeros((), dtype=torch.float64, device=dev)
    s2 = torch.zeros((), dtype=torch.float64, device=dev)
    for sp in spaces:
        for p in sp.params:
            if p.grad is None:
                continue
            g = p.grad.detach().reshape(-1)
            s1 += g.sum(dtype=torch.float32).to(torch.float64)
            s2 += torch.dot(g.float(), g.float()).to(torch.float64)
    # An all-reduce of MAX over (s, -s) gives (max, -min): equal exactly when every rank has the same sums.
    # NaN compares unequal to itself; it means non-finite gradients, which the step skips anyway.
    t = torch.stack([s1, s2, -s1, -s2])
    if group.world > 1:
        stats.add("all_reduce", t)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group.pg)
    mx, neg_mn = t[:2], t[2:]
    same = bool(torch.equal(mx, -neg_mn))
    return same or not bool(torch.isfinite(t).all())


def copy_local_shards(spaces: list["FlatSpace"], rank: int) -> None:
    """Add this rank's part of every ``p.grad`` (already averaged by the wrapper) into the gradient shards."""
    for sp in spaces:
        grads = {slot.index: p.grad for p, slot in zip(sp.params, sp.layout.slots)}
        for slot, a, b in sp.layout.local_slots(rank):
            g = grads[slot.index]
            if g is None:
                continue
            sp.sink.add(a - sp.lo, g.detach().reshape(-1).narrow(0, a - slot.start, b - a), 1.0)
        sp.sink.drain()


def warn_not_replicated() -> None:
    warnings.warn(
        "ZeroAdam(gradient_sync='wrapper'): p.grad differs between ranks, so no DistributedDataParallel wrapper "
        "averaged it; ZeroAdam averages the gradients itself (correct, with its own communication). Wrap the model "
        "with accelerator.prepare(model) (DDP), or pass gradient_sync='optimizer' (or use "
        "zeroadam.integrations.accelerate.ZeroAccelerator) for an unwrapped model. This warning is shown once.",
        RuntimeWarning,
        stacklevel=5,
    )
