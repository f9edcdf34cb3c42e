"""ZeroAdam: the optimizer class — options, param groups, and the orchestration of one step.

Stage 0 keeps each parameter's state beside it and updates parameter by parameter with the fused kernel of its
device. Stages 1 and 2 (``zeroadam.engines.flat``) lay each group out in a flat, block-aligned buffer and keep only
this rank's shard of state and gradients; the per-parameter state-dict format is the same for every stage.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch

from zeroadam import _compat
from zeroadam.update.contract import Run, StepScalars
from zeroadam.update.dispatch import fused_update, grads_sq_sum
from zeroadam.layout import FlatLayout, group_spaces
from zeroadam.options import MIN_QUANT_NUMEL, GroupHyper, ZeroOptions, check_hyper
from zeroadam.formats.state import Master, MasterKind, Moments

__all__ = ["ZeroAdam", "ParamState"]

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


@dataclass
class ParamState:
    """Stage-0 state of one parameter (its whole flattened range)."""

    step: int
    moments: Moments
    master: Master
    index_base: int  # the parameter's start in its space's layout: the rounding hash index (fixed for life)


class ZeroAdam(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with compact moments, fused updates and ZeRO partitioning.

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: AdamW hyperparameters; each group may override them.
        state_dtype: "int8" (block-wise 8-bit, ~2.03 bytes/param), "bf16" (stochastic rounding) or "fp32".
            Tensors under 4096 elements always keep fp32 moments.
        master_weights: for 16-bit parameters, "fp32" (a 4-byte copy), "compact" (an int8 residual of the
            16-bit rounding error), "none" (stochastic rounding of the parameter) or "auto" ("compact");
            fp32 parameters are always their own master.
        max_grad_norm: clip the global gradient norm to this value inside the update (None: no clipping).
        stage: ZeRO stage 0-3; process_group: the data-parallel group (default: the world).
        offload: None or "cpu" (state and update on the host).
        gradient_sync: stages 1-2: "optimizer" (ZeroAdam averages the gradients), "wrapper" (the model is wrapped in
            DistributedDataParallel, which already did) or "auto" ("wrapper" when Accelerate wraps models in DDP).
    """

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands us grad_scale / found_inf and the unscale is fused. Not when a DDP wrapper averages the
        # gradients: p.grad then holds all of them, and GradScaler's own unscale and skip (a step it does not
        # call) keep Accelerate's step_was_skipped right, as with torch.optim.AdamW.
        zero = getattr(self, "_zero", None)
        return zero is None or not getattr(zero, "grads_from_wrapper", lambda: False)()

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        state_dtype: str = "int8",
        master_weights: str = "auto",
        max_grad_norm: Optional[float] = None,
        stage: int = 0,
        process_group: Optional[Any] = None,
        offload: Optional[str] = None,
        bucket_size: int = 5_000_000,
        backend: Optional[str] = None,
        gradient_sync: str = "auto",
    ) -> None:
        check_hyper(lr, betas, eps, weight_decay)
        self.options = ZeroOptions(
            state_dtype=state_dtype,  # type: ignore[arg-type]
            master_weights=master_weights,  # type: ignore[arg-type]
            max_grad_norm=max_grad_norm,
            stage=stage,
            offload=offload,  # type: ignore[arg-type]
            bucket_size=bucket_size,
            gradient_sync=gradient_sync,  # type: ignore[arg-type]
        )
        if backend not in (None, "torch", "cpu", "triton"):
            raise ValueError(f"ZeroAdam: invalid backend={backend!r}; expected None, 'torch', 'cpu' or 'triton'")
        self._backend = backend
        self.skipped_steps = 0
        # Whether the last step() was skipped for non-finite gradients: the attribute DeepSpeed's engine reads after
        # a step (it then holds its lr scheduler and counts the skip), as Megatron-style loops do.
        self.overflow = False
        self._warned_skip = False
        self._pending_clip: Optional[float] = None  # set by clip_grad_norm_, consumed by the next step
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._zero = None
        if any(_compat.is_dtensor(p) for g in self.param_groups for p in g["params"]):
            from zeroadam.engines.dtensor import DTensorEngine  # FSDP2 (fully_shard) parameters

            self._zero = DTensorEngine.create(self)
        elif self.options.stage >= 1 or self.options.offload is not None:
            from zeroadam.engines.flat import ZeroEngine

            self._zero = ZeroEngine.create(self, process_group)

    # ---------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("ZeroAdam: params must be an ordered collection (a list), not a set; pass list(params)")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}  # a generator is consumed once: keep the list
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"ZeroAdam: params must be tensors, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError(
                    f"ZeroAdam: complex parameter of shape {tuple(p.shape)} is not supported; "
                    "optimize torch.view_as_real(param) instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"ZeroAdam: parameter of dtype {p.dtype} is not a floating-point tensor")
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(
                    f"ZeroAdam: parameter dtype {p.dtype} is not supported; expected float32, bfloat16 or float16"
                )
        check_hyper(
            param_group.get("lr", self.defaults["lr"]),
            param_group.get("betas", self.defaults["betas"]),
            param_group.get("eps", self.defaults["eps"]),
            param_group.get("weight_decay", self.defaults["weight_decay"]),
        )
        if getattr(self, "_zero", None) is not None:
            raise RuntimeError(
                "ZeroAdam: add_param_group after construction is only supported with stage=0; with a sharded "
                "stage pass every param group to the constructor"
            )
        super().add_param_group(param_group)

    # ---------------------------------------------------------------- formats
    def _master_kind(self, p: torch.Tensor) -> MasterKind:
        if p.dtype == torch.float32:
            return "param"
        mw = self.options.master_weights
        return "compact" if mw == "auto" else mw  # type: ignore[return-value]

    def _moment_format(self, numel: int) -> str:
        return self.options.state_dtype if numel >= MIN_QUANT_NUMEL else "fp32"

    def _space_of(self, p: torch.Tensor) -> str:
        return self._moment_format(p.numel())

    def _layout_offsets(self, group: dict[str, Any]) -> dict[torch.Tensor, int]:
        """Each parameter's start in its space's block-aligned layout (the rounding hash index), the same
        positions the sharded stages use, so stochastic rounding draws identical bits in every stage."""
        out = {}
        for params in group_spaces(group["params"], self._space_of).values():
            for slot, p in zip(FlatLayout.build(params, 1).slots, params):
                out[p] = slot.start
        return out

    def _init_state(self, p: torch.Tensor, index_base: int) -> ParamState:
        flat = p.detach().reshape(-1)
        return ParamState(
            step=0,
            moments=Moments.zeros(self._moment_format(p.numel()), p.numel(), p.device),  # type: ignore[arg-type]
            master=Master.create(self._master_kind(p), flat),
            index_base=index_base,
        )

    # ---------------------------------------------------------------- gradient scale, clipping, finiteness
    def _grads_stage0(self) -> list[torch.Tensor]:
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "ZeroAdam does not support sparse gradients; use dense embeddings "
                        "(nn.Embedding(sparse=False)) or torch.optim.SparseAdam for those parameters"
                    )
                grads.append(p.grad)
        return grads

    def _grad_sq_sum(self) -> torch.Tensor:
        """Sum of squared gradients of this rank's view (fp32 scalar on the first device, or CPU)."""
        if self._zero is not None:
            return self._zero.local_grad_sq_sum()
        return grads_sq_sum(self._grads_stage0())

    def _global_norm(self, loss_scale: float) -> float:
        """The true (unscaled) global L2 norm of the gradients, over all ranks; inf/nan when any is non-finite."""
        sq = self._grad_sq_sum()
        if self._zero is not None:
            sq = self._zero.all_reduce_sum(sq)
        return float(sq.sqrt()) / loss_scale

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Global-norm clipping like ``torch.nn.utils.clip_grad_norm_``; returns the total norm.

        The coefficient is applied inside the next update instead of rewriting every gradient.
        """
        if norm_type != 2.0:
            raise ValueError(f"ZeroAdam.clip_grad_norm_: invalid norm_type={norm_type!r}; only 2.0 is supported")
        if not isinstance(max_norm, (int, float)) or max_norm <= 0:
            raise ValueError(f"ZeroAdam.clip_grad_norm_: invalid max_norm={max_norm!r}; expected a number > 0")
        norm = self._global_norm(1.0)
        self._pending_clip = float(max_norm)
        self._pending_norm = norm
        return torch.tensor(norm)

    # ---------------------------------------------------------------- step
    def _amp_owns_gradients(self) -> bool:
        """Whether the gradients live in this optimizer's shards (so GradScaler must ask it, see amp.py)."""
        return self._zero is not None and self._step_supports_amp_scaling

    @torch.no_grad()
    def _amp_unscale(self, inv_scale: float) -> bool:
        """For zeroadam.GradScaler: multiply the (sharded) gradients by inv_scale; True when any is non-finite
        on any rank (collective)."""
        nonfinite = not torch.isfinite(torch.tensor(self._global_norm(1.0))).item()
        if inv_scale != 1.0:
            self._zero.scale_grads(inv_scale)
        return bool(nonfinite)

    def _loss_scale(self) -> tuple[float, bool]:
        """(loss scale to divide by, found_inf) handed over by torch.amp.GradScaler, if any."""
        scale = getattr(self, "grad_scale", None)
        found = getattr(self, "found_inf", None)
        s = 1.0 if scale is None else float(scale)
        f = False if found is None else bool(float(found) > 0)
        return s, f

    def _step_scale(self) -> Optional[float]:
        """The factor every gradient is multiplied by this step, or None to skip the step."""
        loss_scale, found_inf = self._loss_scale()
        max_norm = self._pending_clip if self._pending_clip is not None else self.options.max_grad_norm
        if self._pending_clip is not None:
            norm = self._pending_norm / loss_scale
        else:
            norm = self._global_norm(loss_scale)
        self._pending_clip = None
        if found_inf or not torch.isfinite(torch.tensor(norm)):
            return None
        clip = 1.0
        if max_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s coefficient, so clipped runs match it.
            clip = min(1.0, max_norm / (norm + 1e-6))
        return clip / loss_scale

    def _skip(self) -> None:
        self.skipped_steps += 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                "ZeroAdam: non-finite gradients; the step was skipped and the state left untouched "
                "(counted in optimizer.skipped_steps; this warning is shown once)",
                RuntimeWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._zero is not None:
            self._zero.before_step()
        scale = self._step_scale()
        self.overflow = scale is None
        if scale is None:
            self._skip()
            if self._zero is not None:
                self._zero.after_skip()
            return loss
        if self._zero is not None:
            self._zero.step(scale)
            return loss
        for gi, group in enumerate(self.param_groups):
            hyper = GroupHyper.of(group)
            offsets = None
            for p in group["params"]:
                if p.grad is None:
                    continue  # like torch.optim.AdamW: no decay, no moment update, no step count
                st = self.state.get(p)
                if not isinstance(st, ParamState):
                    if offsets is None:
                        offsets = self._layout_offsets(group)
                    st = self.state[p] = self._init_state(p, offsets[p])
                st.step += 1
                # A non-contiguous parameter (channels_last, a transposed view) is updated in a contiguous
                # copy in its logical order, so its blocks follow the flattened index like every other one.
                dense = p.is_contiguous()
                flat = p.detach().view(-1) if dense else p.detach().contiguous().view(-1)
                run = Run(
                    param=flat,
                    grad=p.grad.detach().reshape(-1),
                    moments=st.moments,
                    master=st.master,
                    index_base=st.index_base,
                )
                fused_update(run, StepScalars(hyper, st.step, scale, gi), self._backend)
                if not dense:
                    p.detach().copy_(flat.view(p.shape))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self._zero is not None:
            self._zero.zero_grad()
        self._pending_clip = None

    def no_sync(self) -> "contextlib.AbstractContextManager[None]":
        """Skip gradient communication for the backward passes inside (they accumulate locally in p.grad);
        the next backward outside communicates the sum. A no-op without sharding."""
        if self._zero is None:
            return contextlib.nullcontext()
        return self._zero.no_sync()

    # ---------------------------------------------------------------- introspection
    def comm_stats(self) -> dict[str, Any]:
        """Elements and bytes this rank's collectives covered during the last step, by collective type
        (see [Note: communication accounting] in zeroadam/collectives.py)."""
        if self._zero is None:
            return {"elements": {}, "bytes": {}, "total_bytes": 0, "ring_bytes": 0}
        return self._zero.comm_stats()

    def memory_stats(self) -> dict[str, int]:
        """Bytes held by this rank: parameters, gradients, moments (+ scales), master weights."""
        if self._zero is not None:
            return self._zero.memory_stats()
        params = [p for g in self.param_groups for p in g["params"]]
        stats = {
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "state_bytes": 0,
            "master_bytes": 0,
        }
        for st in self.state.values():
            if isinstance(st, ParamState):
                stats["state_bytes"] += st.moments.nbytes()
                stats["master_bytes"] += st.master.nbytes()
        return stats

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (see [Note: full state and shards] in state_dict.py): the whole state with
        stage 0; with sharded stages, when every rank calls it, the whole state on rank 0 and this rank's shard
        on the others (a rank that calls it alone gets a RuntimeError naming the fix within seconds)."""
        from zeroadam.state_dict.api import build_state_dict

        return build_state_dict(self)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the whole state to rank ``to`` of the process group (collective: every rank calls it); until the
        next ``step()``, ``state_dict()`` returns it on that rank, and this rank's shard elsewhere, with no
        communication. The convention of ``torch.distributed.optim.ZeroRedundancyOptimizer`` (Lightning calls it)."""
        from zeroadam.state_dict.api import consolidate_state_dict

        consolidate_state_dict(self, to)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from zeroadam.state_dict.api import apply_state_dict

        apply_state_dict(self, state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:  # pragma: no cover - pickling is not the format
        super().__setstate__(state)
