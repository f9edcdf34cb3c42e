"""The stage-0 step plan on the CPU: the compiled kernel's argument tables, kept from one step to the next while
nothing they were built from changes (see the note below). ``engines/local.py`` asks for it at every norm and step
and falls back to its general path without one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from zeroadam.engines.base import EngineSetup
from zeroadam.formats.state import Master, Moments
from zeroadam.formats.table import MASTER_TENSORS, MOMENT_TENSORS
from zeroadam.kernels import cpu as cpu_kernels
from zeroadam.options import GroupHyper
from zeroadam.update.contract import Run, StepScalars

__all__ = ["StepPlan", "build_plan"]

# [Note: the stage-0 step plan]
# A stage-0 step on the CPU rebuilt, for every parameter, its flat views, a Run and the kernel's argument struct,
# checking every tensor again: ~25 us of Python a parameter, against ~9 us for torch's fused AdamW and ~8 us for
# DeepSpeedCPUAdam (200 tensors of 4096 elements, this project's 2-core EPYC VM). From one step to the next nothing
# of that changes but the gradients' addresses. So once every parameter with a gradient goes to the compiled CPU
# kernel, the engine keeps the kernel's argument tables (a StepPlan: one RunTable per param group, one GradTable for
# the norm), and each later norm or step first checks, parameter by parameter, that what they were built from still
# stands: the same param groups holding the same parameters, gradients on the same parameters, each a dense CPU
# tensor of the recorded dtype and length; the same state object with the same storage tensors at the same
# addresses; the parameter contiguous, at the same address, of the same length; its step tensor moved by this
# engine alone (its version counter). Then it writes the gradients' addresses into the tables and makes one kernel
# call per group. Anything else — a first step, a parameter without a gradient, a loaded state, a moved or
# reassigned tensor (``p.data = ...``), another device — takes the general path, which builds a new plan. Both
# paths run the same kernel over the same blocks, and the norm over the same gradients in the same order: the
# same bits either way.
@dataclass
class _Mark:
    """What one parameter's entry in the plan was built from."""

    state: Any  # the parameter's ParamState
    moments: Moments
    master: Master
    storage: tuple[tuple[Any, str, torch.Tensor, int], ...]  # (holder, field, tensor, its data_ptr)
    param_ptr: int
    numel: int
    grad_dtype: torch.dtype
    step_tensor: torch.Tensor
    step_ptr: int
    version: int  # of step_tensor: the plan's own writes leave it as it was


@dataclass
class _GroupPlan:
    """One param group's part of the plan."""

    params: list[torch.Tensor]  # the group's params at build time, in order
    marks: list[Optional[_Mark]]  # None for a parameter without a gradient (it must still have none)
    table: cpu_kernels.RunTable  # the runs of the marked parameters, in order
    counts: cpu_kernels.StepCounts  # their step tensors
    step: int  # the step count every marked parameter shares


@dataclass
class StepPlan:
    """The kernel's tables for every param group and for the norm (see the note); ``refresh`` before each use."""

    groups: list[_GroupPlan]
    norm: cpu_kernels.GradTable  # every marked gradient, in the order of setup.params()

    def refresh(self, param_groups: list[dict], state: Any) -> bool:
        """Check the plan against the optimizer as it is now (see the note) and write the gradients' addresses into
        its tables; False, with nothing to rely on, when anything differs."""
        if len(param_groups) != len(self.groups):
            return False
        k = 0
        for group, gp in zip(param_groups, self.groups):
            params = group["params"]
            if len(params) != len(gp.params):
                return False
            i = 0
            for p, q, m in zip(params, gp.params, gp.marks):
                g = p.grad
                if p is not q or (g is None) != (m is None):
                    return False
                if m is None:
                    continue
                st = state.get(p)
                if (
                    st is not m.state
                    or st.moments is not m.moments
                    or st.master is not m.master
                    or st.step_tensor is not m.step_tensor
                    or m.step_tensor._version != m.version
                    or m.step_tensor.data_ptr() != m.step_ptr
                    or p.data_ptr() != m.param_ptr
                    or p.numel() != m.numel
                    or not p.is_contiguous()
                    or not (g.is_cpu and g.layout == torch.strided and g.is_contiguous())
                    or g.dtype != m.grad_dtype
                    or g.numel() != m.numel
                ):
                    return False
                for holder, field, t, ptr in m.storage:
                    if getattr(holder, field) is not t or t.data_ptr() != ptr:
                        return False
                ptr = g.data_ptr()
                gp.table.set_grad(i, ptr)
                self.norm.ptrs[k] = ptr
                i += 1
                k += 1
        return True

    def sq_sum(self) -> float:
        """The sum of squares of every planned gradient (after ``refresh``), in fp64."""
        return self.norm.sq_sum()

    def step(self, param_groups: list[dict], scale: float) -> None:
        """Every planned parameter's update (after ``refresh``): one kernel call per param group."""
        for gi, (group, gp) in enumerate(zip(param_groups, self.groups)):
            if not gp.table.count:
                continue
            gp.step += 1
            gp.counts.set(gp.step)
            gp.table.step(StepScalars.for_group(GroupHyper.of(group), gp.step, scale, gi))


def _storage_of(st: Any) -> tuple[tuple[Any, str, torch.Tensor, int], ...]:
    out = []
    for holder, specs in ((st.moments, MOMENT_TENSORS[st.moments.fmt]), (st.master, MASTER_TENSORS[st.master.kind])):
        for spec in specs:
            t = getattr(holder, spec.field)
            out.append((holder, spec.field, t, t.data_ptr()))
    return tuple(out)


def build_plan(setup: EngineSetup, state_type: type) -> tuple[Optional[StepPlan], bool]:
    """(the plan of the optimizer as it is now, None when it cannot have one; whether that is likely to last beyond
    this step). ``state_type``: the engine's per-parameter state class."""
    if setup.backend not in (None, "cpu"):
        return None, True
    groups: list[_GroupPlan] = []
    grads: list[torch.Tensor] = []
    for group in setup.param_groups:
        params = list(group["params"])
        marks: list[Optional[_Mark]] = []
        runs: list[Run] = []
        steps = set()
        for p in params:
            g = p.grad
            if g is None:
                marks.append(None)
                continue
            st = setup.state.get(p)
            if not isinstance(st, state_type):
                return None, False  # its first step makes its state
            if (
                not (p.is_cpu and p.is_contiguous() and g.is_cpu and g.layout == torch.strided)
                or not g.is_contiguous()
                or g.dtype not in cpu_kernels.DTYPE_CODES
                or g.numel() != p.numel()
            ):
                return None, True
            t = st.step_tensor
            if not (t.is_cpu and t.dtype == torch.float32 and t.numel() == 1):
                return None, True
            steps.add(st.step)
            marks.append(_Mark(st, st.moments, st.master, _storage_of(st), p.data_ptr(), p.numel(), g.dtype, t,
                               t.data_ptr(), t._version))
            runs.append(Run(p.detach().view(-1), g.detach().view(-1), st.moments, st.master, st.index_base))
            grads.append(g)
        if len(steps) > 1:
            return None, True  # parameters of one group at different step counts: the general path groups them
        table = cpu_kernels.RunTable.of(runs)  # (the first call on CPU tensors builds the kernel)
        if table is None:
            return None, True
        counts = cpu_kernels.StepCounts(table.kernel, [m.step_tensor for m in marks if m is not None])
        groups.append(_GroupPlan(params, marks, table, counts, steps.pop() if steps else 0))
    kernel = cpu_kernels.compiled_kernel()
    if kernel is None:
        return None, True
    return StepPlan(groups, cpu_kernels.GradTable(kernel, grads)), False
