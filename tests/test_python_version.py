"""The oldest Python that ``requires-python`` in pyproject.toml promises can read every module we ship.

``import zeroadam`` once failed on 3.9 although pyproject.toml allowed it: ``@dataclass(kw_only=True)`` is 3.10.
These tests take the version from pyproject.toml, so raising or lowering it there changes what they check.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What ships (zeroadam, zeroadam.triton_kernels, zeroadam.integrations) and what must run on the same Python to
# test and measure it.
SOURCE_DIRS = ("zeroadam", "triton_kernels", "integrations", "tests", "benchmarks")

# Keyword arguments that are valid syntax on any Python 3 but raise TypeError before the version named:
# feature_version in ast.parse only checks grammar, so these are looked for by name.
NEWER_KEYWORDS: dict[tuple[str, str], tuple[int, int]] = {
    ("dataclass", "kw_only"): (3, 10),
    ("dataclass", "slots"): (3, 10),
    ("field", "kw_only"): (3, 10),
    ("zip", "strict"): (3, 10),
}


def oldest_python() -> tuple[int, int]:
    """The lower bound of ``requires-python``, read with a pattern because tomllib is itself 3.11+."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', text, re.MULTILINE)
    assert match, "pyproject.toml should state requires-python as \">=3.N\""
    return int(match.group(1)), int(match.group(2))


def python_sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, "the source folders moved; update SOURCE_DIRS"
    return files


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):  # dataclasses.dataclass(...), dataclasses.field(...)
        return func.attr
    return None


def test_requires_python_is_at_least_3_10() -> None:
    assert oldest_python() >= (3, 10), "the package uses @dataclass(kw_only=True) and other 3.10 features"


@pytest.mark.parametrize("path", python_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_parses_on_the_oldest_supported_python(path: Path) -> None:
    oldest = oldest_python()
    # Raises SyntaxError naming the line for grammar newer than `oldest` (except*, PEP 695 generics, ...).
    tree = ast.parse(path.read_text(), filename=str(path), feature_version=oldest)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _called_name(node)
        for keyword in node.keywords:
            needs = NEWER_KEYWORDS.get((name, keyword.arg))
            assert needs is None or needs <= oldest, (
                f"{path.relative_to(ROOT)}:{node.lineno}: {name}({keyword.arg}=...) needs Python "
                f"{needs[0]}.{needs[1]}, but requires-python allows {oldest[0]}.{oldest[1]}"
            )
