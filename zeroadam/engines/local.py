"""Stage 0: every parameter's whole state beside it, updated parameter by parameter with its device's kernel.

Each rank holds the whole state; with more than one rank, something else (DDP, DeepSpeed's stage-0 all-reduce)
averages the gradients before the step, so every rank computes the same update.
"""
from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any, Optional

import torch

from zeroadam.comm.collectives import Group
from zeroadam.engines.base import CheckedEntry, Engine, EngineSetup, Entries, TensorStep, refuse_sparse_grad
from zeroadam.engines.step_plan import StepPlan, build_plan
from zeroadam.formats.state import Master, Moments
from zeroadam.formats.table import MASTER_TENSORS, MOMENT_TENSORS
from zeroadam.options import GroupHyper
from zeroadam.state_dict.entries import convert_master, convert_moments, entry_piece
from zeroadam.update.contract import Run, StepScalars
from zeroadam.update.dispatch import fused_updates, grads_sq_sum

__all__ = ["LocalEngine", "ParamState"]


class ParamState(TensorStep, MutableMapping):
    """Stage-0 state of one parameter (its whole flattened range).

    It reads and writes like ``torch.optim.AdamW``'s ``state[p]``: a mapping of ``step`` (a float tensor) and the
    storage tensors under their state-dict keys (``exp_avg`` / ``exp_avg_sq``, shaped like the parameter, and for
    compact formats the scales and master tensors), so that tools which walk ``optimizer.state`` (moving it between
    devices, logging, DCP's in-place loads) work. Assigning a key replaces that tensor; it must keep its dtype and
    number of elements.
    """

    def __init__(self, step: int, moments: Moments, master: Master, index_base: int, shape: torch.Size) -> None:
        # A tensor, as AdamW's: state_dict() hands out this very tensor, so an in-place load sets the step too.
        self.step_tensor = torch.tensor(float(step))
        self.moments = moments
        self.master = master
        self.index_base = index_base  # the parameter's start in its space's layout: the rounding hash index
        self.shape = shape

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**self.moments.tensors(), **self.master.tensors()}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "step":
            return self.step_tensor
        t = self._tensors()[key]
        per_block = any(spec.key == key and spec.per_block for spec in MOMENT_TENSORS[self.moments.fmt])
        return t if per_block else t.view(self.shape)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        if key == "step":
            self.step_tensor = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            return
        old = self._tensors().get(key)
        if old is None:
            raise KeyError(f"ZeroAdam: no state {key!r} for this parameter; its keys are {list(self)}")
        if not isinstance(value, torch.Tensor) or value.dtype != old.dtype or value.numel() != old.numel():
            raise ValueError(
                f"ZeroAdam: state[{key!r}] must stay a {old.dtype} tensor of {old.numel()} elements (got "
                f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}); move it with .to(device)"
            )
        flat = value.reshape(-1)
        for holder, specs in ((self.moments, MOMENT_TENSORS[self.moments.fmt]), (self.master, MASTER_TENSORS[self.master.kind])):
            for spec in specs:
                if spec.key == key:
                    setattr(holder, spec.field, flat)

    def __delitem__(self, key: str) -> None:
        raise TypeError("ZeroAdam: a parameter's state keys cannot be deleted (clear optimizer.state instead)")

    def __iter__(self) -> Iterator[str]:
        return iter(["step", *self._tensors()])

    def __len__(self) -> int:
        return 1 + len(self._tensors())

    def __repr__(self) -> str:
        return f"ParamState(step={self.step}, format={self.moments.fmt!r}, master={self.master.kind!r})"


class LocalEngine(Engine):
    """Stage 0 (see the module docstring); the state lives in ``optimizer.state[p]``."""

    accepts_new_params = True
    copyable = True
    state_class: type[ParamState] = ParamState
    """What a parameter's state is built as (DeepSpeed's integration uses a subclass that reads as a dict)."""
    plan_steps: bool = True
    """Keep a step plan on the CPU ([Note: the stage-0 step plan]); False sends every step down the general path."""

    def __init__(self, setup: EngineSetup) -> None:
        self.setup = setup
        self.group = Group(None, 0, 1)
        self._plan: Optional[StepPlan] = None
        self._checked_in_step = False  # the plan was checked by this step's norm (see local_grad_sq_sum)
        self._plan_wait = 0  # steps until the next try after a plan could not be built

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy of the optimizer, pickling) drops the plan: its tables hold this engine's addresses.
        return {**self.__dict__, "_plan": None, "_plan_wait": 0, "_checked_in_step": False}

    # ---------------------------------------------------------------- the step plan ([Note: the stage-0 step plan])
    def _current_plan(self) -> Optional[StepPlan]:
        """The plan, checked and refreshed; a new one when it no longer holds; None for the general path."""
        setup = self.setup
        if not self.plan_steps:
            return None
        if self._plan is not None and self._plan.refresh(setup.param_groups, setup.state):
            return self._plan
        self._plan = None
        if self._plan_wait > 0:
            self._plan_wait -= 1
            return None
        self._plan, lasting = build_plan(self.setup, ParamState)
        if self._plan is None and lasting:
            self._plan_wait = 16  # a model that cannot have one (another device, another backend) pays 1/16 of a try
        return self._plan

    def amp_owns_gradients(self) -> bool:
        return False  # gradients stay in p.grad, where torch's GradScaler unscales them itself

    def init_state(self, p: torch.Tensor, index_base: int) -> ParamState:
        """The state a parameter gets at its first update."""
        policy = self.setup.policy
        return self.state_class(
            step=0,
            moments=Moments.zeros(policy.moment_format(p.numel()), p.numel(), p.device),  # type: ignore[arg-type]
            master=Master.create(policy.master_kind(p), p.detach().reshape(-1)),
            index_base=index_base,
            shape=p.shape,
        )

    def _states(self) -> dict[torch.Tensor, ParamState]:
        return {p: st for p, st in self.setup.state.items() if isinstance(st, ParamState)}

    # ---------------------------------------------------------------- gradients
    def _grads(self) -> list[torch.Tensor]:
        grads = []
        for p in self.setup.params():
            if p.grad is None:
                continue
            if p.is_meta:
                # The norm's .item() would fail with torch's "cannot be called on meta tensors"; say what to do.
                raise RuntimeError(
                    f"ZeroAdam: a parameter of shape {tuple(p.shape)} is on the meta device (it has no values); "
                    "materialize the model first (module.to_empty(device=...) then initialize it)"
                )
            refuse_sparse_grad(p)
            grads.append(p.grad)
        return grads

    def before_step(self) -> None:
        self._checked_in_step = False

    def local_grad_sq_sum(self) -> torch.Tensor:
        plan = self._current_plan()
        # Inside optimizer.step() nothing runs between this norm and the update (ZeroAdam.step calls before_step,
        # the norm, then step), so the update reuses this check; a norm asked for alone (clip_grad_norm_,
        # GradScaler.unscale_) is followed by user code, and the step's before_step drops the mark.
        self._checked_in_step = plan is not None
        if plan is not None:
            return torch.tensor(plan.sq_sum(), dtype=torch.float64)
        return grads_sq_sum(self._grads())

    def scale_grads(self, factor: float) -> None:
        for g in self._grads():
            g.mul_(factor)

    # ---------------------------------------------------------------- step
    def step(self, scale: float) -> None:
        plan = self._plan if self._checked_in_step else self._current_plan()
        self._checked_in_step = False
        if plan is not None:
            plan.step(self.setup.param_groups, scale)
            return
        state = self.setup.state
        for gi, group in enumerate(self.setup.param_groups):
            hyper = GroupHyper.of(group)
            offsets: Optional[dict[torch.Tensor, int]] = None
            # Runs of one step count share the step's scalars, so a backend can take them together (fused_updates:
            # one Triton launch per storage combination rather than one per parameter).
            by_step: dict[int, list[Run]] = {}
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue  # like torch.optim.AdamW: no decay, no moment update, no step count
                st = state.get(p)
                if not isinstance(st, ParamState):
                    if offsets is None:
                        offsets = self.setup.policy.layout_offsets(group["params"])
                    st = state[p] = self.init_state(p, offsets[p])
                st.step += 1
                # A non-contiguous parameter (channels_last, a transposed view) is updated in a contiguous
                # copy in its logical order, so its blocks follow the flattened index like every other one.
                dense = p.is_contiguous()
                flat = p.detach().view(-1) if dense else p.detach().contiguous().view(-1)
                by_step.setdefault(st.step, []).append(
                    Run(
                        param=flat,
                        grad=p.grad.detach().reshape(-1),
                        moments=st.moments,
                        master=st.master,
                        index_base=st.index_base,
                    )
                )
                if not dense:
                    copies.append((p, flat))
            for step, runs in by_step.items():
                fused_updates(runs, StepScalars.for_group(hyper, step, scale, gi), self.setup.backend)
            for p, flat in copies:
                p.detach().copy_(flat.view(p.shape))

    # ---------------------------------------------------------------- introspection
    def comm_stats(self) -> dict[str, Any]:
        return {"elements": {}, "bytes": {}, "total_bytes": 0, "ring_bytes": 0}

    def memory_stats(self) -> dict[str, int]:
        params = self.setup.params()
        stats = {
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "state_bytes": 0,
            "master_bytes": 0,
            "buffer_bytes": 0,  # stage 0 communicates nothing of its own
        }
        for st in self._states().values():
            stats["state_bytes"] += st.moments.nbytes()
            stats["master_bytes"] += st.master.nbytes()
        return stats

    # ---------------------------------------------------------------- state dicts
    def has_state(self) -> bool:
        return bool(self._states())

    def local_ranges(self) -> dict[torch.Tensor, tuple[int, int]]:
        return {p: (0, p.numel()) for p in self.setup.params()}

    def shard_entries(self) -> Entries:
        # The live tensors, as torch.optim hands out its state: DCP loads into them in place (step included).
        return {p: dict(st) for p, st in self._states().items()}

    def full_entries(self, to: int = 0) -> Optional[Entries]:
        return self.shard_entries()

    def load_entries(self, checked: list[CheckedEntry]) -> None:
        policy = self.setup.policy
        offsets = [policy.layout_offsets(g["params"]) for g in self.setup.param_groups]
        new_state = {}
        for p, gi, step, entry in checked:
            whole = entry_piece(entry, 0, p.numel(), p.numel())
            st = self.init_state(p, offsets[gi][p])
            st.step = step
            st.moments = convert_moments(whole, policy.moment_format(p.numel()), p.numel(), p.device, step)
            st.master = convert_master(whole, policy.master_kind(p), p.detach().reshape(-1))
            new_state[p] = st
        self.setup.state.clear()
        self.setup.state.update(new_state)
