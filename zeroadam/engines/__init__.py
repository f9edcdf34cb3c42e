"""Engines: what holds an optimizer's state and performs its step (see ``zeroadam.engines.base``)."""
from __future__ import annotations

from typing import Any, Optional

from zeroadam import _compat
from zeroadam.comm.collectives import Group
from zeroadam.comm.mesh import Topology, resolve_topology
from zeroadam.engines.base import Engine, EngineSetup

__all__ = ["Engine", "EngineSetup", "build"]


def build(setup: EngineSetup, process_group: Optional[Any], mesh: Optional[Any] = None) -> Engine:
    """The engine for these parameters and options:

    * DTensor parameters (FSDP2's ``fully_shard``) → ``DTensorEngine`` (stage 0 over the local shards);
    * ``stage=3`` → ``Zero3Engine`` (the parameters must come from ``zeroadam.shard_model``);
    * ``stage`` 1-2 on more than one rank, or any stage with ``offload`` → ``FlatEngine`` (offload alone keeps
      the whole state on every rank);
    * otherwise → ``LocalEngine`` (on one rank stages 1-2 are the same computation as stage 0).
    """
    o = setup.options
    if mesh is not None and o.stage == 0:
        raise ValueError(
            "ZeroAdam: mesh= was given with stage=0, which shards nothing; use stage=1, 2 or 3 to shard over the "
            "mesh's 'shard' dim, or leave mesh unset (a DDP wrapper then averages the gradients)"
        )
    _check_release_grads(setup)
    if mesh is not None and o.release_grads and mesh.ndim == 2:
        raise ValueError(
            "ZeroAdam: release_grads=True with a 2-D mesh is not supported: an update inside backward would need each "
            "unit's reduced gradients averaged over the mesh's 'replicate' dim first (one all-reduce per unit during "
            "backward), which is not built; use release_grads=False with the mesh, or a 1-D mesh / process_group"
        )
    if any(_compat.is_dtensor(p) for p in setup.params()):
        if mesh is not None:
            raise ValueError(
                "ZeroAdam: mesh= was given with DTensor parameters (FSDP2's fully_shard); their placements already "
                "say how they are sharded: leave mesh unset"
            )
        from zeroadam.engines.dtensor import DTensorEngine

        return DTensorEngine.create(setup)
    if o.stage != 3 and any(getattr(p, "_zeroadam_sharded", None) is not None for p in setup.params()):
        # Their storage is released between uses: another engine would read (or keep views of) zero-byte storage
        # and crash the process.
        raise ValueError(
            f"ZeroAdam: stage={o.stage} with parameters of a model sharded by zeroadam.shard_model; its parameters "
            "are shards that only stage=3 updates: pass stage=3 (with offload=\"cpu\" when the model was sharded "
            "with offload_params=True), or build the optimizer on an unsharded model"
        )
    if o.stage == 3:
        from zeroadam.engines.zero3 import Zero3Engine

        return Zero3Engine.create(setup, process_group, mesh)
    if o.stage >= 1 or o.offload is not None:
        topo = resolve_topology(mesh, process_group) if o.stage >= 1 else Topology.flat(Group(None, 0, 1))
        if topo.everyone.world > 1 or o.offload is not None:
            from zeroadam.engines.flat import FlatEngine

            return FlatEngine(setup, topo)
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
