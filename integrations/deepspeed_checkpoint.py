"""Saving what a DeepSpeed engine built by ``zeroadam.integrations.deepspeed.initialize`` trains: the whole run
(``save_checkpoint`` / ``load_checkpoint``, any stage) and, at stage 3, the gathered 16-bit weights
(``engine.save_16bit_model``).

[Note: zds checkpoints]
``zeroadam.checkpoint`` saves the model and ZeroAdam's (sharded) state, and the engine's own ``save_checkpoint``
cannot at stage 3 (the parameters hold no storage between steps). What the engine adds to a run lives in neither:
the lr scheduler, ``global_steps`` / ``global_samples`` / ``skipped_steps`` (which DeepSpeed's schedulers and logs
follow) and, with fp16, the loss scaler. ``save_checkpoint`` writes them to ``ENGINE_FILE`` inside the checkpoint
directory right after ``zeroadam.checkpoint.save`` has swapped it into place, itself through a temporary file and
``os.replace``; ``load_checkpoint`` refuses a checkpoint without it (a save interrupted between the two), so a resume
never goes on with a scheduler that does not match the weights.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.distributed as dist

from zeroadam import checkpoint
from zeroadam.sharding.model import full_state_dict

__all__ = ["ENGINE_FILE", "save_checkpoint", "load_checkpoint", "save_16bit_model"]

ENGINE_FILE = "deepspeed_engine.pt"
# The engine's counters that a resumed run needs (DeepSpeed's own checkpoints carry the same ones).
_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomically(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _engine_state(engine: Any) -> dict[str, Any]:
    scheduler = getattr(engine, "lr_scheduler", None)
    scaler = getattr(engine.optimizer, "scaler", None)
    return {
        "counters": {k: getattr(engine, k) for k in _COUNTERS if hasattr(engine, k)},
        "lr_scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
    }


def save_checkpoint(engine: Any, path: Union[str, os.PathLike]) -> None:
    """Save the run of an engine from ``zds.initialize`` to the directory ``path`` (collective: every rank calls it):
    the model and ZeroAdam's state through ``zeroadam.checkpoint.save``, and beside them the lr scheduler, the
    engine's step counters and the fp16 loss scaler (see [Note: zds checkpoints])."""
    target = Path(path)
    checkpoint.save(target, engine.module, engine.optimizer)
    if _rank() == 0:
        _write_atomically(_engine_state(engine), target / ENGINE_FILE)
    _barrier()  # no rank returns (and maybe loads) before the file is there


def load_checkpoint(engine: Any, path: Union[str, os.PathLike]) -> None:
    """Resume an engine from ``zds.initialize`` from ``save_checkpoint``'s directory (collective): model, ZeroAdam's
    state, lr scheduler, step counters and fp16 loss scaler, as they were when it was saved."""
    target = Path(path)
    if not (target / ENGINE_FILE).exists():
        raise FileNotFoundError(
            f"zeroadam.integrations.deepspeed.load_checkpoint: {target / ENGINE_FILE} is missing: {target} was not "
            "written by zds.save_checkpoint, or its save was interrupted after the model and optimizer state; load "
            "those alone with zeroadam.checkpoint.load(path, engine.module, optimizer)"
        )
    checkpoint.load(target, engine.module, engine.optimizer)
    state = torch.load(target / ENGINE_FILE, map_location="cpu", weights_only=False)
    for k, v in state["counters"].items():
        setattr(engine, k, v)
    scheduler = getattr(engine, "lr_scheduler", None)
    if (scheduler is None) != (state["lr_scheduler"] is None):
        raise ValueError(
            "zeroadam.integrations.deepspeed.load_checkpoint: the checkpoint was saved "
            f"{'without' if state['lr_scheduler'] is None else 'with'} an lr scheduler and this engine has "
            f"{'one' if scheduler is not None else 'none'}; configure the same scheduler as the saved run"
        )
    if scheduler is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
    scaler = getattr(engine.optimizer, "scaler", None)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])


def save_16bit_model(engine: Any, gather: bool) -> Callable[..., bool]:
    """``engine.save_16bit_model`` for a model sharded by ``shard_model`` (stage 3), as DeepSpeed's ZeRO-3 does it:
    with ``stage3_gather_16bit_weights_on_model_save`` every rank gathers the weights and rank 0 writes
    ``torch.save(state_dict)`` to ``save_dir/save_filename`` (keys as ``model.state_dict()``, the parameters' dtype:
    bf16 / fp16 under those configs, on the CPU); without it nothing is written and it returns False."""

    def save(save_dir: str, save_filename: str = "pytorch_model.bin", exclude_frozen_parameters: bool = False) -> bool:
        path = Path(save_dir) / save_filename
        if not gather:
            warnings.warn(
                f"Did not save the model {path} because stage3_gather_16bit_weights_on_model_save is False",
                UserWarning,
                stacklevel=2,
            )
            return False
        state = full_state_dict(engine.module, rank0_only=True)  # collective
        if exclude_frozen_parameters:
            frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        if _rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(state, path)
        _barrier()
        return True

    return save
