"""The 8-bit code maps that ``benchmarks/quant_maps.py`` compares with the stored ones, as pure tensor functions.

``zeroadam.formats.quant`` stores moments under power maps with fixed powers (M_POWER, V_POWER) and repeats only
those; the general power maps of any power and the dynamic-exponent table here exist for the comparison and for
the tests that check the stored maps against it (``tests/test_quant.py``). Benchmark scripts import this module as
``code_maps`` (their folder is first on ``sys.path``); pytest puts ``benchmarks/`` on the path for the tests
(``pythonpath`` in pyproject.toml).
"""
from __future__ import annotations

from typing import Literal

import torch

__all__ = ["Kind", "encode_power", "decode_power", "dynamic_map", "encode_table", "decode_table"]

Kind = Literal["signed", "unsigned"]

def encode_power(y: torch.Tensor, kind: Kind, power: int) -> torch.Tensor:
    """Codes of normalized values y (|y| <= 1) under a power-companded map."""
    if kind == "signed":
        c = torch.round(y.abs().pow(1.0 / power) * 127.0).clamp_(0, 127)
        return (c * torch.sign(y)).to(torch.int8)
    c = torch.round(y.clamp(min=0).pow(1.0 / power) * 255.0).clamp_(0, 255)
    c = torch.where((y > 0) & (c == 0), torch.ones_like(c), c)
    return c.to(torch.uint8)


def decode_power(codes: torch.Tensor, kind: Kind, power: int) -> torch.Tensor:
    c = codes.to(torch.float32)
    if kind == "signed":
        return torch.sign(c) * (c.abs() / 127.0).pow(power)
    return (c / 255.0).pow(power)


def dynamic_map(kind: Kind) -> torch.Tensor:
    """The 8-bit dynamic-exponent ("dynamic tree") code map, sorted, 256 (unsigned) or 255 (signed) values.

    A value is 10**-e * f: the count e of leading zero bits is the exponent, the remaining bits are a linear
    fraction f in (0.1, 1]. Used only for the code-map comparison, not for stored state.
    """
    signed = kind == "signed"
    total_bits = 7 if signed else 8
    values: list[float] = []
    # Exponents 0 .. total_bits - 2 give 2**(total_bits - 1) - 1 midpoints; with 0 and 1 that is 256 unsigned
    # values, or 255 signed ones once mirrored.
    for e in range(total_bits - 1):
        frac_bits = total_bits - 1 - e
        n = 2**frac_bits
        bounds = torch.linspace(0.1, 1.0, n + 1)
        mids = ((bounds[:-1] + bounds[1:]) / 2).tolist()
        values += [10.0 ** (-e) * m for m in mids]
    values += [0.0, 1.0]
    t = torch.tensor(sorted(set(values)), dtype=torch.float32)
    if signed:
        t = torch.cat([-t.flip(0)[:-1], t])
    return t


def encode_table(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted table (as int64)."""
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(y.contiguous(), mids)


def decode_table(idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[idx.long()]
