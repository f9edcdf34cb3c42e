"""The construction-time check that every rank set up the same thing.

[Note: fingerprints]
Ranks that built different models or options make different collectives and hang in the first one that does not
match (or abort in gloo, or silently train on wrong values). Before its first other collective, every sharded
setup therefore gathers a *fingerprint* from every rank — a list of (label, value) pairs: the options that change
which collectives a rank makes and the parameters' names, shapes, dtypes — and compares them. Every rank sees
every fingerprint, so every rank raises the same ``ValueError``, naming the first label that differs and the two
ranks' values. Used by ``ZeroAdam`` (stages 1-2 in engines/flat.py, stage 3 in engines/zero3.py) and by
``shard_model`` (sharding/model.py).
"""
from __future__ import annotations

from typing import Any

from zeroadam.comm.collectives import Group, all_gather_objects

__all__ = ["Fingerprint", "check_same_on_every_rank"]

Fingerprint = list[tuple[str, Any]]
"""(label, value) pairs; values must be picklable and compare with ``==`` (tuples of str / int / float)."""


def check_same_on_every_rank(group: Group, mine: Fingerprint, who: str, subject: str, fix: str) -> None:
    """Raise ValueError on every rank of ``group`` unless every rank passed an equal fingerprint (collective).

    ``who`` prefixes the message ("ZeroAdam"), ``subject`` names what must agree ("their parameters"), ``fix``
    says what to do."""
    if group.world == 1:
        return
    everyone = all_gather_objects(group, mine)
    first = everyone[0]
    for r, theirs in enumerate(everyone):
        if theirs == first:
            continue
        for (k0, v0), (k1, v1) in zip(first, theirs):
            if (k0, v0) != (k1, v1):
                label = k1 if k0 == k1 else f"{k1} (rank {r}) / {k0} (rank 0)"
                raise ValueError(
                    f"{who}: ranks disagree on {subject}: {label} is {v1!r} on rank {r} but {v0!r} on rank 0; {fix}"
                )
        longer, shorter = (r, 0) if len(theirs) > len(first) else (0, r)
        extra = (theirs if longer == r else first)[min(len(theirs), len(first))][0]
        raise ValueError(
            f"{who}: ranks disagree on {subject}: rank {longer} has {extra} (and {max(len(theirs), len(first))} "
            f"entries in all), rank {shorter} does not ({min(len(theirs), len(first))} entries); {fix}"
        )
