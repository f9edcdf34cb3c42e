"""ZeroAdam: the optimizer class — options, param groups, and the orchestration of one step.

The optimizer validates, reads the gradient scale handed over by a GradScaler, computes the global norm (clipping
and the non-finite skip) and delegates the rest to its engine (``zeroadam.engines``): stage 0, stages 1-2,
stage 3 or FSDP2's DTensors, all behind one interface. The per-parameter state-dict format is the same for every
stage.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch

from zeroadam.engines import Engine, EngineSetup, build
from zeroadam.engines.state_view import publish
from zeroadam.engines.release import CLIP_REFUSED, SCALER_REFUSED
from zeroadam.formats.policy import FormatPolicy
from zeroadam.options import ZeroOptions, check_hyper
from zeroadam.state_dict.api import apply_state_dict, build_state_dict, consolidate_state_dict

__all__ = ["ZeroAdam"]

_UNSUPPORTED = ("amsgrad", "capturable", "differentiable")


# [Note: clipping what p.grad no longer holds]
# At stage 2 (without a DDP wrapper) and stage 3 the gradients leave p.grad during backward, reduced into the shards;
# torch.nn.utils.clip_grad_norm_(model.parameters(), ...) then finds no gradient, returns 0 and clips nothing, and
# torch gives us no way to see that it was called. What we can see is a step without any clipping of ours
# (max_grad_norm=None and no optimizer.clip_grad_norm_ since the last step) after such a backward: the first one
# warns, once per optimizer, with the fix. A loop that does not clip at all can silence it with a warnings filter.
_HIDDEN_GRADS_WARNING = (
    "ZeroAdam(stage={stage}) reduced the gradients into its shards during backward, so p.grad is None between "
    "backward and step: torch.nn.utils.clip_grad_norm_ (or any code that reads p.grad) sees no gradient and clips "
    "nothing. Clip with ZeroAdam(max_grad_norm=...) or optimizer.clip_grad_norm_(max_norm) instead. If you do not "
    "clip, ignore this warning (shown once)."
)


def _refuse_flag(name: str, value: Any, where: str) -> None:
    if value:
        raise ValueError(
            f"ZeroAdam: {name}={value!r} in {where} is not supported (ZeroAdam has no {name} variant); remove it or "
            f"pass {name}=False"
        )

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


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
        mesh: instead of process_group, a DeviceMesh: 1-D, or 2-D with dims ("replicate", "shard") for hybrid
            sharding (stages 1-3 shard over "shard" and average over "replicate"; see zeroadam/comm/mesh.py).
        quantized_weights, quantized_gradients: stages 1-3: send parameter gathers / gradient reductions as int8
            blocks (ZeRO++ qwZ / qgZ; see zeroadam/comm/quantized.py).
        offload: None or "cpu" (state and update on the host).
        gradient_sync: stages 1-2: "optimizer" (ZeroAdam averages the gradients), "wrapper" (the model is wrapped in
            DistributedDataParallel, which already did) or "auto" ("wrapper" when Accelerate wraps models in DDP).
        grad_dtype: stages 1-3 and offload: "fp32", "bf16" or "auto" (bf16 for bf16 parameters): the dtype of the
            gradient shard and of the buckets / reduce-scatters that fill it.
        release_grads: stage 3 (and stage 0 on one device): update each unit inside backward as soon as its
            gradient is reduced, and keep no gradient shard; refuses clipping and fp16 GradScaler (see
            [Note: released gradients] in zeroadam/engines/release.py).
        skip_nonfinite: skip a step whose gradients hold an inf or NaN on any rank, parameters and state untouched
            (default); False updates as torch.optim.AdamW does (see [Note: the non-finite skip]).
    """

    engine: Engine
    """What holds the state and performs the step (see zeroadam/engines/base.py)."""

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands us grad_scale / found_inf and the unscale is fused, unless the gradients are p.grad's as
        # a wrapper averaged them (then GradScaler unscales and skips itself, as with torch.optim.AdamW).
        engine = getattr(self, "engine", None)
        return engine is None or not engine.averages_gradients or engine.amp_owns_gradients()

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
        mesh: Optional[Any] = None,
        offload: Optional[str] = None,
        bucket_size: int = 5_000_000,
        backend: Optional[str] = None,
        gradient_sync: str = "auto",
        quantized_weights: bool = False,
        quantized_gradients: bool = False,
        grad_dtype: str = "fp32",
        release_grads: bool = False,
        skip_nonfinite: bool = True,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # torch.optim.AdamW's implementation flags are accepted so that swapping the class is enough: ZeroAdam is
        # always one fused pass per run, so foreach and fused change nothing. amsgrad, capturable and differentiable
        # have no ZeroAdam code: False is accepted, True refused (in a param group too, see add_param_group).
        for name, value in (("amsgrad", amsgrad), ("capturable", capturable), ("differentiable", differentiable)):
            _refuse_flag(name, value, "the constructor")
        if not isinstance(maximize, bool):
            raise ValueError(f"ZeroAdam: invalid maximize={maximize!r}; expected True or False")
        check_hyper(lr, betas, eps, weight_decay)
        self.options = ZeroOptions(
            state_dtype=state_dtype,  # type: ignore[arg-type]
            master_weights=master_weights,  # type: ignore[arg-type]
            max_grad_norm=max_grad_norm,
            stage=stage,
            offload=offload,  # type: ignore[arg-type]
            bucket_size=bucket_size,
            gradient_sync=gradient_sync,  # type: ignore[arg-type]
            quantized_weights=quantized_weights,
            quantized_gradients=quantized_gradients,
            grad_dtype=grad_dtype,  # type: ignore[arg-type]
            release_grads=release_grads,
            skip_nonfinite=skip_nonfinite,
        )
        if backend not in (None, "torch", "cpu", "triton"):
            raise ValueError(f"ZeroAdam: invalid backend={backend!r}; expected None, 'torch', 'cpu' or 'triton'")
        self._backend = backend
        self.skipped_steps = 0
        # Whether the last step() was skipped for non-finite gradients: the attribute DeepSpeed's engine reads after
        # a step (it then holds its lr scheduler and counts the skip), as Megatron-style loops do.
        self.overflow = False
        self._warned_skip = False
        self._warned_hidden_grads = False
        self._pending_clip: Optional[float] = None  # set by clip_grad_norm_, consumed by the next step
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        setup = EngineSetup(
            param_groups=self.param_groups,
            options=self.options,
            policy=FormatPolicy(self.options.state_dtype, self.options.master_weights),
            backend=backend,
            state=self.state,
        )
        self.engine = build(setup, process_group, mesh)
        # Sharded engines: optimizer.state[p] views their shards ([Note: state views]); the views are (re)made after
        # the first step and after loads, not at every step.
        self._state_views_stale = True

    # ---------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("ZeroAdam: params must be an ordered collection (a list), not a set; pass list(params)")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}  # a generator is consumed once: keep the list
        for flag in _UNSUPPORTED:
            _refuse_flag(flag, param_group.get(flag, False), "a param group")
        for item in params:
            # (name, parameter) pairs, as model.named_parameters() gives: torch.optim keeps the names in
            # param_group["param_names"] (and in state dicts).
            p = item[1] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) else item
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"ZeroAdam: params must be tensors or (name, tensor) pairs, got {type(item).__name__}"
                )
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
        maximize = param_group.get("maximize", self.defaults.get("maximize", False))
        if not isinstance(maximize, bool):
            raise ValueError(f"ZeroAdam: invalid maximize={maximize!r} in a param group; expected True or False")
        if getattr(self, "engine", None) is not None and not self.engine.accepts_new_params:
            raise RuntimeError(
                "ZeroAdam: add_param_group after construction is only supported with stage=0; with a sharded "
                "stage pass every param group to the constructor"
            )
        super().add_param_group(param_group)

    # ---------------------------------------------------------------- gradient scale, clipping, finiteness
    def _global_norm(self, loss_scale: float, phase: int = 0) -> float:
        """The true (unscaled) global L2 norm of the gradients, over all ranks; inf/nan when any is non-finite.

        ``phase``: which call this is (0 step, 1 clip_grad_norm_, 2 GradScaler.unscale_). With several ranks the
        all-reduce also carries (k, k²) for k = this optimizer's count of norms so far and the phase: the ranks
        agree exactly when W·Σk² = (Σk)², so a rank that skipped a step() (or a clip) the others made is caught at
        once, on every rank, instead of pairing its step N with their step N + 1."""
        sq = self.engine.local_grad_sq_sum()
        if self.engine.group.world == 1:
            return float(sq.sqrt()) / loss_scale
        self._norm_count = getattr(self, "_norm_count", 0) + 1
        # Exact in fp64 (k² up to 2^53): the norm's number, its phase and the backward passes since the last step.
        k = float((4 * self._norm_count + phase) * 1024 + min(self.engine.backward_passes(), 1023))
        packed = torch.tensor([0.0, k, k * k], dtype=torch.float64, device=sq.device)
        packed[0] = sq
        packed = self.engine.all_reduce_sum(packed)
        world = self.engine.group.world
        if float(packed[2]) * world != float(packed[1]) ** 2:
            names = ("step()", "clip_grad_norm_()", "GradScaler.unscale_()")
            raise RuntimeError(
                f"ZeroAdam: ranks are out of step: this rank (rank {self.engine.group.rank}) is at its norm number "
                f"{self._norm_count} ({names[phase]}) after {self.engine.backward_passes()} backward passes, but not "
                "every rank is. A rank skipped a backward(), step(), clip_grad_norm_() or GradScaler.unscale_() that "
                "the others made (e.g. a data-dependent branch or an early exit taken on one rank only): every rank "
                "must make the same calls"
            )
        return float(packed[0].sqrt()) / loss_scale

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Global-norm clipping like ``torch.nn.utils.clip_grad_norm_``; returns the total norm.

        The coefficient is applied inside the next update instead of rewriting every gradient.
        """
        if norm_type != 2.0:
            raise ValueError(f"ZeroAdam.clip_grad_norm_: invalid norm_type={norm_type!r}; only 2.0 is supported")
        if not isinstance(max_norm, (int, float)) or max_norm <= 0:
            raise ValueError(f"ZeroAdam.clip_grad_norm_: invalid max_norm={max_norm!r}; expected a number > 0")
        if self.options.release_grads:
            raise RuntimeError(f"ZeroAdam.clip_grad_norm_ with release_grads=True: {CLIP_REFUSED}")
        norm = self._global_norm(1.0, phase=1)
        self._pending_clip = float(max_norm)
        self._pending_norm = norm
        return torch.tensor(norm)

    # ---------------------------------------------------------------- step
    def _amp_owns_gradients(self) -> bool:
        """Whether the gradients live in the engine's own buffers (so GradScaler must ask it, see amp.py)."""
        return self.engine.amp_owns_gradients()

    @torch.no_grad()
    def _amp_unscale(self, inv_scale: float) -> bool:
        """For zeroadam.GradScaler: multiply the (sharded) gradients by inv_scale; True when any is non-finite
        on any rank (collective)."""
        if self.options.release_grads:
            raise RuntimeError(SCALER_REFUSED)
        nonfinite = not torch.isfinite(torch.tensor(self._global_norm(1.0, phase=2))).item()
        if inv_scale != 1.0:
            self.engine.scale_grads(inv_scale)
        self._amp_checked = True
        return bool(nonfinite)

    def _loss_scale(self) -> tuple[float, bool]:
        """(loss scale to divide by, found_inf) handed over by torch.amp.GradScaler, if any."""
        scale = getattr(self, "grad_scale", None)
        found = getattr(self, "found_inf", None)
        checked, self._amp_checked = getattr(self, "_amp_checked", False), False
        if found is not None and not checked and self.engine.amp_owns_gradients():
            # torch's GradScaler looked for inf / NaN in p.grad, which this engine has already reduced into its
            # shards and freed: it saw nothing (and its update() would then fail with a bare AssertionError).
            raise RuntimeError(
                f"ZeroAdam(stage={self.options.stage}): torch.amp.GradScaler cannot see the gradients, which live in "
                "ZeroAdam's shards; use zeroadam.GradScaler (the same arguments) instead"
            )
        s = 1.0 if scale is None else float(scale)
        f = False if found is None else bool(float(found) > 0)
        return s, f

    # [Note: the non-finite skip]
    # By default a step whose gradients hold an inf or NaN anywhere (on any rank) is skipped: nothing is written, on
    # every rank. The global squared norm is the flag (a non-finite term makes the sum non-finite), so the check
    # costs nothing where the norm is taken anyway: with clipping, and at stages 1-3, where it is summed as the
    # reduced gradients land in the shards and all-reduced with the ranks' agreement check (_global_norm). With one
    # process and no clipping it is a read of every gradient before the update: 4 bytes of a memory-bound fp32
    # step's 32 (torch.optim.AdamW and DeepSpeedCPUAdam check nothing). skip_nonfinite=False (DeepSpeed's
    # bf16.check_grad_overflow: false) drops the skip: the update runs as torch's does, a non-finite gradient
    # reaching the moments and the parameters; a norm that is needed anyway is still taken (its inf or NaN then
    # reaches the clip coefficient, as with torch's clip_grad_norm_), and a step that needs none reads no gradient.
    # A GradScaler's found inf still skips, as it does for every torch optimizer.
    def _needs_norm(self, max_norm: Optional[float]) -> bool:
        """Whether this step must take the global norm: for the skip, for clipping, or for the ranks' check."""
        return self.options.skip_nonfinite or max_norm is not None or self.engine.group.world > 1

    def _step_scale(self) -> Optional[float]:
        """The factor every gradient is multiplied by this step, or None to skip the step."""
        loss_scale, found_inf = self._loss_scale()
        max_norm = self._pending_clip if self._pending_clip is not None else self.options.max_grad_norm
        norm: Optional[float] = None
        if self._pending_clip is not None:
            norm = self._pending_norm / loss_scale
        elif self._needs_norm(max_norm):
            norm = self._global_norm(loss_scale)
        self._pending_clip = None
        if max_norm is None and not self._warned_hidden_grads and self.engine.hides_gradients():
            self._warned_hidden_grads = True
            # stacklevel: _step_scale, step, torch.no_grad's wrapper, Optimizer's hook wrapper, then the caller.
            warnings.warn(_HIDDEN_GRADS_WARNING.format(stage=self.options.stage), UserWarning, stacklevel=5)
        nonfinite = norm is not None and not math.isfinite(norm)
        if found_inf or (nonfinite and self.options.skip_nonfinite):
            return None
        clip = 1.0
        if max_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s coefficient, so clipped runs match it (a NaN norm gives a NaN
            # coefficient there too, where min() would drop it).
            assert norm is not None
            coefficient = max_norm / (norm + 1e-6)
            clip = coefficient if math.isnan(coefficient) else min(1.0, coefficient)
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
        self.engine.before_step()
        if self.options.release_grads:
            # Backward made the updates ([Note: released gradients]); the step finishes them.
            if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
                raise RuntimeError(SCALER_REFUSED)
            self.overflow = False
            self.engine.step(1.0)
            return loss
        scale = self._step_scale()
        self.overflow = scale is None
        if scale is None:
            self._skip()
            self.engine.after_skip()
            return loss
        self.engine.step(scale)
        if self._state_views_stale:
            publish(self.engine, self.state)
            self._state_views_stale = False
        return loss

    @property
    def skipped_units(self) -> int:
        """release_grads=True: units skipped for non-finite gradients (see [Note: released gradients])."""
        release = getattr(self.engine, "release", None)
        return 0 if release is None else release.skipped_units

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.engine.zero_grad()
        self._pending_clip = None

    def no_sync(self) -> "contextlib.AbstractContextManager[None]":
        """Skip gradient communication for the backward passes inside (they accumulate locally in p.grad);
        the next backward outside communicates the sum. A no-op without sharding."""
        return self.engine.no_sync()

    # ---------------------------------------------------------------- introspection
    def comm_stats(self) -> dict[str, Any]:
        """Elements and bytes this rank's collectives covered during the last step, by collective type
        (see [Note: communication accounting] in zeroadam/collectives.py)."""
        return self.engine.comm_stats()

    def memory_stats(self) -> dict[str, int]:
        """Bytes held by this rank: parameters, gradients, moments (+ scales), master weights. Stage 3 also splits
        them into ``device_bytes`` and ``host_bytes`` (what offload, of the state or of the parameters, keeps on the
        host)."""
        return self.engine.memory_stats()

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (see [Note: full state and shards] in zeroadam/state_dict/api.py): the whole state
        with stage 0; with sharded stages, when every rank calls it, the whole state on rank 0 and this rank's shard
        on the others (a rank that calls it alone gets a RuntimeError naming the fix within seconds). The hooks of
        ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook`` run as for any torch optimizer."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = build_state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the whole state to rank ``to`` of the process group (collective: every rank calls it); until the
        next ``step()``, ``state_dict()`` returns it on that rank, and this rank's shard elsewhere, with no
        communication. The convention of ``torch.distributed.optim.ZeroRedundancyOptimizer`` (Lightning calls it)."""
        consolidate_state_dict(self, to)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Validate, then install: nothing changes when anything is refused. Runs the hooks of
        ``register_load_state_dict_pre_hook`` (which may return a replacement) and ``..._post_hook``."""
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        apply_state_dict(self, state_dict)
        publish(self.engine, self.state)
        self._state_views_stale = True  # parameters left without state by this load get theirs at the next step
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # Everything, so that copy.deepcopy(opt) keeps options, counters and the engine (torch's Optimizer keeps
        # only defaults, state and param_groups). A sharded engine holds process groups and views into buffers that
        # a copy cannot share: refused with the way to do it.
        if not self.engine.copyable:
            raise TypeError(
                f"ZeroAdam(stage={self.options.stage}, offload={self.options.offload!r}) cannot be copied or "
                "pickled: its state lives in shards tied to the process group. Save it with state_dict() (or "
                "zeroadam.checkpoint.save) and build a new optimizer that loads it"
            )
        return self.__dict__.copy()
