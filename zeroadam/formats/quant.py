"""Block-wise 8-bit quantization of Adam moments, in plain torch (the reference and the fallback).

[Note: code maps]
A block is 256 consecutive elements of a parameter's flattened index; each block stores one fp32 scale, its
absolute maximum, and one byte per element. The byte is a code of a *companded* value:

* ``exp_avg`` (signed):   m / scale = sign(c) * (|c| / 127) ** M_POWER,  c in [-127, 127] (int8)
* ``exp_avg_sq`` (unsigned): v / scale = (c / 255) ** V_POWER,           c in [0, 255]   (uint8)

Linear absmax codes cannot hold v's dynamic range: within one block v spans many decades, and every v below
scale/510 becomes 0, so m / (sqrt(v) + eps) explodes. Power companding spends codes near zero (the smallest
non-zero v is scale * 255 ** -V_POWER) while keeping a fixed relative step near the top.

The maps were chosen by the parameter error of 200 AdamW steps against the fp32 reference, with both moments
quantized after every step (``benchmarks/quant_maps.py`` → ``benchmarks/results/quant_maps.json``; README "Why
these code maps"; the candidate maps, which the library never uses, are in ``benchmarks/code_maps.py``). Power maps
beat linear absmax (3-6x less error) and dynamic-exponent maps on every gradient source. Within the power family,
(2, 4) ties the best pair on gradients recorded from a real language model (3.5e-2 relative, like (3, 5)), while
(3, 5) and (3, 4) do better on our synthetic heavy-tailed and sparse-row stress sources; a char-level GPT trained
with either ends within 0.04% of fp32. We keep (2, 4) because it encodes with square roots only (one and two), the
cheapest operation in both kernels; (3, 4) is the candidate if stress cases matter more than speed.

A non-zero v is never encoded as 0 (its code is at least 1): a zero second moment under a non-zero first
moment would turn the update into m / eps. Rounding a tiny v up only shrinks that element's step.

[Note: quantizing without divisions or table lookups]
The kernels repeat these fp32 operations exactly (``quantize`` and ``dequantize`` are their definition):

* decode: m = ((c * |c|) * M_UNIT) * scale and v = (((c * c) * (c * c)) * V_UNIT) * scale, with the fp32 units
  1 / 127**2 and 1 / 255**4: integer products in fp32 and two multiplies, where a lookup table vectorizes only
  as a gather. The top codes decode to exactly 1 (127**2 * M_UNIT and fp32(255**4) * V_UNIT round to 1), so
  the element that sets a block's scale round-trips exactly.
* encode: y = m * (1 / scale), a per-block reciprocal instead of a division per element (a plain division where
  the reciprocal of a subnormal scale overflows); and sqrt(v / scale) = sqrt(v) * (1 / sqrt(scale)), where
  sqrt(v) is the square root the update has already taken for its denominator.
Measured on one core of the 2-core EPYC (Zen 3), 20M elements, CPU time of the C++ kernel: 49 ms with the tables
and divisions, 30 ms this way; the gathers alone were 13 ms.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch

from zeroadam.options import BLOCK_SIZE
from zeroadam.sizes import num_blocks  # one scale per started block, the rule the estimator counts

__all__ = [
    "M_POWER",
    "V_POWER",
    "M_UNIT",
    "V_UNIT",
    "Quantized",
    "quantize",
    "dequantize",
    "num_blocks",
    "encode",
    "encode_blocks",
    "decode",
]

M_POWER = 2
V_POWER = 4

Kind = Literal["signed", "unsigned"]


class Quantized(NamedTuple):
    codes: torch.Tensor  # 1D int8 (signed) or uint8 (unsigned), one per element
    scales: torch.Tensor  # 1D fp32, one per 256-element block (absmax)


def _block_absmax(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    nb = num_blocks(n)
    pad = nb * BLOCK_SIZE - n
    xa = x.abs()
    if pad:
        xa = torch.nn.functional.pad(xa, (0, pad))
    return xa.view(nb, BLOCK_SIZE).amax(dim=1)


def _per_element(scales: torch.Tensor, n: int) -> torch.Tensor:
    return scales.repeat_interleave(BLOCK_SIZE)[:n]


# fp32 (rounded from fp64, as the kernels round their constants): decode's unit steps, see [Note: quantizing
# without divisions or table lookups].
M_UNIT = torch.tensor(1.0 / 127**2, dtype=torch.float32)
V_UNIT = torch.tensor(1.0 / 255**4, dtype=torch.float32)


def quantize(x: torch.Tensor, kind: Kind) -> Quantized:
    """Quantize a 1D fp32 tensor whose element 0 starts a block."""
    assert x.dim() == 1 and x.dtype == torch.float32
    scales = _block_absmax(x)
    return Quantized(encode_blocks(x, scales, kind), scales)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root, as the kernels take it: torch's vectorized CPU sqrt is 1 ulp off
    for ~15% of inputs, enough to flip y = 0.25 - 1 ulp (common: a reciprocal and a bf16 gradient) to the other
    code. An fp64 root rounded to fp32 is correctly rounded."""
    return torch.sqrt(x.double()).float()


def encode_blocks(x: torch.Tensor, scales: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Codes of a 1D fp32 tensor (element 0 starts a block) under the given per-block scales, normally the blocks'
    absmax (``quantize``); the kernels repeat exactly these operations."""
    per = _per_element(scales, x.numel())
    safe = torch.where(per > 0, per, torch.ones_like(per))  # an all-zero block: its zeros stay 0
    if kind == "signed":
        inv = torch.reciprocal(safe)
        y = torch.where(torch.isinf(inv), x / safe, x * inv)
        return encode(y, kind)
    y = _sqrt(x) * torch.reciprocal(_sqrt(safe))  # sqrt(v / scale)
    # The floor looks at v itself: sqrt(v / scale) underflows to 0 for v below ~1e-45 * scale.
    return _encode_root(y, positive=x > 0)


def encode(y: torch.Tensor, kind: Kind, positive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Codes of normalized moments y = m / scale or v / scale under the stored maps; ``positive`` marks the
    elements whose v is non-zero (default: y > 0). ``encode_blocks`` is the form the kernels repeat."""
    if kind == "signed":
        c = torch.round(_sqrt(y.abs()) * 127.0)
        return (c * torch.sign(y)).to(torch.int8)
    return _encode_root(_sqrt(y), positive=y > 0 if positive is None else positive)


def _encode_root(y: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """uint8 codes from sqrt(v / scale): round(255 * sqrt(y)), at least 1 where v > 0."""
    c = torch.round(_sqrt(y) * 255.0)
    return torch.where(positive, c.clamp(min=1.0), c).to(torch.uint8)


def _code_products(codes: torch.Tensor, kind: Kind) -> torch.Tensor:
    """c * |c| (signed) or c**4 (unsigned) in fp32: exact below 2**24, then rounded once."""
    c = codes.to(torch.float32)
    if kind == "signed":
        return c * c.abs()
    c2 = c * c
    return c2 * c2


def decode(codes: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Normalized values of codes: m / scale or v / scale."""
    return _code_products(codes, kind) * (M_UNIT if kind == "signed" else V_UNIT)


def dequantize(q: Quantized, kind: Kind) -> torch.Tensor:
    return decode(q.codes, kind) * _per_element(q.scales, q.codes.numel())
