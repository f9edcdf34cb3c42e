"""Which ranks share an optimizer's state, and how: a flat group, or a 2-D mesh (hybrid sharding).

[Note: hybrid sharding]
With ``mesh=`` a ``DeviceMesh`` with dims ``("replicate", "shard")`` (for example nodes × GPUs per node), state,
gradients and stage-3 parameters are split over ``"shard"`` only, and every rank with the same ``"shard"``
coordinate holds the same shard (FSDP2's HSDP; DeepSpeed's hpZ does the same for stage-3 parameter gathers).
One step: gradients are reduced within ``"shard"`` (the fast, intra-node link), then each rank's reduced shard is
averaged over ``"replicate"`` (the slow link; it carries Ψ / S elements per rank instead of the Ψ of a flat
reduce-scatter across machines); the update runs on identical shards in every replica; parameters are gathered
within ``"shard"`` only. The global norm needs no collective over ``"replicate"``: after the average every
replica holds the same gradient shards. A flat group is the mesh ``(1, world)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from zeroadam.comm.collectives import Group

__all__ = ["Topology", "resolve_topology", "MESH_DIMS"]

MESH_DIMS = ("replicate", "shard")
# Accelerate's ParallelismConfig(dp_replicate_size=..., dp_shard_size=...) names the same two dims so
# (accelerator.torch_device_mesh): taken as they are.
_ALIASES = {("dp_replicate", "dp_shard"): MESH_DIMS}
_MESH_FIX = (
    "build it with torch.distributed.device_mesh.init_device_mesh(device_type, (replicas, shards), "
    "mesh_dim_names=('replicate', 'shard')) over every rank, for example (nodes, gpus_per_node)"
)


@dataclass(frozen=True)
class Topology:
    """The ranks of one optimizer (see [Note: hybrid sharding])."""

    shard: Group  # state, gradients and stage-3 parameters are split over these ranks
    replicate: Group  # these ranks hold the same shard (world 1 without a 2-D mesh)
    everyone: Group  # every rank of the optimizer: shard × replicate
    shard_rows: tuple[tuple[int, ...], ...] = ()  # the global ranks of every replica's "shard" group (a 2-D mesh)

    @staticmethod
    def flat(group: Group) -> "Topology":
        return Topology(shard=group, replicate=Group(None, 0, 1), everyone=group)

    def new_shard_group(self) -> Group:
        """A new process group over the same ranks as ``shard`` (for collectives that must not queue behind the
        shard group's). Collective over ``everyone``: ``dist.new_group`` must be called by every rank of the world
        for every group, so each rank creates every replica's group, in the same order, and keeps its own."""
        if self.shard.world == 1:
            return self.shard
        rows = self.shard_rows or (tuple(dist.get_process_group_ranks(self.shard.pg)),)
        mine = None
        for row in rows:
            pg = dist.new_group(list(row))
            if dist.get_rank() in row:
                mine = pg
        return Group(mine, self.shard.rank, self.shard.world)

    @property
    def shape(self) -> tuple[int, int]:
        """(replicas, shards)."""
        return (self.replicate.world, self.shard.world)


def resolve_topology(mesh: Optional[Any], process_group: Optional[Any], who: str = "ZeroAdam") -> Topology:
    """The topology of ``mesh`` (a 1-D or ``("replicate", "shard")`` DeviceMesh) or of ``process_group``."""
    if mesh is None:
        return Topology.flat(Group.resolve(process_group))
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"{who}: invalid mesh={mesh!r}; expected a torch.distributed.device_mesh.DeviceMesh: {_MESH_FIX}")
    if process_group is not None:
        raise ValueError(
            f"{who}: pass mesh= or process_group=, not both (got mesh={mesh!r} and process_group={process_group!r}); "
            "the mesh already names the ranks"
        )
    names = tuple(mesh.mesh_dim_names or ())
    given = names
    names = _ALIASES.get(names, names)
    if mesh.ndim == 1:
        return Topology.flat(Group.resolve(mesh.get_group()))
    if mesh.ndim != 2 or sorted(names) != sorted(MESH_DIMS):
        raise ValueError(
            f"{who}: invalid mesh with shape {tuple(mesh.shape)} and mesh_dim_names={given or None}; expected a 1-D "
            f"mesh or a 2-D mesh with mesh_dim_names=('replicate', 'shard'): {_MESH_FIX}"
        )
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"{who}: invalid mesh with shape {tuple(mesh.shape)}: it covers {mesh.size()} ranks but the world has "
            f"{dist.get_world_size()}; a 2-D mesh must cover every rank: {_MESH_FIX}"
        )
    shard = Group.resolve(mesh.get_group(given[names.index("shard")]))
    replicate = Group.resolve(mesh.get_group(given[names.index("replicate")]))
    grid = mesh.mesh if names == MESH_DIMS else mesh.mesh.t()  # [replicate, shard] global ranks
    rows = tuple(tuple(int(r) for r in row) for row in grid.tolist())
    return Topology(shard=shard, replicate=replicate, everyone=Group.resolve(None), shard_rows=rows)


def stats_by_dim(shard: dict[str, Any], replicate: Optional[dict[str, Any]]) -> dict[str, Any]:
    """One step's ``CommStats`` snapshots joined: without replicas, ``shard`` as it is; with them, the totals of
    both, the replicate collectives also under ``"replicate/<kind>"``, and ``by_dim`` holding each dim's own."""
    if replicate is None:
        return shard
    out = {
        "elements": dict(shard["elements"]),
        "bytes": dict(shard["bytes"]),
        "total_bytes": shard["total_bytes"] + replicate["total_bytes"],
        "ring_bytes": shard["ring_bytes"] + replicate["ring_bytes"],
        "by_dim": {"shard": shard, "replicate": replicate},
    }
    for kind in replicate["bytes"]:
        out["bytes"][f"replicate/{kind}"] = replicate["bytes"][kind]
        out["elements"][f"replicate/{kind}"] = replicate["elements"][kind]
    return out
