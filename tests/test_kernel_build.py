"""zeroadam.kernels.build: the CPU target from ZEROADAM_CPU_ARCH, and the ctypes-vs-C++ layout check."""
from __future__ import annotations

import ctypes

import pytest

from zeroadam.kernels import build
from zeroadam.kernels import cpu as cpu_kernels


@pytest.fixture
def kernel_lib() -> ctypes.CDLL:
    if cpu_kernels.compiled_kernel() is None:
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler or ninja)")
    lib = ctypes.CDLL(build.build_library(build.cpu_arch()))  # cached: the build above made it
    lib.zeroadam_layout.restype = ctypes.c_char_p
    return lib


def test_layout_of_the_bound_structs_matches(kernel_lib: ctypes.CDLL) -> None:
    build.check_layout(kernel_lib.zeroadam_layout().decode(), cpu_kernels._STRUCTS)


def test_layout_mismatch_names_struct_and_field(kernel_lib: ctypes.CDLL) -> None:
    text = kernel_lib.zeroadam_layout().decode()
    fields = list(cpu_kernels._RunArgs._fields_)
    i = [name for name, _ in fields].index("param_dtype")
    fields[i] = ("param_dtype", ctypes.c_int64)  # a field widened on one side only

    class WrongRun(ctypes.Structure):
        _fields_ = fields

    with pytest.raises(build.LayoutError, match=r"WrongRun.*ZaRun.*'param_dtype'.*offset 72 size 4.*size 8"):
        build.check_layout(text, {"ZaRun": WrongRun})

    class ShortCoefficients(ctypes.Structure):
        _fields_ = cpu_kernels._Coefficients._fields_[:-1]

    with pytest.raises(build.LayoutError, match=r"ZaCoefficients.*'grad_scale'.*Python absent"):
        build.check_layout(text, {"ZaCoefficients": ShortCoefficients})
    with pytest.raises(build.LayoutError, match="no struct ZaNothing"):
        build.check_layout(text, {"ZaNothing": cpu_kernels._Coefficients})


def test_layout_mismatch_stops_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # A wrong layout must fail loudly, not fall back to torch with a warning as a missing compiler does.
    class WrongCoefficients(ctypes.Structure):
        _fields_ = [("decay", ctypes.c_float)] + cpu_kernels._Coefficients._fields_[1:]

    if cpu_kernels.compiled_kernel() is None:
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler or ninja)")
    monkeypatch.setitem(cpu_kernels._STRUCTS, "ZaCoefficients", WrongCoefficients)
    cpu_kernels.compiled_kernel.cache_clear()
    try:
        with pytest.raises(build.LayoutError, match="'decay'"):
            cpu_kernels.compiled_kernel()
    finally:
        monkeypatch.undo()
        cpu_kernels.compiled_kernel.cache_clear()


@pytest.mark.parametrize("value", ["avx-512", "sse4", "x86-64-v3"])
def test_invalid_arch_raises(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(build.ARCH_ENV, value)
    with pytest.raises(ValueError, match=rf"ZEROADAM_CPU_ARCH={value!r}.*native, avx512, avx2, generic"):
        build.cpu_arch()
    cpu_kernels.compiled_kernel.cache_clear()
    try:
        with pytest.raises(ValueError, match="ZEROADAM_CPU_ARCH"):  # not swallowed into the torch fallback
            cpu_kernels.compiled_kernel()
    finally:
        monkeypatch.undo()
        cpu_kernels.compiled_kernel.cache_clear()


def test_arch_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(build.ARCH_ENV, raising=False)
    assert build.cpu_arch() == "native"
    monkeypatch.setenv(build.ARCH_ENV, " Generic ")
    assert build.cpu_arch() == "generic"
    # Each target is its own build, and the explicit ones never silently drop their -march.
    names = {arch: [name for name, _ in build._attempts(arch)] for arch in ("native", "avx512", "avx2", "generic")}
    assert len({n for ns in names.values() for n in ns}) == sum(len(ns) for ns in names.values())
    if build._is_x86():
        assert all("-march=x86-64-v3" in flags for _, flags in build._attempts("avx2"))


def test_build_names_follow_the_source(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # Two installs of different sources sharing one extension cache must not build into the same module.
    names = [name for arch in ("native", "avx2") for name, _ in build._attempts(arch)]
    other = tmp_path / "adamw.cpp"
    other.write_bytes(build.SOURCE.read_bytes() + b"\n// another version\n")
    monkeypatch.setattr(build, "SOURCE", other)
    assert not {name for arch in ("native", "avx2") for name, _ in build._attempts(arch)} & set(names)


def test_arch_beyond_this_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "_cpu_flags", lambda: "flags : fpu sse sse2 avx")
    monkeypatch.setattr(build, "_is_x86", lambda: True)
    monkeypatch.setenv(build.ARCH_ENV, "avx2")
    with pytest.raises(ValueError, match=r"'avx2' needs CPU features this CPU lacks \(avx2, bmi1"):
        build.cpu_arch()
