"""The engine interface: everything ``ZeroAdam`` asks of whatever holds its state.

``ZeroAdam`` validates options and param groups and orchestrates a step (gradient scale, clipping, the non-finite
skip); an engine holds the state and performs the rest. One engine per optimizer, chosen once by
``zeroadam.engines.build``:

========================  ===================================================================================
``LocalEngine``           stage 0: each parameter's whole state beside it, updated parameter by parameter
``FlatEngine``            stages 1-2 (and offload): flat block-aligned buffers, one shard of state per rank
``Zero3Engine``           stage 3: state for the pieces of the parameter shards that ``shard_model`` holds
``DTensorEngine``         FSDP2 (``fully_shard``) DTensor parameters: state for each rank's local shard
========================  ===================================================================================

An engine receives an ``EngineSetup`` (the live param groups, the options, the format policy), never the optimizer.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from zeroadam.comm.collectives import Group
from zeroadam.comm.mesh import Topology
from zeroadam.formats.policy import FormatPolicy
from zeroadam.options import ZeroOptions

if TYPE_CHECKING:  # pragma: no cover
    from zeroadam.engines.state_view import LocalState

__all__ = ["Engine", "EngineSetup", "TensorStep", "Entries", "CheckedEntry", "refuse_sparse_grad", "refuse_meta_params", "SPARSE_GRAD_FIX"]

Entries = dict[torch.Tensor, dict[str, Any]]
"""Per-parameter state-dict entries (see [Note: full state and shards] in zeroadam/state_dict/api.py)."""
CheckedEntry = tuple[torch.Tensor, int, int, dict[str, Any]]
"""(param, group index, step, entry) of a validated state-dict entry."""


SPARSE_GRAD_FIX = (
    "use dense embeddings (nn.Embedding(sparse=False)) or torch.optim.SparseAdam for those parameters"
)


def refuse_sparse_grad(p: torch.Tensor) -> None:
    """Raise RuntimeError if ``p.grad`` is sparse. Every engine calls this where a gradient first arrives (a hook,
    or the step): flat buffers and shards hold dense values, and torch's own error there ("reshape is not
    implemented for sparse tensors") does not say what to do. Every rank sees the same layout of sparse
    gradients, so every rank raises at the same place."""
    g = p.grad
    if g is not None and (g.is_sparse or g.layout != torch.strided):
        raise RuntimeError(
            f"ZeroAdam does not support sparse gradients (a parameter of shape {tuple(p.shape)} got a {g.layout} "
            f"gradient); {SPARSE_GRAD_FIX}"
        )


def refuse_meta_params(setup: "EngineSetup") -> None:
    """Raise ValueError if a parameter is on the meta device: flat buffers, host copies (offload) and shards need
    its values, and torch's own error ("Unknown device type meta for Dlpack") does not say what to do."""
    for gi, pg in enumerate(setup.param_groups):
        for i, p in enumerate(pg["params"]):
            if p.is_meta:
                where = "offload='cpu'" if setup.options.offload is not None else f"stage={setup.options.stage}"
                raise ValueError(
                    f"ZeroAdam: param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)}) is on the meta device; "
                    f"ZeroAdam with {where} needs its values. Materialize the model first: "
                    "model.to_empty(device=...) then initialize its parameters (or load a state dict), or shard it "
                    "with zeroadam.shard_model(model, device=..., init_fn=...) for stage 3"
                )


@dataclass(eq=False)
class EngineSetup:
    """What an engine is built from."""

    param_groups: list[dict[str, Any]]  # the optimizer's live groups: hyperparameters are read at every step
    options: ZeroOptions
    policy: FormatPolicy
    backend: Optional[str]  # forced update backend ("torch", "cpu", "triton") or None to choose per run
    state: dict[torch.Tensor, Any]  # the optimizer's ``state`` mapping (engines that keep per-parameter state)

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def fingerprint(self) -> list[tuple[str, Any]]:
        """What every rank of a sharded optimizer must agree on (see [Note: fingerprints] in comm/agreement.py):
        every option that changes the collectives a rank makes or the values it computes — the stage, offload,
        the stage-2 bucket size, who averages gradients (a rank on "wrapper" skips the reductions a rank on "auto"
        makes), the state format (it splits the flat buffers), the master kind, clipping, the gradient dtype (it sets
        the collectives' dtype), releasing gradients (updates move into backward), the non-finite skip (released
        updates check each unit with a collective) — each group's
        hyperparameters, and each parameter's shape, dtype, device type and whether it takes a gradient."""
        o = self.options
        items: list[tuple[str, Any]] = [
            ("stage", o.stage),
            ("offload", o.offload),
            ("bucket_size", o.bucket_size),
            ("gradient_sync", o.gradient_sync),
            ("state_dtype", o.state_dtype),
            ("master_weights", o.master_weights),
            ("max_grad_norm", o.max_grad_norm),
            ("quantized_weights", o.quantized_weights),
            ("quantized_gradients", o.quantized_gradients),
            ("grad_dtype", o.grad_dtype),
            ("release_grads", o.release_grads),
            ("skip_nonfinite", o.skip_nonfinite),
        ]
        for gi, pg in enumerate(self.param_groups):
            hyper = tuple((k, repr(v)) for k, v in sorted(pg.items()) if k != "params")
            items.append((f"param_groups[{gi}] options", hyper))
            items.append((f"param_groups[{gi}] size", len(pg["params"])))
            for i, p in enumerate(pg["params"]):
                items.append(
                    (f"param_groups[{gi}]['params'][{i}]", (tuple(p.shape), str(p.dtype), p.device.type, p.requires_grad))
                )
        return items


class TensorStep:
    """A step count kept in ``step_tensor``, a CPU float tensor as torch.optim.AdamW's ``step``: a state dict on one
    rank hands out this very tensor, so that an in-place load (DCP) restores the step with the moments."""

    step_tensor: torch.Tensor

    @property
    def step(self) -> int:
        return int(self.step_tensor.item())

    @step.setter
    def step(self, value: int) -> None:
        self.step_tensor.fill_(float(value))


class Engine(abc.ABC):
    """The state holder of one ZeroAdam. Collective methods are marked so: every rank calls them together."""

    group: Group  # the ranks that share this optimizer's state (one rank for stage 0): a mesh's "shard" dim
    topology: Optional[Topology] = None  # with a 2-D mesh: the replicas too (see [Note: hybrid sharding])

    @property
    def everyone(self) -> Group:
        """Every rank of this optimizer: ``group``, times the replicas of a 2-D mesh."""
        return self.topology.everyone if self.topology is not None else self.group

    @property
    def replica_rank(self) -> int:
        """This rank's "replicate" coordinate (0 without a 2-D mesh): replica 0 writes the shards of a checkpoint."""
        return self.topology.replicate.rank if self.topology is not None else 0

    # ---------------------------------------------------------------- what the engine is
    gathers_state_dict: bool = False
    """True when no rank holds the whole state: ``state_dict()`` gathers it to one rank (every rank calls it) and
    gives the others their shard. False: ``full_entries`` serves every rank (with no communication, or, for
    DTensor entries, collectively on every rank)."""
    averages_gradients: bool = False
    """True when the engine reduces gradients over ranks itself (so no DDP wrapper or framework all-reduce should)."""

    accepts_new_params: bool = False
    """True when ``add_param_group`` may add parameters after the engine was built."""
    copyable: bool = False
    """True when ``copy.deepcopy`` / pickle of the optimizer can copy the engine with it."""

    def amp_owns_gradients(self) -> bool:
        """Whether the gradients the update reads live in the engine's own buffers, so that a GradScaler must
        unscale them through ``scale_grads`` (see zeroadam/amp.py) rather than in ``p.grad``."""
        return True

    def hides_gradients(self) -> bool:
        """True when backward moved the gradients out of ``p.grad`` into the engine's shards, so that code reading
        ``p.grad`` between backward and step (``torch.nn.utils.clip_grad_norm_``, logging) sees None."""
        return False

    def backward_passes(self) -> int:
        """Backward passes over these parameters since the last step, where the engine counts them (0 where it
        does not): the ranks compare it at the step, so one that skipped a backward is caught."""
        return 0

    # ---------------------------------------------------------------- gradients
    def before_step(self) -> None:
        """Make the gradients of this step final (finish reductions). Collective for sharded engines."""

    @abc.abstractmethod
    def local_grad_sq_sum(self) -> torch.Tensor:
        """Sum of squared gradients over this rank's part (a scalar; non-finite when any gradient is)."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ``group``. Collective."""
        return t

    @abc.abstractmethod
    def scale_grads(self, factor: float) -> None:
        """Multiply every gradient the next update reads by ``factor`` (GradScaler.unscale_)."""

    def no_sync(self) -> "contextlib.AbstractContextManager[None]":
        """Backward passes inside communicate nothing (they accumulate locally)."""
        return contextlib.nullcontext()

    def defer_gradient_sync(self, deferred: bool) -> None:
        """Switch, outside any context manager, whether the coming backward passes communicate (DeepSpeed's
        gradient-accumulation boundary); a no-op for engines that reduce at the step or not at all."""

    def set_gradient_sync(self, sync: str) -> None:
        """Who averages gradients, decided by an integration before the first backward; a no-op where the
        engine does not depend on it."""

    def rebind_moved_params(self) -> None:
        """Follow parameters that ``Module.to()`` gave new storage after the optimizer was built."""

    # ---------------------------------------------------------------- step
    @abc.abstractmethod
    def step(self, scale: float) -> None:
        """Update every parameter with gradients multiplied by ``scale``. Collective for sharded engines."""

    def after_skip(self) -> None:
        """The step was skipped (non-finite gradients): drop this step's gradients."""

    def zero_grad(self) -> None:
        """Clear the gradients the engine holds (``p.grad`` is cleared by the optimizer)."""

    # ---------------------------------------------------------------- introspection
    @abc.abstractmethod
    def comm_stats(self) -> dict[str, Any]:
        ...

    @abc.abstractmethod
    def memory_stats(self) -> dict[str, int]:
        ...

    # ---------------------------------------------------------------- state dicts
    @abc.abstractmethod
    def has_state(self) -> bool:
        """Whether any step was taken (or state loaded); every rank answers alike."""

    @abc.abstractmethod
    def local_ranges(self) -> dict[torch.Tensor, tuple[int, int]]:
        """The flattened elements [start, end) of each parameter whose state this rank keeps."""

    def local_states(self) -> "Optional[dict[torch.Tensor, LocalState]]":
        """Views of this rank's part of each parameter's state, for ``optimizer.state[p]`` (see [Note: state views]
        in engines/state_view.py); None for engines that keep their own entries in ``optimizer.state``."""
        return None

    @abc.abstractmethod
    def shard_entries(self) -> Entries:
        """This rank's entries, without communication: whole entries shaped like their parameters, or shard
        pieces carrying ``shard_elements``."""

    @abc.abstractmethod
    def full_entries(self, to: int = 0) -> Optional[Entries]:
        """Every parameter's whole entry on rank ``to`` (None elsewhere). Collective for sharded engines."""

    def check_entries(self, checked: list[CheckedEntry]) -> None:
        """Refuse validated entries that this engine cannot install (raise ValueError); nothing changes."""

    @abc.abstractmethod
    def load_entries(self, checked: list[CheckedEntry]) -> None:
        """Install validated entries; nothing changes unless every one converts."""
