"""Engines: what holds an optimizer's state and performs its step (see ``zeroadam.engines.base``)."""
from __future__ import annotations

from typing import Any, Optional

from zeroadam import _compat
from zeroadam.comm.collectives import Group
from zeroadam.engines.base import Engine, EngineSetup

__all__ = ["Engine", "EngineSetup", "build"]


def build(setup: EngineSetup, process_group: Optional[Any]) -> Engine:
    """The engine for these parameters and options:

    * DTensor parameters (FSDP2's ``fully_shard``) → ``DTensorEngine`` (stage 0 over the local shards);
    * ``stage=3`` → ``Zero3Engine`` (the parameters must come from ``zeroadam.shard_model``);
    * ``stage`` 1-2 on more than one rank, or any stage with ``offload`` → ``FlatEngine`` (offload alone keeps
      the whole state on every rank);
    * otherwise → ``LocalEngine`` (on one rank stages 1-2 are the same computation as stage 0).
    """
    o = setup.options
    _check_release_grads(setup)
    if any(_compat.is_dtensor(p) for p in setup.params()):
        from zeroadam.engines.dtensor import DTensorEngine

        return DTensorEngine.create(setup)
    if o.stage == 3:
        from zeroadam.engines.zero3 import Zero3Engine

        return Zero3Engine.create(setup, process_group)
    if o.stage >= 1 or o.offload is not None:
        group = Group.resolve(process_group) if o.stage >= 1 else Group(None, 0, 1)
        if group.world > 1 or o.offload is not None:
            from zeroadam.engines.flat import FlatEngine

            return FlatEngine(setup, group)
    if o.release_grads:
        from zeroadam.engines.local_release import ReleasedLocalEngine

        return ReleasedLocalEngine(setup)
    from zeroadam.engines.local import LocalEngine

    return LocalEngine(setup)


RELEASE_GRADS_STAGES: tuple[int, ...] = (0, 2, 3)
"""Stages whose engines update inside backward (``release_grads=True``)."""


def _check_release_grads(setup: EngineSetup) -> None:
    o = setup.options
    if not o.release_grads:
        return
    dtensor = any(_compat.is_dtensor(p) for p in setup.params())
    if o.stage not in RELEASE_GRADS_STAGES or o.offload is not None or dtensor:
        where = f"stage={o.stage}" + (f", offload={o.offload!r}" if o.offload else "")
        raise ValueError(
            f"ZeroAdam: release_grads=True is not supported with {where}"
            + ("" if not RELEASE_GRADS_STAGES else f" (supported: stage in {RELEASE_GRADS_STAGES}, without offload)")
            + "; use release_grads=False"
        )
