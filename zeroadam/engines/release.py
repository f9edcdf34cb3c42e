"""``release_grads=True``: the bookkeeping of updates made inside backward, shared by the engines that make them.

[Note: released gradients]
With ``release_grads=True`` an engine updates a part of its state (a stage-3 unit, a stage-2 bucket, a stage-0
parameter) as soon as that part's gradient of the last micro-batch is reduced to its owner, and frees the gradient; ``step()`` only finishes what backward
started. What the usual step decides from every gradient at once cannot hold:

* global-norm clipping needs every gradient before the first update: ``max_grad_norm`` and ``clip_grad_norm_``
  are refused with that reason;
* a loss-scaled (fp16 ``GradScaler``) gradient would be applied before the scaler could unscale it or find an
  inf: refused at the step that follows (the parameters already took that backward's scaled update, so the run
  must restart without the scaler);
* a non-finite gradient found once some parts were updated cannot skip the whole step: the affected part is
  skipped (its state and parameters untouched, its step count not advanced: stage 2 keeps the lag per parameter in
  ``FlatSpace.lag``), counted in ``skipped_units`` and warned about once. Every rank decides alike: a part's "finite" flag is summed over the ranks (one scalar
  all-reduce per part), so no rank updates a part another skipped.

Gradient accumulation: every backward outside ``no_sync()`` updates, so the micro-batches before the last run
under ``no_sync()`` (their gradients accumulate in ``p.grad``); a second backward outside it before ``step()``
raises instead of updating twice.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from zeroadam.comm.collectives import CommStats, Group, all_reduce_sum
from zeroadam.update.dispatch import grads_sq_sum

__all__ = ["Release", "CLIP_REFUSED", "SCALER_REFUSED", "SECOND_BACKWARD"]

CLIP_REFUSED = (
    "global-norm clipping needs every gradient before the first update, and release_grads=True updates each "
    "unit during backward as soon as its gradient is reduced; use release_grads=False to clip"
)
SCALER_REFUSED = (
    "ZeroAdam(release_grads=True) cannot take a loss-scaled (fp16 GradScaler) gradient: each unit is updated "
    "during backward, before the scaler can unscale the gradients or find an inf, so this backward's updates used "
    "the scaled gradients. Restart without the GradScaler (bf16 needs none), or use release_grads=False"
)
SECOND_BACKWARD = (
    "ZeroAdam(release_grads=True): a second backward outside no_sync() before step(); every backward outside "
    "no_sync() updates the parameters, so run the micro-batches before the last one under optimizer.no_sync() "
    "and call step() once after the last"
)


class Release:
    """Skip counting and the cross-rank finite check of one optimizer's released updates."""

    def __init__(self, group: Group, stats: Optional[CommStats], check: bool = True) -> None:
        """``check``: skip non-finite units (skip_nonfinite); False lets every unit through unread."""
        self.group = group
        self.stats = stats
        self.check = check
        self.skipped_units = 0
        self._warned = False

    def all_finite(self, grads: Sequence[torch.Tensor]) -> bool:
        """Whether every rank's ``grads`` (its pieces of one unit) are finite, or the check is off (every rank
        agrees on that: skip_nonfinite is in the fingerprint). Collective over ``group`` when checking."""
        if not self.check:
            return True
        local = bool(torch.isfinite(grads_sq_sum(list(grads))).item()) if grads else True
        flag = torch.tensor([0.0 if local else 1.0])
        if self.group.world > 1:
            all_reduce_sum(self.group, flag, self.stats)
        ok = float(flag[0]) == 0.0
        if not ok:
            self.skipped_units += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "ZeroAdam(release_grads=True): non-finite gradients in a unit whose update runs during backward; "
                    "that unit was skipped (state and parameters untouched) while units updated before it keep "
                    "their update (counted in optimizer.skipped_units; this warning is shown once)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return ok
