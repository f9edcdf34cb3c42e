"""Storage formats: moments (fp32, bf16, int8 blocks) and master weights (fp32, compact, none).

Everything here works on one *run*: a contiguous 1D range of elements whose first element starts a 256-element
block of its parameter (a whole parameter in stage 0, a rank's shard of a flat buffer in stages 1-3). The AdamW
math never sees these formats: ``load`` gives fp32, ``store`` takes fp32 back.

[Note: stochastic rounding]
bf16 moments and master-less 16-bit parameters are rounded stochastically. With round-to-nearest, a bf16
exp_avg_sq never decays: 0.999 * v rounds back to v, because the change is below half a bf16 ulp (2**-9).
The random bits come from a hash of (element index, step, stream), where the element index is the element's
position in its parameter group's block-aligned layout. That index does not depend on the world size or the
stage, so results are reproducible and identical across them, and every backend (torch, C++, Triton) computes
the same bits.

bf16 moments take both roundings from one 32-bit hash of the exp_avg stream's seed: its high 16 bits round exp_avg,
its low 16 bits exp_avg_sq (``round_bf16_bits``: add the 16 bits below bf16's last kept bit, truncate). 16 bits are
all that rounding fp32 to bf16 can use, and one hash per element instead of two saves the CPU kernel a third of
its rounding work. 16-bit parameters without a master keep ``stochastic_round`` with 24 bits of ``hash_uniform``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from zeroadam.formats import quant
from zeroadam.formats.table import MOMENT_TENSORS
from zeroadam.options import StateDtype

__all__ = [
    "Moments",
    "Master",
    "MasterKind",
    "mix_seed",
    "hash_uniform",
    "hash_bits",
    "stochastic_round",
    "round_bf16_bits",
    "compact_encode",
    "compact_decode",
    "ulp_up",
]

MasterKind = Literal["param", "fp32", "compact", "none"]
"""param: the parameter is fp32 and is its own master; the others apply to 16-bit parameters."""

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that every product of a 32-bit value fits in a signed 64-bit integer.
_H1 = 0x7FEB352D
_H2 = 0x5BD1E995

STREAM_EXP_AVG = 1
STREAM_EXP_AVG_SQ = 2
STREAM_PARAM = 3


def mix_seed(step: int, group: int, stream: int) -> int:
    """A 32-bit seed for one (step, param group, stream); the kernels take it as a plain integer."""
    x = (step * 0x9E3779B1 + group * 0x85EBCA77 + stream * 0xC2B2AE3D) & _M32
    x ^= x >> 16
    x = (x * _H1) & _M32
    x ^= x >> 15
    x = (x * _H2) & _M32
    x ^= x >> 16
    return x


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _H1) & _M32
    x = x ^ (x >> 15)
    x = (x * _H2) & _M32
    return x ^ (x >> 16)


def hash_bits(index_base: int, numel: int, seed: int, device: torch.device) -> torch.Tensor:
    """32 random bits (int64 values below 2**32), one per element index_base .. index_base + numel - 1."""
    idx = torch.arange(index_base, index_base + numel, dtype=torch.int64, device=device)
    return _mix32((idx & _M32) ^ seed)


def hash_uniform(index_base: int, numel: int, seed: int, device: torch.device) -> torch.Tensor:
    """u in [0, 1) with 24 random bits, one per element index_base .. index_base + numel - 1."""
    return (hash_bits(index_base, numel, seed, device) >> 8).to(torch.float32) * (1.0 / 16777216.0)


def ulp_up(y: torch.Tensor) -> torch.Tensor:
    """fp32 distance from |y| (a 16-bit tensor) to the next larger magnitude of its dtype."""
    a = y.abs()
    nxt = (a.view(torch.int16) + 1).view(y.dtype)
    return nxt.float() - a.float()


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """Round fp32 x to a 16-bit dtype, up or down in magnitude with probability by distance (u uniform)."""
    a = x.abs()
    y0 = a.to(dtype)
    y0f = y0.float()
    err = a - y0f  # exact: y0 is within one ulp of a
    step = torch.where(err > 0, 1, -1).to(torch.int16)
    nb = (y0.view(torch.int16) + torch.where(err != 0, step, torch.zeros_like(step))).view(dtype).float()
    take = u * (nb - y0f).abs() < err.abs()
    return torch.copysign(torch.where(take, nb, y0f), x).to(dtype)


def round_bf16_bits(x: torch.Tensor, r16: torch.Tensor) -> torch.Tensor:
    """fp32 x to bf16, stochastically with 16 random bits per element (r16: int64 in [0, 2**16)): the fp32 bits of
    |x| plus r16, truncated to their upper half, so the magnitude goes up one bf16 step with probability (dropped
    bits) / 2**16; the sign is kept, NaN becomes 0x7FC0 (as ``x.to(torch.bfloat16)``), an overflow inf."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    a = bits & 0x7FFFFFFF
    out = ((a + r16) >> 16) | ((bits >> 16) & 0x8000)
    out = torch.where(a > 0x7F800000, 0x7FC0, out)
    return (out - ((out & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)  # as a signed 16-bit pattern


_INV254 = 1.0 / 254.0


def compact_encode(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x -> (16-bit nearest value, int8 residual in units of ulp/254 of that value)."""
    p = x.to(dtype)
    e = x - p.float()
    r = torch.round(e * 254.0 / ulp_up(p)).clamp_(-127, 127)
    r = torch.nan_to_num(r, nan=0.0)
    return p, r.to(torch.int8)


def compact_decode(p: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return p.float() + (residual.float() * ulp_up(p)) * _INV254


@dataclass
class Moments:
    """exp_avg / exp_avg_sq of one run, in one storage format (views into larger buffers are allowed)."""

    fmt: StateDtype
    exp_avg: torch.Tensor  # 1D [n]: fp32, bf16, or int8 codes
    exp_avg_sq: torch.Tensor  # 1D [n]: fp32, bf16, or uint8 codes
    exp_avg_scale: Optional[torch.Tensor] = None  # 1D [ceil(n / 256)] fp32, int8 only
    exp_avg_sq_scale: Optional[torch.Tensor] = None  # 1D [ceil(n / 256)] fp32, int8 only

    @staticmethod
    def zeros(fmt: StateDtype, numel: int, device: torch.device, *, pin: bool = False) -> "Moments":
        return Moments(
            fmt,
            *(torch.zeros(t.numel(numel), dtype=t.dtype, device=device, pin_memory=pin) for t in MOMENT_TENSORS[fmt]),
        )

    @staticmethod
    def of(fmt: StateDtype, tensors: dict[str, torch.Tensor]) -> "Moments":
        """The moments stored in ``tensors`` (state-dict keys; extra keys are ignored)."""
        return Moments(fmt, *(tensors[t.key] for t in MOMENT_TENSORS[fmt]))

    @property
    def numel(self) -> int:
        return self.exp_avg.numel()

    def narrow(self, start: int, length: int) -> "Moments":
        """The moments of elements [start, start + length); start must begin a block."""
        assert start % quant.BLOCK_SIZE == 0
        if self.fmt != "int8":
            return Moments(self.fmt, self.exp_avg.narrow(0, start, length), self.exp_avg_sq.narrow(0, start, length))
        b0, nb = start // quant.BLOCK_SIZE, quant.num_blocks(length)
        return Moments(
            self.fmt,
            self.exp_avg.narrow(0, start, length),
            self.exp_avg_sq.narrow(0, start, length),
            self.exp_avg_scale.narrow(0, b0, nb),
            self.exp_avg_sq_scale.narrow(0, b0, nb),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named storage tensors, as they appear in state dicts."""
        return {t.key: getattr(self, t.field) for t in MOMENT_TENSORS[self.fmt]}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 copies of (exp_avg, exp_avg_sq)."""
        if self.fmt == "int8":
            m = quant.dequantize(quant.Quantized(self.exp_avg, self.exp_avg_scale), "signed")
            v = quant.dequantize(quant.Quantized(self.exp_avg_sq, self.exp_avg_sq_scale), "unsigned")
            return m, v
        return self.exp_avg.float().clone(), self.exp_avg_sq.float().clone()

    def store(self, m: torch.Tensor, v: torch.Tensor, *, index_base: int, seed_m: int, seed_v: int) -> None:
        """Write fp32 moments back in this format (requantize / stochastically round)."""
        if self.fmt == "fp32":
            self.exp_avg.copy_(m)
            self.exp_avg_sq.copy_(v)
        elif self.fmt == "bf16":  # one hash for both (see [Note: stochastic rounding]); seed_v is not drawn
            h = hash_bits(index_base, m.numel(), seed_m, m.device)
            self.exp_avg.copy_(round_bf16_bits(m, h >> 16))
            self.exp_avg_sq.copy_(round_bf16_bits(v, h & 0xFFFF))
        else:
            qm = quant.quantize(m, "signed")
            qv = quant.quantize(v, "unsigned")
            self.exp_avg.copy_(qm.codes)
            self.exp_avg_scale.copy_(qm.scales)
            self.exp_avg_sq.copy_(qv.codes)
            self.exp_avg_sq_scale.copy_(qv.scales)


@dataclass
class Master:
    """The full-precision value of one run's parameters, however it is stored."""

    kind: MasterKind
    fp32: Optional[torch.Tensor] = None  # 1D [n] fp32, kind == "fp32"
    residual: Optional[torch.Tensor] = None  # 1D [n] int8, kind == "compact"

    @staticmethod
    def create(kind: MasterKind, param: torch.Tensor, *, device: Optional[torch.device] = None, pin: bool = False) -> "Master":
        """Master storage initialized from the (1D) parameter values it shadows."""
        device = param.device if device is None else device
        if kind == "fp32":
            buf = torch.empty(param.numel(), dtype=torch.float32, device=device, pin_memory=pin)
            buf.copy_(param)
            return Master(kind, fp32=buf)
        if kind == "compact":
            return Master(kind, residual=torch.zeros(param.numel(), dtype=torch.int8, device=device, pin_memory=pin))
        return Master(kind)

    @staticmethod
    def of(kind: MasterKind, tensors: dict[str, torch.Tensor]) -> "Master":
        """The master storage held in ``tensors`` (state-dict keys; extra keys are ignored)."""
        return Master(kind, fp32=tensors.get("master"), residual=tensors.get("master_residual"))

    def narrow(self, start: int, length: int) -> "Master":
        if self.kind == "fp32":
            return Master(self.kind, fp32=self.fp32.narrow(0, start, length))
        if self.kind == "compact":
            return Master(self.kind, residual=self.residual.narrow(0, start, length))
        return Master(self.kind)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.kind == "fp32":
            return {"master": self.fp32}
        if self.kind == "compact":
            return {"master_residual": self.residual}
        return {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def read(self, param: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of the full-precision values (param: the 1D parameter run)."""
        if self.kind == "fp32":
            return self.fp32.clone()
        if self.kind == "compact":
            return compact_decode(param, self.residual)
        return param.float()

    def write(self, x: torch.Tensor, param: torch.Tensor, *, index_base: int, seed: int) -> None:
        """Store updated fp32 values x into the master and the (1D) parameter run."""
        if self.kind == "param":
            param.copy_(x)
        elif self.kind == "fp32":
            self.fp32.copy_(x)
            param.copy_(x)
        elif self.kind == "compact":
            p16, r = compact_encode(x, param.dtype)
            param.copy_(p16)
            self.residual.copy_(r)
        else:
            u = hash_uniform(index_base, x.numel(), seed, x.device)
            param.copy_(stochastic_round(x, param.dtype, u))
