"""Accelerate: ZeroAdam in an ordinary Accelerate loop, and ``ZeroAccelerator`` for ZeRO-2 and ZeRO-3 memory savings.

Three ways in:

* Swap the optimizer, nothing else. ``accelerator.prepare`` wraps the model in ``DistributedDataParallel``, whose
  backward averages every gradient; ``ZeroAdam(stage=1 or 2)`` notices (``gradient_sync="auto"``, see [Note:
  gradients averaged by a wrapper] in ``zeroadam/grad_sync.py``) and communicates no gradient itself. Its state
  stays sharded; ``p.grad`` holds the full averaged gradients, so ``accelerator.clip_grad_norm_`` (torch's
  clipping of ``p.grad``) clips by the true global norm, and an fp16 ``GradScaler`` skips steps the way it does
  for ``torch.optim.AdamW``, which is what ``accelerator.optimizer_step_was_skipped`` reports.
* ``ZeroAccelerator``, a drop-in ``Accelerator``: ``prepare`` leaves a model whose trainable parameters a sharded
  ZeroAdam optimizes unwrapped (no DDP). ZeroAdam then averages the gradients itself, and stage 2 frees each
  ``p.grad`` during backward (ZeRO-2's gradient memory). ``clip_grad_norm_`` asks ZeroAdam for the global norm
  (``torch.nn.utils.clip_grad_norm_`` would see no gradients, or this rank's only); ``accumulate`` and
  ``no_sync`` defer ZeroAdam's gradient communication to the last micro-batch, as DDP's ``no_sync`` does.
* ZeRO-3 through ``ZeroAccelerator``: ``model = accelerator.shard_model(model)`` (``zeroadam.shard_model`` on
  ``accelerator.device`` over all processes), then ``ZeroAdam(model.parameters(), stage=3)``, then
  ``accelerator.prepare(model, optimizer)`` as usual. A model sharded by ``zeroadam.shard_model`` directly is
  accepted too, if its shards live on ``accelerator.device``. See [Note: stage 3 under Accelerate].

fp16: torch's ``GradScaler`` looks for infs in ``p.grad``, which a sharded ZeroAdam frees (stage 2, 3) or holds
unreduced (stage 1). ``ZeroAccelerator`` therefore swaps Accelerate's scaler for ``zeroadam.GradScaler`` (same
settings and state) when it prepares a sharded ZeroAdam: one global non-finite check, one loss scale on every rank.
That scaler hands the skip decision to ZeroAdam's ``step`` (which it always calls), so Accelerate's own way of
noticing a skip (``step`` not called) cannot work; the prepared optimizer reports ZeroAdam's skipped steps instead,
and ``accelerator.optimizer_step_was_skipped`` (and Accelerate's LR schedulers) see them on every rank.

Checkpoints need nothing special: Accelerate calls ``optimizer.state_dict()`` on every rank and writes rank 0's,
which holds the whole state; ``load_state`` gives every rank that file, and each keeps its shard.

[Note: stage 3 under Accelerate]
``shard_model`` releases the storage of every parameter between uses (each is a view of a unit's full buffer,
resized to zero bytes). Three things in Accelerate would touch that storage, and ``ZeroAccelerator`` steps in:

* device placement (``model.to(device)``, which copies even CPU tensors): skipped for a sharded model; the shards
  must already be on ``accelerator.device`` (``accelerator.shard_model`` puts them there), only buffers move;
* ``get_state_dict`` (used by ``save_state`` and ``save_model`` on every rank): returns
  ``zeroadam.full_state_dict(model)``, gathered on every rank and kept on the main process (on each node's main
  process with ``save_on_each_node``), like Accelerate's FSDP full state dicts;
* ``model.load_state_dict`` (what ``load_state`` calls with the whole saved model): a load pre-hook copies each
  rank's pieces of the parameters into its shards and takes those entries out of the dict before torch would copy
  them into released storage; a post-hook clears their names from the missing keys. A tied parameter loads from
  whichever of its names the file has (safetensors keeps one). Units gathered at that moment (a ``no_grad`` forward
  keeps the root) are released first, so the next forward gathers the loaded values.

The model is never wrapped in DDP (stage 3 reduce-scatters gradients itself) and autocast applies as usual.
``accumulate`` and ``accelerator.no_sync`` do not defer stage 3's gradient communication: each micro-batch's gradients
are reduce-scattered into the shards (where they add up) and freed during backward, as DeepSpeed's ZeRO-3 does.
Deferring would keep every ``p.grad`` whole until the last micro-batch, the memory ZeRO-3 is there to save.
``optimizer.no_sync()`` is still there for a loop that prefers fewer reduce-scatters to that memory.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from zeroadam._compat import require

accelerate = require("accelerate", "zeroadam.integrations.accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import PartialState  # noqa: E402

from zeroadam.amp import GradScaler  # noqa: E402
from zeroadam.engines.grad_sync import register_wrapper_detector  # noqa: E402
from zeroadam.optimizer import ZeroAdam  # noqa: E402
from zeroadam.sharding.model import ShardedModel, UnitPolicy, full_state_dict, shard_model  # noqa: E402

__all__ = ["ZeroAccelerator", "wraps_models_in_ddp", "unwrap_optimizer"]

# Accelerate's data-parallel distributed types: prepare() wraps a trainable model in DistributedDataParallel.
_DDP_TYPES = frozenset(
    {"MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"}
)


def wraps_models_in_ddp() -> bool:
    """Whether an initialized Accelerate state wraps the models it prepares in DistributedDataParallel.

    Reads the shared state without creating it (a script that never made an Accelerator has none)."""
    dist_type = PartialState._shared_state.get("distributed_type")
    return dist_type is not None and str(getattr(dist_type, "value", dist_type)) in _DDP_TYPES


register_wrapper_detector(wraps_models_in_ddp)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's (possibly nested) ``AcceleratedOptimizer`` wrappers."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _is_sharded(opt: Any) -> bool:
    """A ZeroAdam with a stage 1-3 engine, which averages its gradients itself (on one rank without offload,
    stages 1-2 run as stage 0, with no engine)."""
    return isinstance(opt, ZeroAdam) and opt.engine.averages_gradients and opt.options.stage in (1, 2, 3)


def _params_of(opt: ZeroAdam) -> set[torch.Tensor]:
    return {p for g in opt.param_groups for p in g["params"]}


def _sharded_of(model: nn.Module) -> Optional[ShardedModel]:
    return getattr(model, "_zeroadam_sharded", None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # Accelerate's CPU device is "cpu:0", tensors say "cpu": the index means nothing there.
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def _place_buffers(model: nn.Module, device: torch.device) -> None:
    """Move the buffers (not the sharded parameters) to ``device``, as ``model.to`` would."""
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None and not _same_device(b.device, device):
                m._buffers[name] = b.to(device)


# ---------------------------------------------------------------------------------------------- stage-3 loading
def _load_into_shards(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> list[str]:
    """Copy this rank's pieces of the sharded parameters found in ``state_dict`` (keys under ``prefix``) into its
    shards and remove those entries; returns every name of the parameters loaded (tied aliases included). Entries
    of the wrong shape stay, for torch to report. Not collective."""
    st = _sharded_of(model)
    assert st is not None
    names: dict[nn.Parameter, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p in st.unit_of:
            names.setdefault(p, []).append(prefix + n)
    values: dict[nn.Parameter, torch.Tensor] = {}
    loaded: list[str] = []
    for p, keys in names.items():
        present = [k for k in keys if k in state_dict]
        if not present or tuple(state_dict[present[0]].shape) != tuple(p.shape):
            continue
        values[p] = state_dict[present[0]]
        for k in present:
            del state_dict[k]
        loaded.extend(keys)
    st.load_shards(values)  # releases gathered units: they would shadow the new shards in the next forward
    return loaded


def _hook_full_loading(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` load a whole state dict into a sharded model (see [Note: stage 3 under
    Accelerate]); idempotent."""
    if getattr(model, "_zeroadam_full_loading", False):
        return
    loaded: list[str] = []

    def pre(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        loaded[:] = _load_into_shards(module, state_dict, prefix)

    def post(module: nn.Module, incompatible: Any) -> None:
        done = set(loaded)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in done]
        loaded.clear()

    # The public register_load_state_dict_pre_hook (torch >= 2.5) is this call; zeroadam supports torch 2.4.
    model._register_load_state_dict_pre_hook(pre, with_module=True)
    model.register_load_state_dict_post_hook(post)
    model._zeroadam_full_loading = True  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------- optimizer wrapper
class _SkipReportingOptimizer(AcceleratedOptimizer):
    """``AcceleratedOptimizer`` for a sharded ZeroAdam: ``step_was_skipped`` is whether ZeroAdam skipped the update.

    Accelerate infers a skip from ``GradScaler.step`` not calling ``optimizer.step``; for a sharded ZeroAdam
    (``_step_supports_amp_scaling``) it always calls it and ZeroAdam decides, from the global gradient norm. A
    non-finite gradient without a scaler skips the update too, and is reported the same way."""

    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        before = self.optimizer.skipped_steps
        super().step(closure)
        if self.gradient_state.sync_gradients:
            self._is_overflow = self.optimizer.skipped_steps > before


class ZeroAccelerator(Accelerator):
    """An ``Accelerator`` that lets a sharded ZeroAdam (stage 1, 2 or 3) average the gradients of its model itself.

    Use it exactly like ``Accelerator`` and pass the model and its ZeroAdam to the same ``prepare`` call (or the
    optimizer first). Models trained by no sharded ZeroAdam are prepared as usual.

    ZeRO-3: shard the model with :meth:`shard_model` first, build ``ZeroAdam(model.parameters(), stage=3)`` on its
    parameters, then ``prepare`` both::

        accelerator = ZeroAccelerator(gradient_accumulation_steps=4, mixed_precision="bf16")
        model = accelerator.shard_model(build_model())
        optimizer = ZeroAdam(model.parameters(), lr=3e-4, stage=3)
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    ``save_state`` / ``load_state`` / ``get_state_dict`` / ``save_model`` then use the whole (unsharded) model state
    dict (see [Note: stage 3 under Accelerate]).

    fp16 works with every stage: Accelerate's ``GradScaler`` is replaced by ``zeroadam.GradScaler`` with the same
    settings, and ``optimizer_step_was_skipped`` reports ZeroAdam's skips. Not supported (a ``ValueError`` at
    ``prepare``): DeepSpeed / FSDP plugins, which shard the model themselves.
    """

    def __init__(self, *args: Any, mesh: Optional[Any] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._zero_optimizers: list[ZeroAdam] = []
        if mesh is not None and self.parallelism_config is not None and self.parallelism_config.dp_replicate_size > 1:
            raise ValueError(
                "ZeroAccelerator: pass mesh= or parallelism_config=ParallelismConfig(dp_replicate_size=..., "
                "dp_shard_size=...), not both"
            )
        self._mesh = mesh

    @property
    def zero_mesh(self) -> Optional[Any]:
        """The hybrid-sharding mesh of ``parallelism_config=ParallelismConfig(dp_replicate_size=R, dp_shard_size=S)``
        (R, S > 1, no tensor / context / sequence parallelism): Accelerate's own device mesh, whose
        ("dp_replicate", "dp_shard") dims ZeroAdam takes as ("replicate", "shard"). Pass it as
        ``ZeroAdam(..., mesh=accelerator.zero_mesh)``; :meth:`shard_model` uses it. None otherwise.

        Accelerate takes a ParallelismConfig on GPUs (and other multi-device types) but not on CPU processes
        (MULTI_CPU); there, or to choose the mesh yourself, pass ``ZeroAccelerator(mesh=...)`` with a
        ("replicate", "shard") DeviceMesh, and this is that mesh."""
        if self._mesh is not None:
            return self._mesh
        pc = self.parallelism_config
        if pc is None or not (pc.dp_replicate_size > 1 and pc.dp_shard_size > 1):
            return None
        if pc.tp_size > 1 or pc.cp_size > 1 or getattr(pc, "sp_size", 1) > 1:
            raise ValueError(
                f"ZeroAccelerator: parallelism_config={pc!r} combines data parallelism with tensor, context or "
                "sequence parallelism; ZeroAdam's hybrid sharding takes dp_replicate_size and dp_shard_size only"
            )
        return self.torch_device_mesh

    # ---------------------------------------------------------------- ZeRO-3 entry point
    def shard_model(
        self,
        model: nn.Module,
        *,
        units: UnitPolicy = None,
        reshard_after_forward: bool = True,
        prefetch: int = 1,
        full_state_dict: Optional[dict[str, torch.Tensor]] = None,
        init_fn: Optional[Callable[[nn.Module], None]] = None,
        seed: int = 0,
        offload_params: bool = False,
    ) -> nn.Module:
        """``zeroadam.shard_model`` over all processes, with the shards (and the buffers) on ``self.device``
        (the shards on the host with ``offload_params=True``, then build ``ZeroAdam(..., offload="cpu")``).

        Call it before building ``ZeroAdam(stage=3)``, then ``prepare`` the model and the optimizer. The options are
        ``zeroadam.shard_model``'s: the units, resharding and prefetch, and for a meta-device model either
        ``full_state_dict`` (on the main process) or ``init_fn``."""
        if self.distributed_type.value not in _DDP_TYPES and self.num_processes > 1:
            raise ValueError(
                f"ZeroAccelerator.shard_model: distributed_type={self.distributed_type.value} shards or wraps the "
                "model itself; ZeRO-3 with ZeroAdam needs plain data parallelism (launch without a DeepSpeed or FSDP "
                "plugin)"
            )
        model = shard_model(
            model,
            mesh=self.zero_mesh,
            units=units,
            reshard_after_forward=reshard_after_forward,
            prefetch=prefetch,
            device=self.device,
            full_state_dict=full_state_dict,
            init_fn=init_fn,
            seed=seed,
            offload_params=offload_params,
        )
        _place_buffers(model, self.device)
        return model

    # ---------------------------------------------------------------- preparation
    def _use_zero_scaler(self) -> None:
        """Replace Accelerate's torch GradScaler by ``zeroadam.GradScaler`` with the same settings and state."""
        old = self.scaler
        if old is None or isinstance(old, GradScaler):
            return
        if not isinstance(old, torch.amp.GradScaler):
            raise ValueError(
                f"ZeroAccelerator: the accelerator's scaler is a {type(old).__name__}, not a torch.amp.GradScaler; "
                "a sharded ZeroAdam needs zeroadam.GradScaler (it asks ZeroAdam for the global non-finite check)"
            )
        new = GradScaler(getattr(old, "_device", "cuda"), enabled=old.is_enabled())
        new.load_state_dict(old.state_dict())  # scale, growth / backoff factors, interval, growth tracker
        self.scaler = new
        for o in self._optimizers:
            if getattr(o, "scaler", None) is old:
                o.scaler = new

    def _claim(self, opt: ZeroAdam) -> None:
        if any(opt is o for o in self._zero_optimizers):
            return
        if opt.options.gradient_sync == "wrapper":
            raise ValueError(
                "ZeroAccelerator: the ZeroAdam was built with gradient_sync='wrapper', but ZeroAccelerator does not "
                "wrap the model in DDP; pass gradient_sync='auto' or 'optimizer', or use the plain Accelerator"
            )
        if self.distributed_type.value not in _DDP_TYPES and self.num_processes > 1:
            raise ValueError(
                f"ZeroAccelerator: distributed_type={self.distributed_type.value} shards or wraps the model itself; "
                "a sharded ZeroAdam needs plain data parallelism (launch without a DeepSpeed or FSDP plugin)"
            )
        mesh = self.zero_mesh
        if mesh is not None and (opt.engine.topology is None or opt.engine.topology.shape != tuple(mesh.shape)):
            raise ValueError(
                f"ZeroAccelerator: the accelerator shards over a {tuple(mesh.shape)} (replicate, shard) mesh "
                "(parallelism_config or mesh=), but this ZeroAdam was built without it; pass "
                "mesh=accelerator.zero_mesh to ZeroAdam (and shard the model with accelerator.shard_model at stage 3)"
            )
        if opt.options.stage == 3 and opt.engine.everyone.world != self.num_processes:
            raise ValueError(
                f"ZeroAccelerator: the model of this ZeroAdam(stage=3) is sharded over {opt.engine.everyone.world} of the "
                f"{self.num_processes} processes; Accelerate feeds every process its own batches, so shard over all "
                "of them (accelerator.shard_model(model), or zeroadam.shard_model without a process_group)"
            )
        if opt.options.stage in (1, 2):
            opt.engine.set_gradient_sync("optimizer")
        self._use_zero_scaler()
        self._zero_optimizers.append(opt)

    def prepare(self, *args: Any, device_placement: Optional[list[bool]] = None) -> Any:
        # Optimizers first: prepare_model, which runs before them in Accelerate's pass, must know who owns what.
        for obj in args:
            opt = unwrap_optimizer(obj)
            if _is_sharded(opt):
                self._claim(opt)
        return super().prepare(*args, device_placement=device_placement)

    def _owner_of(self, model: nn.Module) -> Optional[ZeroAdam]:
        """The sharded ZeroAdam that optimizes every trainable parameter of ``model``, or None if none does."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        for opt in self._zero_optimizers:
            mine = _params_of(opt)
            owned = [p in mine for p in trainable]
            if all(owned) and trainable:
                return opt
            if any(owned):
                raise ValueError(
                    "ZeroAccelerator: the model has trainable parameters that its sharded ZeroAdam does not "
                    f"optimize ({owned.count(False)} of {len(trainable)}); DDP cannot average only the others. Give "
                    "every trainable parameter to the ZeroAdam, or freeze the rest (requires_grad=False)"
                )
        return None

    def _prepare_sharded_model(self, model: nn.Module, st: ShardedModel, device_placement: Optional[bool]) -> nn.Module:
        """A ``shard_model`` model: no ``model.to`` (it would copy released storage), no DDP; see [Note: stage 3
        under Accelerate]."""
        if st.topology.everyone.world != self.num_processes:
            raise ValueError(
                f"ZeroAccelerator: the model is sharded over {st.topology.everyone.world} of the {self.num_processes} processes; "
                "Accelerate feeds every process its own batches, so shard over all of them "
                "(accelerator.shard_model(model), or zeroadam.shard_model without a process_group)"
            )
        if self.device_placement if device_placement is None else device_placement:
            devices = {f.device for u in st.units for f in u.flats}  # where units compute (offloaded shards: host)
            wrong = sorted(str(d) for d in devices if not _same_device(d, self.device))
            if wrong:
                raise ValueError(
                    f"ZeroAccelerator: the model's shards are on {', '.join(wrong)} but this process trains on "
                    f"{self.device}, and a sharded model cannot be moved; shard it with accelerator.shard_model(model) "
                    "(or zeroadam.shard_model(model, device=accelerator.device)) before building ZeroAdam(stage=3)"
                )
            _place_buffers(model, self.device)
        _hook_full_loading(model)
        # evaluation_mode=True is Accelerate's "everything but the DDP wrapper": autocast (and compile).
        return super().prepare_model(model, device_placement=False, evaluation_mode=True)

    def prepare_model(
        self, model: nn.Module, device_placement: Optional[bool] = None, evaluation_mode: bool = False
    ) -> nn.Module:
        st = _sharded_of(model)
        if st is not None:
            if getattr(model, "_is_accelerate_prepared", False):
                return super().prepare_model(model, device_placement=False, evaluation_mode=True)  # registers it
            return self._prepare_sharded_model(model, st, device_placement)
        owner = None if evaluation_mode else self._owner_of(model)
        if owner is None:
            return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        # evaluation_mode=True is Accelerate's "everything but the DDP wrapper": device placement and autocast.
        model = super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)
        owner.engine.rebind_moved_params()  # device placement gave the parameters new storage (even on CPU)
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement: Optional[bool] = None) -> Any:
        opt = unwrap_optimizer(optimizer)
        if _is_sharded(opt) and opt.options.stage == 3:
            # Called alone too (prepare_model, then prepare_optimizer): a stage-3 model is never wrapped, so the
            # order does not matter. Stages 1-2 are claimed in prepare only, before their model could get DDP.
            self._claim(opt)
        if getattr(optimizer, "_is_accelerate_prepared", False) or not any(opt is o for o in self._zero_optimizers):
            return super().prepare_optimizer(optimizer, device_placement=device_placement)
        if device_placement is None:
            device_placement = self.device_placement
        prepared = _SkipReportingOptimizer(optimizer, device_placement=device_placement, scaler=self.scaler)
        self._optimizers.append(prepared)
        return prepared

    # ---------------------------------------------------------------- checkpoints
    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict[str, Any]:
        """Accelerate's ``get_state_dict``; for a sharded (ZeRO-3) model the whole state dict, gathered on every
        process (collective) and kept where Accelerate writes it: the main process, or each node's with
        ``save_on_each_node``. Other processes get an empty dict, as with Accelerate's FSDP."""
        inner = self.unwrap_model(model)
        if _sharded_of(inner) is None:
            return super().get_state_dict(model, unwrap=unwrap)
        # An OrderedDict, like Module.state_dict(): Accelerate drops tied aliases for safetensors only from those.
        sd = collections.OrderedDict(full_state_dict(inner))
        keep = self.is_local_main_process if self.project_configuration.save_on_each_node else self.is_main_process
        return sd if keep else collections.OrderedDict()

    def load_state(
        self, input_dir: Optional[str] = None, load_kwargs: Optional[dict] = None, **load_model_func_kwargs: Any
    ) -> Any:
        """Accelerate's ``load_state``. Sharded models release their gathered units first: safetensors inspects the
        parameters' storage before loading, and reads a tied pair in a gathered unit as an alias it cannot place."""
        with contextlib.ExitStack() as views:
            for m in self._models:
                st = _sharded_of(self.unwrap_model(m))
                if st is not None:
                    st.release_all()
                    # safetensors' load_model reads model.state_dict() for names and storage aliases only.
                    views.enter_context(st.state_dict_views())
            return super().load_state(input_dir, load_kwargs=load_kwargs, **load_model_func_kwargs)

    # ---------------------------------------------------------------- training loop
    def _owner_of_params(self, parameters: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], Optional[ZeroAdam]]:
        params = [p for p in parameters if p.requires_grad]
        for opt in self._zero_optimizers:
            mine = _params_of(opt)
            inside = sum(p in mine for p in params)
            if inside == len(params) == len(mine):
                return params, opt
            if inside:
                raise ValueError(
                    f"ZeroAccelerator.clip_grad_norm_: {inside} of the {len(params)} parameters belong to a sharded "
                    f"ZeroAdam of {len(mine)} parameters; ZeroAdam clips all of its parameters by their global norm "
                    "together: pass exactly those (model.parameters()), and clip other optimizers' separately"
                )
        return params, None

    def clip_grad_norm_(
        self, parameters: Union[Iterable[torch.Tensor], torch.Tensor], max_norm: float, norm_type: float = 2
    ) -> torch.Tensor:
        """Global-norm clipping; for a sharded ZeroAdam's parameters, ZeroAdam's own (applied inside its next
        step, over the averaged gradients of all ranks), after unscaling them under fp16. Returns the total norm."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        params, opt = self._owner_of_params(parameters)
        if opt is None:
            return super().clip_grad_norm_(params, max_norm, norm_type=norm_type)
        if self.scaler is not None:
            self.scaler.unscale_(opt)  # the norm of the true gradients; a non-finite one marks the step skipped
        return opt.clip_grad_norm_(max_norm, norm_type=float(norm_type))

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Like ``Accelerator.no_sync``; for a model that a sharded ZeroAdam averages itself, its ``no_sync()`` (stages
        1-2), or nothing (stage 3 reduces every micro-batch: see [Note: stage 3 under Accelerate])."""
        owner = next((o for o in self._zero_optimizers if any(p in _params_of(o) for p in model.parameters())), None)
        if owner is None:
            with super().no_sync(model):
                yield
            return
        with owner.no_sync() if owner.options.stage in (1, 2) else contextlib.nullcontext():
            yield
