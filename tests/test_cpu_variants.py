"""The code paths of other CPUs, on this one: a numerical subset of the suite under torch's other vector kernels
(ATEN_CPU_CAPABILITY) and the compiled kernel built for other targets (ZEROADAM_CPU_ARCH), each in a subprocess.

The suite's tolerances were once set on one CPU and failed on another (an Intel Xeon's AVX-512 against an AMD
EPYC's). torch picks its kernels per process from ATEN_CPU_CAPABILITY (default, avx2, avx512 where the CPU has
it), the compiled kernel from ZEROADAM_CPU_ARCH (generic, avx2, avx512, native): running both ends of each here
catches a tolerance that holds on one instruction set only. About 40 s on 2 cores, most of it the two extra
kernel builds, which torch's extension cache keeps for the next run.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zeroadam.kernels import build

ROOT = Path(__file__).resolve().parent.parent

# Parity with update_torch on a format of each kind (int8 with master-less fp16, the Xeon's failure; bf16 moments
# with a compact master; plain fp32), the pre-pass, and the optimizer against torch.optim.AdamW.
SUBSET = [
    "tests/test_cpu_kernels.py::test_matches_update_torch[int8-float16-none-torch.float16]",
    "tests/test_cpu_kernels.py::test_matches_update_torch[bf16-bfloat16-compact-torch.bfloat16]",
    "tests/test_cpu_kernels.py::test_matches_update_torch[fp32-float32-param-torch.float32]",
    "tests/test_cpu_kernels.py::test_small_beta1_takes_the_other_lerp_form",
    "tests/test_cpu_kernels.py::test_sq_sum_matches_fp64",
    "tests/test_cpu_kernels.py::test_sq_sum_non_finite_and_extremes",
    "tests/test_optimizer.py::test_fp32_matches_adamw_two_groups",
    "tests/test_optimizer.py::test_grad_scaler_with_cpu_autocast_matches_adamw",
]

# (ATEN_CPU_CAPABILITY, ZEROADAM_CPU_ARCH); None leaves the variable unset (this CPU's best).
VARIANTS = [("default", None), ("avx2", None), (None, "generic"), (None, "avx2"), ("default", "generic")]

# One kernel run per state format; its outputs are hashed to compare builds bit for bit.
DIGEST_SCRIPT = """
import hashlib, torch
from zeroadam.kernels import cpu
from zeroadam.formats.state import Master, Moments
from zeroadam.options import GroupHyper
from zeroadam.update.contract import Run, StepScalars
h = hashlib.sha256()
hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
for fmt, dtype, kind in [("int8", torch.float16, "none"), ("bf16", torch.bfloat16, "compact"), ("fp32", torch.float32, "param")]:
    gen = torch.Generator().manual_seed(0)
    n = 100_003
    param = (torch.randn(n, generator=gen) * 0.5).to(dtype)
    moments, master = Moments.zeros(fmt, n, torch.device("cpu")), Master.create(kind, param)
    for step in range(1, 4):
        grad = torch.randn(n, generator=gen).to(dtype)
        assert cpu.update_compiled(Run(param, grad, moments, master, 0), StepScalars(hyper, step, 0.37, 1))
    for t in [param, *moments.tensors().values(), *master.tensors().values()]:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
g = torch.randn(1_000_003, generator=torch.Generator().manual_seed(1))
h.update(float(cpu.sq_sum_compiled(g)).hex().encode())
print(h.hexdigest())
"""


def _env(aten: "str | None", arch: "str | None") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", build.ARCH_ENV)}
    if aten is not None:
        env["ATEN_CPU_CAPABILITY"] = aten
    if arch is not None:
        env[build.ARCH_ENV] = arch
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _skip_unless_runnable(arch: "str | None") -> None:
    if arch is None:
        return
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(build.ARCH_ENV, arch)
            build.cpu_arch()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def kernel() -> None:
    from zeroadam.kernels import cpu

    if cpu.compiled_kernel() is None:
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler or ninja)")


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("aten,arch", VARIANTS, ids=lambda v: str(v))
def test_numerical_subset(aten: "str | None", arch: "str | None") -> None:
    _skip_unless_runnable(arch)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUBSET]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(aten, arch), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"ATEN_CPU_CAPABILITY={aten} {build.ARCH_ENV}={arch}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"


@pytest.mark.usefixtures("kernel")
def test_kernel_results_do_not_depend_on_the_target() -> None:
    # Every operation of the kernel is correctly rounded (division, sqrt, rint, std::fma) and -ffp-contract=off
    # forbids contracting the rest, so vector width and instruction set must not change a single bit.
    digests = {}
    for arch in ("generic", "avx2", "avx512", "native"):
        try:
            _skip_unless_runnable(arch)
        except pytest.skip.Exception:
            continue
        r = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], cwd=ROOT, env=_env(None, arch), capture_output=True,
                           text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        digests[arch] = r.stdout.strip()
    assert len(digests) >= 2 and len(set(digests.values())) == 1, digests
