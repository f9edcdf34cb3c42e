"""zeroadam.formats.quant against a brute-force reference written element by element in plain Python.

The reference finds each code by trying every code of the map and keeping the one nearest in companded space;
scales are the Python ``max`` of a block's absolute values. Sizes 1, 255, 256, 257 and 4097 run the partial-block
paths; all-zero blocks, blocks with one huge outlier and subnormal values run the edge cases of the maps.
"""
from __future__ import annotations

import math

import code_maps  # benchmarks/code_maps.py: the maps the study compares, not used by the library
import pytest
import torch

from zeroadam.formats import quant
from zeroadam.options import BLOCK_SIZE

SIZES = [1, 255, 256, 257, 4097]
TOP = {"signed": 127, "unsigned": 255}
POWER = {"signed": quant.M_POWER, "unsigned": quant.V_POWER}
CODE_DTYPE = {"signed": torch.int8, "unsigned": torch.uint8}
# fp32 division and roots differ from the float64 reference by a few ulps: in code units (0..255) that is below
# 1e-4, so a reference code within 1e-4 of a rounding midpoint accepts either neighbour.
TIE_TOL = 1e-4


# ----------------------------------------------------------------------------- brute-force reference


def brute_scales(values: list[float]) -> list[float]:
    return [max(abs(v) for v in values[i : i + BLOCK_SIZE]) for i in range(0, len(values), BLOCK_SIZE)]


def brute_code_options(y: float, kind: str, power: int) -> set[int]:
    """Every code nearest (within TIE_TOL) to the normalized value y in companded space, by trying all codes."""
    top = TOP[kind]
    target = abs(y) ** (1.0 / power) * top  # companded magnitude, in code units
    lowest = 1 if (kind == "unsigned" and y > 0) else 0  # a non-zero v never gets code 0
    dists = {c: abs(c - target) for c in range(lowest, top + 1)}
    best = min(dists.values())
    mags = {c for c, d in dists.items() if d <= best + TIE_TOL}
    sign = -1 if y < 0 else 1
    return {sign * c for c in mags}


def brute_quantize(values: list[float], kind: str, power: int) -> tuple[list[float], list[set[int]]]:
    scales = brute_scales(values)
    options = []
    for i, v in enumerate(values):
        s = scales[i // BLOCK_SIZE]
        options.append(brute_code_options(v / s if s > 0 else 0.0, kind, power))
    return scales, options


def brute_decode(code: int, scale: float, kind: str, power: int) -> float:
    t = abs(code) / TOP[kind]
    return math.copysign(t**power, code) * scale


# ----------------------------------------------------------------------------- test data


def moments_like(n: int, kind: str, seed: int) -> torch.Tensor:
    """exp_avg-like (signed, magnitudes over decades) or exp_avg_sq-like (its square) values."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=g) * torch.exp(2.0 * torch.randn(n, generator=g))
    return m if kind == "signed" else m * m


def special_blocks(kind: str) -> dict[str, torch.Tensor]:
    """Named tensors of three blocks or fewer that hit the edge cases of the maps."""
    base = moments_like(3 * BLOCK_SIZE, kind, seed=7)
    zero_block = base.clone()
    zero_block[BLOCK_SIZE : 2 * BLOCK_SIZE] = 0.0
    outlier = base.clone()
    outlier[BLOCK_SIZE + 17] = 1e6 if kind == "unsigned" else -1e6
    tiny = base.clone()
    tiny[5] = 1e-30 if kind == "unsigned" else -1e-30  # ~1e-34 of its block's scale
    tiny[BLOCK_SIZE + 3] = 1e-44 if kind == "unsigned" else -1e-44  # subnormal, in a block of small values
    tiny[BLOCK_SIZE : 2 * BLOCK_SIZE] *= 1e-30  # a whole block of small values keeps its relative precision
    return {
        "all_zero": torch.zeros(300),
        "zero_middle_block": zero_block,
        "one_huge_outlier": outlier,
        "tiny_and_subnormal": tiny,
        "constant": torch.full((257,), 3.0 if kind == "unsigned" else -3.0),
    }


def _cases(kind: str) -> list[tuple[str, torch.Tensor]]:
    return [(f"n={n}", moments_like(n, kind, seed=n)) for n in SIZES] + list(special_blocks(kind).items())


CASES = [(kind, name, x) for kind in ("signed", "unsigned") for name, x in _cases(kind)]
IDS = [f"{kind}-{name}" for kind, name, _ in CASES]


# ----------------------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("kind,name,x", CASES, ids=IDS)
def test_quantize_matches_brute_force(kind: str, name: str, x: torch.Tensor) -> None:
    q = quant.quantize(x, kind)  # type: ignore[arg-type]
    assert q.codes.dtype == CODE_DTYPE[kind] and q.codes.shape == (x.numel(),)
    assert q.scales.dtype == torch.float32 and q.scales.shape == (quant.num_blocks(x.numel()),)

    values = x.tolist()
    scales, options = brute_quantize(values, kind, POWER[kind])
    assert q.scales.tolist() == scales  # exactly the block absmax

    codes = q.codes.tolist()
    bad = [(i, values[i], codes[i], sorted(options[i])) for i in range(len(values)) if codes[i] not in options[i]]
    assert not bad, f"{len(bad)} codes differ from the nearest in companded space, first: {bad[:5]}"

    deq = quant.dequantize(q, kind).tolist()  # type: ignore[arg-type]
    expect = [brute_decode(c, scales[i // BLOCK_SIZE], kind, POWER[kind]) for i, c in enumerate(codes)]
    for i, (a, b) in enumerate(zip(deq, expect)):
        assert a == pytest.approx(b, rel=1e-6, abs=0.0), f"element {i}: dequantized {a}, reference {b}"


@pytest.mark.parametrize("kind,name,x", CASES, ids=IDS)
def test_roundtrip_error_bound(kind: str, name: str, x: torch.Tensor) -> None:
    """|x - x^| is at most what half a code step in companded space allows; block maxima are exact."""
    q = quant.quantize(x, kind)  # type: ignore[arg-type]
    xh = quant.dequantize(q, kind)  # type: ignore[arg-type]
    s = q.scales.double().repeat_interleave(BLOCK_SIZE)[: x.numel()]
    xd = x.double()
    y = torch.where(s > 0, xd / s.clamp(min=1e-300), torch.zeros_like(xd))
    a = y.abs() ** (1.0 / POWER[kind])
    h = 0.5 / TOP[kind]
    slack = 1e-6 * s
    if kind == "signed":
        # a^2 - b^2 = (a - b)(a + b), |a - b| <= h
        bound = s * h * (2 * a + h)
        assert torch.equal(torch.sign(xh[xh != 0]), torch.sign(x[xh != 0]))
    else:
        # a^4 - b^4 = (a - b)(a + b)(a^2 + b^2); below half a code the floor (code 1) rounds v up instead.
        bound = s * h * (2 * a + h) * (a * a + (a + h) ** 2)
        floored = (xd > 0) & (a * TOP[kind] < 0.5)
        bound = torch.where(floored, s * TOP[kind] ** -4.0, bound)
        assert bool((xh.double()[floored] >= xd[floored]).all()), "the floor may only round v up"
        # relative error bounded wherever the code is at least 8: the fixed relative step near the top
        big = a * TOP[kind] >= 8
        rel = ((xh.double() - xd).abs() / xd.clamp(min=1e-300))[big]
        rel_bound = ((a + h) / a) ** 4 - 1
        assert bool((rel <= rel_bound[big] + 1e-5).all())
    err = (xh.double() - xd).abs()
    assert bool((err <= bound + slack).all()), f"max excess {float((err - bound).max()):.3e}"

    nz = q.scales > 0
    if bool(nz.any()):
        blocks = torch.nn.functional.pad(x.abs(), (0, (-x.numel()) % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
        arg = blocks.argmax(dim=1)[nz] + torch.nonzero(nz).view(-1) * BLOCK_SIZE
        assert torch.equal(xh[arg], x[arg]), "the element that sets a block's scale must round-trip exactly"


@pytest.mark.parametrize("kind,name,x", CASES, ids=IDS)
def test_positive_v_never_code_zero(kind: str, name: str, x: torch.Tensor) -> None:
    q = quant.quantize(x, kind)  # type: ignore[arg-type]
    if kind == "unsigned":
        assert bool((q.codes[x > 0] > 0).all())
        assert bool((quant.dequantize(q, kind)[x > 0] > 0).all())  # type: ignore[arg-type]
    assert bool((q.codes[x == 0] == 0).all())


@pytest.mark.parametrize("kind,name,x", CASES, ids=IDS)
def test_requantize_is_stable(kind: str, name: str, x: torch.Tensor) -> None:
    """Storing a loaded state again without an update changes nothing (scales and codes are fixed points)."""
    q = quant.quantize(x, kind)  # type: ignore[arg-type]
    q2 = quant.quantize(quant.dequantize(q, kind), kind)  # type: ignore[arg-type]
    assert torch.equal(q2.scales, q.scales)
    assert torch.equal(q2.codes, q.codes)


def test_quantize_rejects_other_layouts() -> None:
    with pytest.raises(AssertionError):
        quant.quantize(torch.zeros(4, 4), "signed")
    with pytest.raises(AssertionError):
        quant.quantize(torch.zeros(16, dtype=torch.float64), "signed")


# ----------------------------------------------------------------------------- the comparison maps


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
@pytest.mark.parametrize("power", [1, 2, 3, 4, 5])
def test_encode_power_matches_brute_force(kind: str, power: int) -> None:
    g = torch.Generator().manual_seed(power)
    y = torch.rand(600, generator=g) ** 6  # many values near zero, where the maps differ most
    y[:3] = torch.tensor([0.0, 1.0, 1e-30])
    if kind == "signed":
        y = y * torch.where(torch.rand(600, generator=g) < 0.5, -1.0, 1.0)
    codes = code_maps.encode_power(y, kind, power).tolist()  # type: ignore[arg-type]
    for yi, c in zip(y.tolist(), codes):
        assert c in brute_code_options(yi, kind, power), (yi, c)
    dec = code_maps.decode_power(torch.tensor(codes, dtype=CODE_DTYPE[kind]), kind, power).tolist()  # type: ignore[arg-type]
    for c, d in zip(codes, dec):
        assert d == pytest.approx(brute_decode(c, 1.0, kind, power), rel=1e-6, abs=0.0)


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_stored_maps_equal_power_maps(kind: str) -> None:
    """quant.encode / decode (what the kernels repeat) are the power maps the study in benchmarks/ measured."""
    y = quant.dequantize(quant.quantize(moments_like(4097, kind, seed=11), kind), kind)  # type: ignore[arg-type]
    y = y / y.abs().max()
    y = torch.cat([y, torch.rand(2000, generator=torch.Generator().manual_seed(5))])
    if kind == "signed":
        y = torch.cat([y, -y])
    c_stored = quant.encode(y, kind)  # type: ignore[arg-type]
    c_power = code_maps.encode_power(y, kind, POWER[kind])  # type: ignore[arg-type]
    diff = c_stored.int() - c_power.int()
    # sqrt(sqrt(y)) and y ** 0.25 may differ by an ulp, which flips a code only exactly at a midpoint
    assert int(diff.abs().max()) <= 1 and int((diff != 0).sum()) <= 2
    codes = torch.arange(-127, 128, dtype=torch.int8) if kind == "signed" else torch.arange(256).to(torch.uint8)
    assert torch.allclose(quant.decode(codes, kind), code_maps.decode_power(codes, kind, POWER[kind]), rtol=1e-6, atol=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["signed", "unsigned"])
def test_encode_table_is_nearest_entry(kind: str) -> None:
    table = code_maps.dynamic_map(kind)  # type: ignore[arg-type]
    values = table.tolist()
    assert values == sorted(values) and values[-1] == 1.0 and 0.0 in values
    g = torch.Generator().manual_seed(3)
    y = torch.rand(500, generator=g) ** 4
    if kind == "signed":
        y = y * torch.where(torch.rand(500, generator=g) < 0.5, -1.0, 1.0)
    idx = code_maps.encode_table(y, table).tolist()
    for yi, i in zip(y.tolist(), idx):
        best = min(abs(t - yi) for t in values)
        assert abs(values[i] - yi) <= best + 1e-7, (yi, values[i])
    assert torch.equal(code_maps.decode_table(torch.tensor(idx), table), table[idx])


def test_positive_v_below_scale_times_min_subnormal_keeps_code_1() -> None:
    x = torch.tensor([1e4, 1e-45, 1e-41])
    assert bool((quant.quantize(x, "unsigned").codes > 0).all())


@pytest.mark.parametrize("kind,size", [("unsigned", 256), ("signed", 255)])
def test_dynamic_map_fits_in_8_bits(kind: str, size: int) -> None:
    assert code_maps.dynamic_map(kind).numel() == size  # type: ignore[arg-type]
