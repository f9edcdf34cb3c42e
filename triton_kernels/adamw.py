"""The fused AdamW update of one run in Triton: one kernel per moment storage format (fp32, bf16, int8 blocks).

Each kernel reads and writes every tensor of the run once: it loads the gradient (fp32 / bf16 / fp16) times the
step's gradient scale, rebuilds the fp32 master value (fp32 parameter, fp32 master copy, 16-bit parameter plus
int8 residual, or 16-bit parameter alone), dequantizes the moments, applies the update of
``zeroadam.reference.adamw_reference`` in fp32, and writes the moments and the parameter back in their formats.
The master kind and the dtypes are compile-time specializations; ``update_torch`` in ``zeroadam.update`` is the
definition these kernels must match (``tests/test_triton_kernels.py``).

[Note: matching the reference]
* Each torch op of the reference rounds once, and the fmas that torch's CPU kernels use (checked bit for bit on
  this project's AVX2 build) are spelled out with ``tl.fma`` (lerp: fma(w, g - m, m); addcmul:
  fma((1 - beta2) * g, g, v)); launches turn LLVM's fp contraction off so that no other multiply-add fuses
  (``_launch.launch_options``).
* Division and square root use ``tl.div_rn`` / ``tl.sqrt_rn``: plain ``/`` and ``tl.sqrt`` are approximate on
  NVIDIA GPUs. torch's CPU ``sqrt`` is itself not correctly rounded (about 1 in 6 fp32 results is one ulp off,
  measured on this project's AVX2 build), so the fp32 results agree to about an ulp, not exactly.
* Rounding to a 16-bit float and back goes through the bits. The Triton interpreter converts fp32 to bf16 by
  truncation, not to nearest even as GPUs and torch do, so ``x.to(tl.bfloat16)`` cannot serve both.
* ``torch.round`` (half to even) is written with ``tl.floor``: libdevice's ``rint`` has no interpreter version.
* The stochastic-rounding bits are the hash of ``zeroadam.formats.state.hash_bits`` in uint32 arithmetic, on the
  element's index ``run.index_base + i``; bf16 moments take both roundings from one hash (see [Note: stochastic
  rounding] in ``zeroadam/formats/state.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from zeroadam import _compat

from zeroadam.formats import quant
from zeroadam.formats.table import expected
from zeroadam.update.contract import Run, StepScalars, coefficients
from zeroadam.options import BLOCK_SIZE

triton = _compat.require("triton", "the Triton AdamW kernels")
tl = _compat.require("triton.language", "the Triton AdamW kernels")

from . import _launch  # noqa: E402  (imports triton itself: after the check above)

__all__ = ["update_triton"]

_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# quant.M_UNIT / quant.V_UNIT, fp32 values held exactly by a Python float.
_M_UNIT = tl.constexpr(float(quant.M_UNIT))
_V_UNIT = tl.constexpr(float(quant.V_UNIT))
# Hash multipliers of zeroadam.formats.state._mix32.
_H1 = tl.constexpr(0x7FEB352D)
_H2 = tl.constexpr(0x5BD1E995)
_INV254 = tl.constexpr(1.0 / 254.0)
# Seeds and the hash base vary per step: keep them out of Triton's value specialization (a seed equal to 1 would
# otherwise become a compile-time constant, and divisibility by 16 a second compiled variant).
_NO_SPECIALIZE = ["index_base", "seed_m", "seed_p"]


# ---------------------------------------------------------------------------------------------- 16-bit floats
@triton.jit
def _from_bits(bits, DTYPE: tl.constexpr):
    """The 16-bit float whose bit pattern is the low 16 bits of an int32 / uint32 tensor."""
    return bits.to(tl.uint16).to(DTYPE, bitcast=True)


@triton.jit
def _to_f32(x):
    """Exact widening of an fp32 / bf16 / fp16 tensor to fp32."""
    if x.dtype == tl.bfloat16:
        out = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def _round_nearest(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE rounded to nearest even, as torch's ``.to(dtype)``; NaN becomes bf16's canonical 0x7FC0."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        out = _from_bits(tl.where(x != x, 0x7FC0, r), DTYPE)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _rint(x):
    """Round half to even (torch.round) of fp32 values below 2**22 in magnitude."""
    f = tl.floor(x)
    d = x - f
    odd = (f.to(tl.int32) & 1) == 1
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _hash_index(index_base, offs):
    """(index_base + offs) mod 2**32 as uint32: the element's hash index."""
    return tl.add(index_base.to(tl.uint32), offs.to(tl.uint32), sanitize_overflow=False)


@triton.jit
def _hash32(idx, seed):
    """32 hash bits of (idx: uint32 tensor, seed: integer), as zeroadam.formats.state.hash_bits."""
    # The products wrap modulo 2**32 by design. sanitize_overflow=False says so: debug builds and the interpreter
    # otherwise check every integer product for overflow (a sixth of an interpreted launch, measured).
    h = idx ^ seed.to(tl.uint32)
    h = h ^ (h >> 16)
    h = tl.mul(h, _H1, sanitize_overflow=False)
    h = h ^ (h >> 15)
    h = tl.mul(h, _H2, sanitize_overflow=False)
    return h ^ (h >> 16)


@triton.jit
def _hash_uniform(idx, seed):
    """u in [0, 1) from 24 hash bits, as zeroadam.formats.state.hash_uniform."""
    return (_hash32(idx, seed) >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _round_bf16_bits(x, r16):
    """zeroadam.formats.state.round_bf16_bits: |x|'s fp32 bits plus 16 random bits, truncated to bf16."""
    b = x.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    out = ((a + r16) >> 16) | ((b >> 16) & 0x8000)  # a + r16 < 2**32: no wrap
    return _from_bits(tl.where(a > 0x7F800000, 0x7FC0, out), tl.bfloat16)


@triton.jit
def _stochastic_round(x, u, DTYPE: tl.constexpr):
    """zeroadam.formats.state.stochastic_round: the magnitude goes to the next DTYPE value away from the nearest one
    with probability distance / spacing (u uniform in [0, 1)); the sign is copied from x."""
    a = tl.abs(x)
    near = _round_nearest(a, DTYPE)
    near_f = _to_f32(near)
    err = a - near_f  # exact: near is within one ulp of a
    near_bits = near.to(tl.uint16, bitcast=True).to(tl.int32)
    other_bits = near_bits + tl.where(err > 0, 1, tl.where(err != 0, -1, 0))
    other_f = _to_f32(_from_bits(other_bits, DTYPE))
    take = u * tl.abs(other_f - near_f) < tl.abs(err)
    sign = ((x.to(tl.uint32, bitcast=True) >> 16) & 0x8000).to(tl.int32)
    return _from_bits(tl.where(take, other_bits, near_bits) | sign, DTYPE)


@triton.jit
def _ulp_up(p):
    """fp32 distance from |p| (16-bit) to the next larger magnitude of its dtype (zeroadam.formats.state.ulp_up)."""
    bits = p.to(tl.uint16, bitcast=True).to(tl.int32) & 0x7FFF
    return _to_f32(_from_bits(bits + 1, p.dtype)) - _to_f32(_from_bits(bits, p.dtype))


# ---------------------------------------------------------------------------------------------- loads and stores
@triton.jit
def _load_grad(grad_ptr, offs, mask, grad_scale):
    """fp32 gradient times grad_scale."""
    return _to_f32(tl.load(grad_ptr + offs, mask=mask, other=0.0)) * grad_scale


@triton.jit
def _load_master(param_ptr, master_ptr, offs, mask, MASTER: tl.constexpr):
    """fp32 master values: zeroadam.formats.state.Master.read."""
    if MASTER == "fp32":
        x = tl.load(master_ptr + offs, mask=mask, other=0.0)
    elif MASTER == "compact":
        p = tl.load(param_ptr + offs, mask=mask, other=0.0)
        r = tl.load(master_ptr + offs, mask=mask, other=0).to(tl.float32)
        x = _to_f32(p) + (r * _ulp_up(p)) * _INV254
    else:  # "param" (the parameter is its own master) or "none" (a 16-bit parameter alone)
        x = _to_f32(tl.load(param_ptr + offs, mask=mask, other=0.0))
    return x


@triton.jit
def _store_master(param_ptr, master_ptr, offs, mask, x, index_base, seed_p, MASTER: tl.constexpr):
    """Write fp32 values x to the parameter and its master: zeroadam.formats.state.Master.write."""
    P_DTYPE = param_ptr.dtype.element_ty
    if MASTER == "compact":
        p = _round_nearest(x, P_DTYPE)
        q = tl.div_rn((x - _to_f32(p)) * 254.0, _ulp_up(p))
        r = tl.where(q == q, _rint(tl.minimum(tl.maximum(q, -127.0), 127.0)), 0.0)
        tl.store(param_ptr + offs, p, mask=mask)
        tl.store(master_ptr + offs, r.to(tl.int8), mask=mask)
    elif MASTER == "none":
        u = _hash_uniform(_hash_index(index_base, offs), seed_p)
        tl.store(param_ptr + offs, _stochastic_round(x, u, P_DTYPE), mask=mask)
    else:
        if MASTER == "fp32":
            tl.store(master_ptr + offs, x, mask=mask)
        tl.store(param_ptr + offs, _round_nearest(x, P_DTYPE), mask=mask)


# ---------------------------------------------------------------------------------------------- the update
@triton.jit
def _adamw(x, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps):
    """zeroadam.reference.adamw_reference on fp32 tiles, op for op (see [Note: matching the reference])."""
    x = x * decay
    d = g - m
    # torch's lerp: weight < 0.5 ? fma(w, end - self, self) : fma(w - 1, end - self, end)
    m = tl.where(lerp_weight < 0.5, tl.fma(lerp_weight, d, m), tl.fma(lerp_weight - 1.0, d, g))
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    root = tl.sqrt_rn(v)
    denom = tl.div_rn(root, bc2_sqrt) + eps
    x = x + tl.div_rn(step_size * m, denom)
    return x, m, v, root


@triton.jit
def _decode_signed(codes, scale):
    """exp_avg from int8 codes and a per-element scale: ((c * |c|) * M_UNIT) * scale (quant.dequantize)."""
    c = codes.to(tl.float32)
    return ((c * tl.abs(c)) * _M_UNIT) * scale


@triton.jit
def _decode_unsigned(codes, scale):
    """exp_avg_sq from uint8 codes and a per-element scale: (((c * c) * (c * c)) * V_UNIT) * scale."""
    c = codes.to(tl.float32)
    c2 = c * c
    return ((c2 * c2) * _V_UNIT) * scale


@triton.jit
def _encode_signed(m, absmax):
    """int8 codes of exp_avg in blocks of this absmax: sign(y) * round(127 * sqrt(|y|)), y = m * (1 / absmax), or
    m / absmax where the reciprocal overflows (quant.encode_blocks)."""
    safe = tl.where(absmax > 0, absmax, 1.0)
    inv = tl.div_rn(1.0, safe)
    y = tl.where(inv > _FLT_MAX, tl.div_rn(m, safe), m * inv)
    c = _rint(tl.sqrt_rn(tl.abs(y)) * 127.0)
    return tl.where(y < 0, -c, c).to(tl.int8)


@triton.jit
def _encode_unsigned(v, root, absmax):
    """uint8 codes of exp_avg_sq from v and its root sqrt(v): round(255 * sqrt(root * (1 / sqrt(absmax)))), at least
    1 where v > 0 (quant.encode_blocks)."""
    safe = tl.where(absmax > 0, absmax, 1.0)
    c = _rint(tl.sqrt_rn(root * tl.div_rn(1.0, tl.sqrt_rn(safe))) * 255.0)
    return tl.where(v > 0, tl.maximum(c, 1.0), c).to(tl.uint8)


# The bodies of the kernels: one program's tile of one run, given its element offsets. The one-run kernels below
# and the multi-tensor kernels of ``adamw_multi`` (which read the pointers from a table) share them, so both paths
# compute the same bits.
@triton.jit
def _fp32_tile(
    param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, mask, index_base, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER: tl.constexpr,
):  # fmt: skip
    g = _load_grad(grad_ptr, offs, mask, grad_scale)
    x = _load_master(param_ptr, master_ptr, offs, mask, MASTER)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    x, m, v, _ = _adamw(x, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    _store_master(param_ptr, master_ptr, offs, mask, x, index_base, seed_p, MASTER)


@triton.jit
def _bf16_tile(
    param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, mask, index_base, seed_m, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER: tl.constexpr,
):  # fmt: skip
    g = _load_grad(grad_ptr, offs, mask, grad_scale)
    x = _load_master(param_ptr, master_ptr, offs, mask, MASTER)
    m = _to_f32(tl.load(exp_avg_ptr + offs, mask=mask, other=0.0))
    v = _to_f32(tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0))
    x, m, v, _ = _adamw(x, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    h = _hash32(_hash_index(index_base, offs), seed_m)  # one hash for both moments: high bits exp_avg, low exp_avg_sq
    tl.store(exp_avg_ptr + offs, _round_bf16_bits(m, h >> 16), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, _round_bf16_bits(v, h & 0xFFFF), mask=mask)
    _store_master(param_ptr, master_ptr, offs, mask, x, index_base, seed_p, MASTER)


@triton.jit
def _int8_tile(
    param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
    rows, n, index_base, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    MASTER: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    # A [ROWS, QBLOCK] tile of whole quantization blocks: each row's new absmax is a reduction along axis 1.
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offs < n
    row_mask = rows * QBLOCK < n
    g = _load_grad(grad_ptr, offs, mask, grad_scale)
    x = _load_master(param_ptr, master_ptr, offs, mask, MASTER)
    m_scale = tl.load(exp_avg_scale_ptr + rows, mask=row_mask, other=0.0)
    v_scale = tl.load(exp_avg_sq_scale_ptr + rows, mask=row_mask, other=0.0)
    m = _decode_signed(tl.load(exp_avg_ptr + offs, mask=mask, other=0), m_scale[:, None])
    v = _decode_unsigned(tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0), v_scale[:, None])
    x, m, v, root = _adamw(x, g, m, v, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    m_absmax = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
    v_absmax = tl.max(tl.where(mask, v, 0.0), axis=1)  # v >= 0
    tl.store(exp_avg_ptr + offs, _encode_signed(m, m_absmax[:, None]), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, _encode_unsigned(v, root, v_absmax[:, None]), mask=mask)
    tl.store(exp_avg_scale_ptr + rows, m_absmax, mask=row_mask)
    tl.store(exp_avg_sq_scale_ptr + rows, v_absmax, mask=row_mask)
    _store_master(param_ptr, master_ptr, offs, mask, x, index_base, seed_p, MASTER)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _adamw_fp32_kernel(
    param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr,
    n, index_base, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    MASTER: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    _fp32_tile(
        param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, offs < n, index_base, seed_p,
        grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER,
    )  # fmt: skip


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _adamw_bf16_kernel(
    param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr,
    n, index_base, seed_m, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    MASTER: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    _bf16_tile(
        param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offs, offs < n, index_base, seed_m,
        seed_p, grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER,
    )  # fmt: skip


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _adamw_int8_kernel(
    param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
    n, index_base, seed_p,
    grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
    MASTER: tl.constexpr, ROWS: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    _int8_tile(
        param_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
        rows, n, index_base, seed_p,
        grad_scale, decay, lerp_weight, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, MASTER, QBLOCK,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- launcher
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)


def check_run(run: Run) -> Optional[torch.Tensor]:
    """Validate the run's tensors; returns the master tensor the kernel takes (or None)."""
    n, dev = run.param.numel(), run.param.device
    _launch.check_flat("param", run.param, n, _FLOATS, dev)
    _launch.check_flat("grad", run.grad, n, _FLOATS, dev)
    mom = run.moments
    want = expected(mom.fmt, run.master.kind, n)  # the one table of storage formats
    for key, t in {**mom.tensors(), **run.master.tensors()}.items():
        numel, dtype = want[key]
        _launch.check_flat(key, t, numel, (dtype,), dev)
    kind = run.master.kind
    if kind in ("compact", "none") and run.param.dtype not in _HALF:
        raise ValueError(
            f"zeroadam Triton update: master kind {kind!r} needs a 16-bit parameter, got {run.param.dtype}"
        )
    if kind == "fp32":
        return run.master.fp32
    if kind == "compact":
        return run.master.residual
    return None


def update_triton(run: Run, sc: StepScalars) -> None:
    """Update one run in place with one launch of the fused kernel of its moment format."""
    n = run.param.numel()
    if n == 0:
        return
    master = check_run(run)
    seed_m, _, seed_p = sc.seeds()  # bf16 moments draw both roundings from seed_m
    scalars = coefficients(sc)
    mom = run.moments
    head = (run.param, run.grad, master, mom.exp_avg, mom.exp_avg_sq)
    # Triton launches on the current CUDA device; for CPU tensors (the interpreter) this is a no-op.
    with torch.cuda.device_of(run.param):
        if mom.fmt == "int8":
            tile = _launch.block_tile(n)
            _adamw_int8_kernel[(tile.programs,)](
                *head, mom.exp_avg_scale, mom.exp_avg_sq_scale,
                n, run.index_base, seed_p, *scalars,
                MASTER=run.master.kind, ROWS=tile.rows, QBLOCK=BLOCK_SIZE, **_launch.launch_options(tile),
            )  # fmt: skip
        elif mom.fmt == "bf16":
            tile = _launch.elementwise_tile(n)
            _adamw_bf16_kernel[(tile.programs,)](
                *head, n, run.index_base, seed_m, seed_p, *scalars,
                MASTER=run.master.kind, TILE=tile.size, **_launch.launch_options(tile),
            )  # fmt: skip
        else:
            tile = _launch.elementwise_tile(n)
            _adamw_fp32_kernel[(tile.programs,)](
                *head, n, run.index_base, seed_p, *scalars,
                MASTER=run.master.kind, TILE=tile.size, **_launch.launch_options(tile),
            )  # fmt: skip
