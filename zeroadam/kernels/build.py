"""Building adamw.cpp: the target CPU (``ZEROADAM_CPU_ARCH``), the compiler flags, and the check that the ctypes
structures in ``zeroadam.kernels.cpu`` lay out their fields as the C++ structs do.

The source ships as package data next to this file and is compiled at first use by torch's extension builder
(ninja), so compiler messages name ``adamw.cpp`` and its lines. Each target CPU is a separate build in torch's
extension cache (``~/.cache/torch_extensions`` or ``TORCH_EXTENSIONS_DIR``).

``ZEROADAM_CPU_ARCH`` chooses the instruction set:

* ``native`` (default): ``-march=native``, the fastest code for this CPU; if the compiler rejects that, the
  build falls back to the compiler's default target.
* ``avx512``: ``-march=x86-64-v4`` (AVX-512 F/BW/CD/DQ/VL), ``avx2``: ``-march=x86-64-v3`` (AVX2, FMA),
  ``generic``: ``-march=x86-64`` (SSE2 only). These run the code paths of other x86-64 CPUs on this one (the
  test suite does, see tests/test_cpu_variants.py); ``avx512`` and ``avx2`` need an x86-64 CPU with those
  features, ``generic`` on any other machine is the compiler's default target.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
from pathlib import Path
from typing import Literal, Type, get_args

__all__ = ["CpuArch", "ARCH_ENV", "SOURCE", "LayoutError", "cpu_arch", "build_library", "check_layout"]

CpuArch = Literal["native", "avx512", "avx2", "generic"]
ARCH_ENV = "ZEROADAM_CPU_ARCH"
SOURCE = Path(__file__).with_name("adamw.cpp")

# -ffp-contract=off: FMA only where written (see [Note: matching update_torch] in cpu.py); -fno-math-errno lets
# sqrt vectorize. Without OpenMP the kernel runs on one thread.
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
_OPENMP = "-fopenmp"
# -mprefer-vector-width=512: GCC tunes Intel's AVX-512 server CPUs (-march=native on a Xeon) for 256-bit vectors and
# then emits no zmm at all (objdump of an icelake-server build: 0 zmm, 2067 ymm instructions). The int8 and bf16
# blocks are bound by instruction throughput, not memory, so twice the lanes per instruction is what they need:
# 4M int8 elements on one Zen 4 core, icelake-server tuning, 6.5 ms with ymm against 5.8 ms with zmm (a busy VM).
# An x86 CPU without AVX-512 ignores the preference; other compilers' targets do not know the option.
_WIDE = "-mprefer-vector-width=512"
_ARCH_FLAGS: dict[str, str] = {
    "native": "-march=native",
    "avx512": "-march=x86-64-v4",
    "avx2": "-march=x86-64-v3",
    "generic": "-march=x86-64",
}
# The /proc/cpuinfo flags an x86-64-v3 / v4 build executes (GCC's definition of the levels); without them it
# would die of SIGILL at the first vector instruction.
_NEEDS = {
    "avx2": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
    "avx512": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq",
               "avx512vl"},
}


class LayoutError(RuntimeError):
    """The ctypes structures and the C++ structs disagree: the kernel would read wrong pointers."""


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def _cpu_flags() -> str:
    """The flags line of /proc/cpuinfo ("Features" on ARM), or the machine name where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def cpu_arch() -> CpuArch:
    """The target named by ``ZEROADAM_CPU_ARCH``; raises ValueError for a value this machine cannot run."""
    value = os.environ.get(ARCH_ENV, "native").strip().lower() or "native"
    allowed = get_args(CpuArch)
    if value not in allowed:
        raise ValueError(
            f"zeroadam: {ARCH_ENV}={os.environ[ARCH_ENV]!r} is not a CPU target; set it to one of "
            f"{', '.join(allowed)} (or unset it for native)"
        )
    if value in _NEEDS:
        if not _is_x86():
            raise ValueError(
                f"zeroadam: {ARCH_ENV}={value!r} needs an x86-64 CPU, this is {platform.machine()}; use native or generic"
            )
        missing = _NEEDS[value] - set(_cpu_flags().split(":", 1)[-1].split())
        if missing:
            raise ValueError(
                f"zeroadam: {ARCH_ENV}={value!r} needs CPU features this CPU lacks ({', '.join(sorted(missing))}); "
                f"use {'avx2, ' if value == 'avx512' else ''}generic or native"
            )
    return value  # type: ignore[return-value]


def _source_tag() -> str:
    return hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:8]


def _attempts(arch: CpuArch) -> list[tuple[str, list[str]]]:
    """(module name, extra flags) to try in order. A native build is named by a digest of this CPU's feature flags:
    a -march=native module loaded on another CPU kind from a shared cache would die of SIGILL. The explicit targets
    are portable across CPUs that have their features, and fail loudly rather than build something else. Every name
    ends with a digest of the source: two installs of different versions sharing one extension cache (two virtual
    environments, a checkout beside a release) otherwise rebuilt the same module in turn, and a process could load
    the other's library while it was being replaced (the layout check then refused it, at best)."""
    src = _source_tag()
    if arch == "native":
        tag = hashlib.sha1(_cpu_flags().encode()).hexdigest()[:8]
        return [
            (f"zeroadam_cpu_{tag}_{src}", [_ARCH_FLAGS["native"], *([_WIDE] if _is_x86() else []), _OPENMP]),
            (f"zeroadam_cpu_openmp_{src}", [_OPENMP]),  # the compiler rejected -march=native
            (f"zeroadam_cpu_serial_{src}", []),  # ... or has no OpenMP
        ]
    march = [_ARCH_FLAGS[arch]] if _is_x86() else []  # generic elsewhere: the compiler's default target
    if arch == "avx512":
        march.append(_WIDE)
    return [(f"zeroadam_cpu_{arch}_{src}", march + [_OPENMP]), (f"zeroadam_cpu_{arch}_serial_{src}", march)]


def build_library(arch: CpuArch) -> str:
    """The path of the compiled shared library for ``arch``, built now or found in torch's extension cache; raises
    RuntimeError with every attempt's error when nothing builds."""
    from torch.utils.cpp_extension import load

    errors = []
    for name, extra in _attempts(arch):
        try:
            return load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=_BASE_FLAGS + extra,
                extra_ldflags=[_OPENMP] if _OPENMP in extra else [],
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, or a rejected flag
            errors.append(f"[{' '.join(extra) or 'plain'}] {type(e).__name__}: {str(e).strip()[-2000:]}")
    raise RuntimeError("\n".join(errors))


def _parse_layout(text: str) -> dict[str, dict[str, tuple[int, int]]]:
    """zeroadam_layout()'s text -> {struct: {field: (offset, size)}}, the struct's size under "size"."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for line in text.strip().splitlines():
        struct, _, rest = line.partition(" ")
        fields: dict[str, tuple[int, int]] = {}
        for item in filter(None, rest.split(";")):
            key, _, value = item.partition("=")
            offset, _, size = value.partition("+")
            fields[key] = (int(offset), int(size or 0))
        out[struct] = fields
    return out


def check_layout(text: str, structs: dict[str, Type[ctypes.Structure]]) -> None:
    """Compare the C++ layout (``zeroadam_layout()``) with the ctypes structures, named by C++ struct; a mismatch
    would hand the kernel wrong pointers, so it raises LayoutError (a RuntimeError) naming the struct and the field."""
    layout = _parse_layout(text)
    for cname, cls in structs.items():
        if cname not in layout:
            raise LayoutError(f"zeroadam: adamw.cpp describes no struct {cname} (ctypes {cls.__name__})")
        cpp = dict(layout[cname])
        size = cpp.pop("size")[0]
        py = {name: (getattr(cls, name).offset, getattr(cls, name).size) for name, *_ in cls._fields_}
        for name in sorted(set(cpp) | set(py), key=lambda n: cpp.get(n, py.get(n, (0, 0)))[0]):
            if cpp.get(name) != py.get(name):
                where = lambda d: "absent" if name not in d else "offset {} size {}".format(*d[name])  # noqa: E731
                raise LayoutError(
                    f"zeroadam: ctypes {cls.__name__} does not match the C++ struct {cname} in adamw.cpp at field "
                    f"{name!r}: C++ {where(cpp)}, Python {where(py)}; edit both to agree"
                )
        if ctypes.sizeof(cls) != size:
            raise LayoutError(
                f"zeroadam: ctypes {cls.__name__} is {ctypes.sizeof(cls)} bytes, the C++ struct {cname} {size}; "
                "edit both to agree"
            )
