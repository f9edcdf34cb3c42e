"""Stage 0 with ``release_grads=True``: each parameter is updated in its post-accumulate-grad hook and its
``p.grad`` freed, so at most the gradients autograd is still producing exist at once (one device only).

The update is ``LocalEngine``'s, parameter by parameter (int8 moments and compact masters included); what
changes is when it runs. See [Note: released gradients] in ``release.py`` for what is refused and why. On more
than one rank a DDP wrapper averages ``p.grad`` only after the hooks ran, so the hook would apply a local
gradient: refused at construction.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from zeroadam.comm.collectives import Group
from zeroadam.engines.base import EngineSetup, refuse_sparse_grad
from zeroadam.engines.local import LocalEngine, ParamState
from zeroadam.engines.release import SECOND_BACKWARD, Release
from zeroadam.options import GroupHyper
from zeroadam.update.contract import Run, StepScalars
from zeroadam.update.dispatch import fused_update

__all__ = ["ReleasedLocalEngine"]


class ReleasedLocalEngine(LocalEngine):
    """Stage 0, one device, updating inside backward (see the module docstring)."""

    accepts_new_params = False  # the hooks are registered once, on the parameters given at construction
    copyable = False
    plan_steps = False  # each parameter is updated in its own hook: there is no step to plan

    def __init__(self, setup: EngineSetup) -> None:
        super().__init__(setup)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "ZeroAdam: release_grads=True at stage=0 runs on one device only: with several processes a DDP wrapper "
                "averages p.grad after the hooks that would update each parameter; use stage=3 (or 2) with "
                "release_grads=True, or release_grads=False"
            )
        self.release = Release(Group(None, 0, 1), None, setup.options.skip_nonfinite)
        self._sync = True
        self._updated: set[torch.Tensor] = set()  # parameters updated by backward since the last step
        self._group_of: dict[torch.Tensor, int] = {}
        self._peak_grad_bytes = 0
        self._hooks = []
        for gi, group in enumerate(setup.param_groups):
            for p in group["params"]:
                self._group_of[p] = gi
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate in ``p.grad`` and update nothing; the next one outside updates."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def hides_gradients(self) -> bool:
        return True  # p.grad is freed by the update

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync or p.grad is None:
            return
        refuse_sparse_grad(p)
        if p in self._updated:
            raise RuntimeError(SECOND_BACKWARD)
        self._updated.add(p)
        self._peak_grad_bytes = max(self._peak_grad_bytes, p.grad.numel() * p.grad.element_size())
        if self.release.all_finite([p.grad.detach().reshape(-1)]):
            self._update(p)
        p.grad = None

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        gi = self._group_of[p]
        group = self.setup.param_groups[gi]
        st = self.setup.state.get(p)
        if not isinstance(st, ParamState):
            st = self.setup.state[p] = self.init_state(p, self.setup.policy.layout_offsets(group["params"])[p])
        st.step += 1
        dense = p.is_contiguous()  # as LocalEngine.step: a non-contiguous parameter is updated in a copy
        flat = p.detach().view(-1) if dense else p.detach().contiguous().view(-1)
        run = Run(param=flat, grad=p.grad.detach().reshape(-1), moments=st.moments, master=st.master,
                  index_base=st.index_base)
        fused_update(run, StepScalars.for_group(GroupHyper.of(group), st.step, 1.0, gi), self.setup.backend)
        if not dense:
            p.detach().copy_(flat.view(p.shape))

    def step(self, scale: float) -> None:
        # Gradients still in p.grad came from a backward under no_sync() with no backward after it: they wait for
        # the next backward outside, as at stages 2-3.
        self._updated.clear()
        self._last_peak, self._peak_grad_bytes = self._peak_grad_bytes, 0

    def memory_stats(self) -> dict[str, int]:
        stats = super().memory_stats()
        stats["peak_grad_bytes"] = max(self._peak_grad_bytes, getattr(self, "_last_peak", 0))
        return stats

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("ZeroAdam(release_grads=True) cannot be copied or pickled: its hooks belong to the model")
