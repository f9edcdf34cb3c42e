"""``GradScaler``: torch.amp.GradScaler for a sharded ZeroAdam.

torch's GradScaler looks for inf / NaN in each ``p.grad`` of the optimizer, on each rank by itself. With ZeRO
stage 2 or 3 those gradients are gone (reduced into shards and freed during backward), so it finds nothing and
refuses to update its scale; with stage 1 each rank sees only its own gradients, so one rank can skip a step the
others take, and the loss scales drift apart. This subclass asks ZeroAdam instead: the non-finite flag comes from
the global gradient norm (one all-reduce, the same every rank sees), and ``unscale_`` scales the shards where
the gradients now live. For stage 0 and for a model wrapped in DDP it behaves exactly like its parent.
"""
from __future__ import annotations

import torch

from zeroadam.optimizer import ZeroAdam

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """Drop-in for ``torch.amp.GradScaler`` (same arguments) that works with every ZeroAdam stage."""

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool
    ) -> dict[torch.device, torch.Tensor]:
        if not isinstance(optimizer, ZeroAdam) or not optimizer._amp_owns_gradients():
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        flag = optimizer._amp_unscale(float(inv_scale))
        found_inf.fill_(1.0 if flag else 0.0)
        return {found_inf.device: found_inf}
