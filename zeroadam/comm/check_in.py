"""The check-in before a collective that one rank may reach alone.

[Note: check-in]
A rank that calls a collective alone blocks until the process group's timeout (30 minutes for NCCL by default).
Before a gather, every rank therefore checks in through the process group's key-value store (an atomic counter
per call) and waits at most ``ZEROADAM_CHECK_IN_TIMEOUT`` seconds (default 10) for the others; a rank that waits
in vain takes its check-in back and raises ``RuntimeError`` naming the fix. The take-back is one atomic add; if
it shows that every other rank arrived meanwhile, the rank checks in again and proceeds, so no rank enters the
gather alone. Ranks number their check-ins in order, per process group: that order is the order of their
collectives, which every rank shares, and a failed check-in does not advance it.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch.distributed as dist

from zeroadam.comm.collectives import Group

__all__ = ["check_in", "CHECK_IN_TIMEOUT_S"]

CHECK_IN_TIMEOUT_S = 10.0
"""Seconds a rank waits for the others before a gather (see [Note: check-in]); ZEROADAM_CHECK_IN_TIMEOUT overrides.
Ranks leave ``step()`` within milliseconds of each other (its all-gather syncs them), so ten seconds is ample
for an honest collective call and short enough to report a lone caller promptly."""

# Per process group (its global ranks), how many check-ins this process has completed: see [Note: check-in].
_check_in_counts: dict[tuple[int, ...], int] = {}


def _check_in_timeout() -> float:
    raw = os.environ.get("ZEROADAM_CHECK_IN_TIMEOUT")
    if raw is None:
        return CHECK_IN_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"ZeroAdam: invalid ZEROADAM_CHECK_IN_TIMEOUT={raw!r}; expected a number of seconds > 0")
    return value


def _group_store(group: Group) -> Optional[Any]:
    """The key-value store of the process group, or None where torch does not expose it."""
    c10d = dist.distributed_c10d
    get = getattr(c10d, "_get_process_group_store", None)
    try:
        return get(group.pg if group.pg is not None else c10d._get_default_group()) if get is not None else None
    except (KeyError, RuntimeError, ValueError):
        return None


def check_in(group: Group, what: str, fix: str) -> None:
    """Return once every rank of ``group`` has reached this call; raise RuntimeError naming ``fix`` if they do not
    within the check-in timeout (see [Note: check-in]). Call it right before a collective a rank may reach alone."""
    if group.world == 1:
        return
    store = _group_store(group)
    if store is None:  # pragma: no cover - every torch this project supports exposes the store
        return
    ranks = tuple(dist.get_process_group_ranks(group.pg)) if group.pg is not None else tuple(range(group.world))
    seq = _check_in_counts.get(ranks, 0)
    key = f"zeroadam/check_in/{'-'.join(map(str, ranks))}/{seq}"
    timeout = _check_in_timeout()
    deadline = time.monotonic() + timeout
    arrived = store.add(key, 1)
    pause = 0.001
    while arrived < group.world:
        if time.monotonic() > deadline:
            left = store.add(key, -1)  # take the check-in back, atomically
            if left < group.world - 1:
                raise RuntimeError(
                    f"{what} is collective: every rank of the process group must call it, but only {left + 1} of "
                    f"{group.world} ranks did within {timeout:g} s (this is rank {group.rank}). {fix} If the other "
                    "ranks are only slow to get there, raise the limit with ZEROADAM_CHECK_IN_TIMEOUT=<seconds>."
                )
            # Every other rank arrived meanwhile, and one may already be in the collective: check in again, go on.
            arrived = store.add(key, 1)
            continue
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
        arrived = store.add(key, 0)
    _check_in_counts[ranks] = seq + 1
