"""Feature detection and optional imports, in one place.

Optional packages (triton, accelerate, transformers, deepspeed) are imported lazily through ``require`` so that a
missing package produces one clear message naming the extra that installs it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

__all__ = [
    "has_triton",
    "triton_interpret",
    "require",
    "has_package",
    "pin_memory_available",
    "has_fused_cpu_adamw",
    "is_dtensor",
]

_EXTRA_OF = {
    "triton": "triton",
    "accelerate": "accelerate",
    "transformers": "transformers",
    "deepspeed": "deepspeed",
    "tqdm": "demo",
    "matplotlib": "demo",
}


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(name: str, feature: str) -> ModuleType:
    """Import an optional package or raise ImportError naming the feature and the install command."""
    try:
        return importlib.import_module(name)
    except ImportError as e:  # pragma: no cover - depends on the environment
        extra = _EXTRA_OF.get(name, name)
        raise ImportError(
            f"zeroadam: {feature} needs the package {name!r}, which is not installed; "
            f"install it with: pip install 'zeroadam[{extra}]'"
        ) from e


def triton_interpret() -> bool:
    """Whether Triton runs in its CPU interpreter (must be set before any kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    if not has_package("triton"):
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install is treated as absent; the fallback path is exact
        return False
    return True


@functools.lru_cache(maxsize=None)
def pin_memory_available() -> bool:
    try:
        return torch.cuda.is_available() and torch.empty(1).pin_memory().is_pinned()
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def has_fused_cpu_adamw() -> bool:
    """torch ships a fused AdamW kernel for CPU tensors (torch >= 2.4)."""
    return hasattr(torch, "_fused_adamw_")


def is_dtensor(t: torch.Tensor) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (FSDP2's parameters), without importing it when distributed is absent."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
