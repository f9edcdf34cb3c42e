"""Shared test setup: Triton's CPU interpreter where there is no GPU, one intra-op thread, and the same global
random state at the start of every test."""
from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test module (or anything
# they import) touches triton. Without a GPU every kernel test runs in the interpreter; with one, the CUDA tests
# run the compiled kernels (tests/test_cuda.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests share a 2-core machine with other suites. With 2 threads, 50 fused-AdamW steps on four small tensors took
# 4.8 s under that load (threads spin waiting for each other), with 1 thread 0.03 s. Results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
