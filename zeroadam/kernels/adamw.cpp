// The fused AdamW update and the gradient pre-pass for CPU tensors, called through ctypes by zeroadam/kernels/cpu.py.
//
// This file includes no torch header: a plain function over raw pointers compiles in under 2 s of CPU time, where
// torch/extension.h alone takes about 40 s on this project's 2-core machines. cpu.py builds it at first use with
// torch.utils.cpp_extension (ninja), with -ffp-contract=off (FMA only where written; see [Note: matching
// update_torch] in cpu.py) and the -march that ZEROADAM_CPU_ARCH selects.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

extern "C" {
// Mirrored field for field by the ctypes structures _RunArgs and _Coefficients in cpu.py; zeroadam_layout below
// lets cpu.py check that at load time.
struct ZaRun {
  int64_t numel;
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* exp_avg_scale;     // int8 moments only: [ceil(numel / 256)]
  float* exp_avg_sq_scale;  // int8 moments only
  float* master;            // master kind fp32 only
  int8_t* residual;         // master kind compact only
  int32_t param_dtype, grad_dtype, moments_format, master_kind;
  int64_t index_base;
  uint32_t seed_exp_avg, seed_exp_avg_sq, seed_param;  // bf16 moments draw both roundings from seed_exp_avg
};
struct ZaCoefficients {  // fp64 as Python computes them; cast to fp32 where torch casts a Python scalar
  double decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, grad_scale;
};
int zeroadam_adamw_steps(const ZaRun* runs, int32_t count, const ZaCoefficients* coefficients, const uint32_t* seeds,
                         int32_t threads);
double zeroadam_sq_sums(const void* const* data, const int64_t* numel, const int32_t* dtype, int32_t count,
                        int32_t threads);
double zeroadam_add_sq_sum(void* dst, int32_t dst_dtype, const void* src, int32_t src_dtype, double alpha, int64_t numel,
                           int32_t threads);
void zeroadam_fill_f32(float* const* ptrs, int32_t count, float value);
const char* zeroadam_layout();
}

namespace {

constexpr int64_t kBlock = 256;
// Runs shorter than this stay on the calling thread: an OpenMP fork costs a few us, a block 0.3-1 us.
constexpr int64_t kParallelBlocks = 64;

// [Note: many runs in one call]
// The blocks of several runs (or tensors) are numbered one after another: run i holds the blocks [first[i],
// first[i + 1]). Thread t of `parts` takes the contiguous blocks [total * t / parts, total * (t + 1) / parts) across
// run boundaries and calls piece(t, i, lo, hi) for each run's share, blocks lo..hi counted within run i, in run
// order. One OpenMP region per call, whatever the number of runs: stage 0 made a ctypes call and an OpenMP fork per
// parameter, and a tensor under 64 blocks ran on one thread. The partition depends on the block count and `parts`
// alone, so a reduction made through it is the same bits on every call with the same thread count.
template <class Piece>
void over_blocks(const int64_t* first, int32_t count, int32_t threads, const Piece& piece) {
  const int64_t total = first[count];
  const int32_t parts = total >= kParallelBlocks ? std::min<int32_t>(std::max<int32_t>(threads, 1), 256) : 1;
  #pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
  for (int32_t t = 0; t < parts; ++t) {
    const int64_t lo = total * t / parts, hi = total * (t + 1) / parts;
    // The last run starting at or before lo (runs of zero blocks are passed over below).
    int32_t i = int32_t(std::upper_bound(first, first + count + 1, lo) - first) - 1;
    for (int64_t b = lo; b < hi; i++) {
      if (first[i + 1] <= b) continue;
      const int64_t end = std::min(hi, first[i + 1]);
      piece(t, i, b - first[i], end - first[i]);
      b = end;
    }
  }
}

enum Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum MomentsFormat : int32_t { kMomentsFp32 = 0, kMomentsBf16 = 1, kMomentsInt8 = 2 };
enum MasterKind : int32_t { kMasterParam = 0, kMasterFp32 = 1, kMasterCompact = 2, kMasterNone = 3 };

struct Coef32 {
  float decay, lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, grad_scale;
  // torch's vectorized lerp: fma(w, end - start, start) when |w| < 0.5, else fma(w - 1, end - start, end)
  // All ones when |w| < 0.5 (start from m), else zero (start from g): a bit mask, because GCC 12 does not
  // vectorize a select on a loop-invariant bool (it kept the bf16 and int8 loops scalar, 4x slower).
  uint32_t lerp_from_m;
};

// Loops copy n to a local: a store through int8_t* may alias s.n, and a reloaded bound blocks vectorization.
struct Span {
  int64_t block, begin, n;  // block index, first element, element count (< 256 only in the last block)
};

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Storage formats of gradients and parameters. A 16-bit value travels as its bit pattern in a uint32_t:
// packing to 16-bit lanes only at loads and stores keeps the vectorized loops free of shuffles.
// round() is torch's fp32 -> 16-bit cast (nearest even).
struct F32 {
  using T = float;
  static inline float load(float f) { return f; }
};

struct BF16 {
  using T = uint16_t;
  static inline float load(uint32_t b) { return float_of(b << 16); }
  static inline uint32_t round(float f) {  // c10::BFloat16
    const uint32_t u = bits_of(f);
    return f != f ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  }
};

// Bit arithmetic rather than F16C's scalar _cvtss_sh: written without branches, GCC vectorizes it (it does not
// vectorize the intrinsic), and the same code runs on every CPU. Exhaustively checked against torch's casts.
struct FP16 {
  using T = uint16_t;
  static inline float load(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    const uint32_t normal = sign | ((e + 112u) << 23) | (m << 13);
    const uint32_t inf_nan = sign | 0x7F800000u | (m << 13);
    const uint32_t subnormal = sign | bits_of(float(m) * 0x1p-24f);
    return float_of(e == 0x1F ? inf_nan : (e == 0 ? subnormal : normal));
  }
  static inline uint32_t round(float f) {
    const uint32_t x = bits_of(f), a = x & 0x7FFFFFFFu, sign = (x >> 16) & 0x8000u;
    // Below 2**-14 the half is subnormal: adding 0.5 rounds |f| to a multiple of 2**-24 in the fp32 adder.
    const uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
    // Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    // NaN; |f| >= 65520 rounds to inf.
    return sign | (a > 0x7F800000u ? 0x7E00u : (a >= 0x477FF000u ? 0x7C00u : (a < 0x38800000u ? subnormal : normal)));
  }
};

// state._mix32 of (element index ^ seed); the index is taken modulo 2**32 as state.hash_uniform does.
inline uint32_t hash32(uint32_t index, uint32_t seed) {
  uint32_t x = index ^ seed;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x5BD1E995u;
  x ^= x >> 16;
  return x;
}

// state.hash_uniform: u in [0, 1) from the top 24 bits.
inline float hash_uniform(uint32_t index, uint32_t seed) {
  return float(hash32(index, seed) >> 8) * (1.0f / 16777216.0f);
}

// state.stochastic_round, operation for operation.
template <class F>
inline uint32_t stochastic_round(float x, float u) {
  const float a = std::fabs(x);
  const uint32_t y0 = F::round(a);
  const float y0f = F::load(y0);
  const float err = a - y0f;
  const uint32_t nb_bits = (err > 0 ? y0 + 1 : (err != 0 ? y0 - 1 : y0)) & 0xFFFFu;
  const float nb = F::load(nb_bits);
  const float r = u * std::fabs(nb - y0f) < std::fabs(err) ? nb : y0f;
  return F::round(std::copysign(r, x));
}

// stochastic_round of x[0, n) into out, with u = hash_uniform(base + i, seed).
template <class F>
void stochastic_round_floats(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t n, uint32_t base,
                             uint32_t seed) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = uint16_t(stochastic_round<F>(x[i], hash_uniform(base + uint32_t(i), seed)));
  }
}

template <class F>
void stochastic_round_block(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t n, uint32_t base,
                            uint32_t seed) {
  stochastic_round_floats<F>(x, out, n, base, seed);
}

// [Note: bf16 stochastic rounding in integers]
// For bf16 the float steps of stochastic_round reduce to integers on the fp32 bits A of |x|. Let lo = A >> 16
// (|x| truncated to bf16), low = A & 0xFFFF (|x| - lo in fp32 ulps of x) and r = hash >> 16. The two
// candidates lo and lo + 1 lie 65536 ulps apart, so u * |nb - y0| = (hash >> 8) / 256 ulps, and the float
// test "u * |nb - y0| < |err|" becomes
//   nearest is lo:      round up to lo + 1  iff  r < low
//   nearest is lo + 1:  round down to lo    iff  r < 65536 - low.
// This holds while u * 65536 ulps is exact in fp32 (|x| >= 2**-118) and the nearest value is finite
// (A < 0x7F7F8000). A block holding any other value (zero aside: it stays zero) is redone by the float steps;
// the integer form is ~2x faster on the block.
template <>
void stochastic_round_block<BF16>(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t n64,
                                  uint32_t base, uint32_t seed) {
  const int32_t n = int32_t(n64);  // <= 256; 32-bit lanes vectorize twice as wide as 64-bit ones
  uint32_t outside = 0;
  for (int32_t i = 0; i < n; ++i) {
    const uint32_t bits = bits_of(x[i]), a = bits & 0x7FFFFFFFu, lo = a >> 16, low = a & 0xFFFFu;
    const uint32_t r = hash32(base + uint32_t(i), seed) >> 16;
    const bool nearest_hi = low > 0x8000u || (low == 0x8000u && (lo & 1u));
    const uint32_t up = nearest_hi ? uint32_t(r + low >= 0x10000u) : uint32_t(r < low);
    out[i] = uint16_t(((bits >> 16) & 0x8000u) | (lo + up));
    outside |= uint32_t(a >= 0x7F7F8000u) | uint32_t(a < 0x04800000u && low != 0);
  }
  if (outside) stochastic_round_floats<BF16>(x, out, n64, base, seed);
}

// state.ulp_up: the distance from |p| to the next larger 16-bit magnitude.
template <class F>
inline float ulp_up(uint32_t p) {
  const uint32_t a = p & 0x7FFFu;
  return F::load(a + 1) - F::load(a);
}

// quant.M_UNIT and quant.V_UNIT: decode's unit steps, rounded from fp64 as torch rounds them.
constexpr float kMUnit = float(1.0 / 16129.0);
constexpr float kVUnit = float(1.0 / 4228250625.0);

// ---- gradient: its fp32 values (the storage itself, or converted into scratch); adamw applies grad_scale
template <class F>
const float* load_grad(const ZaRun& r, const Span& s, float* __restrict__ g) {
  const auto* src = static_cast<const typename F::T*>(r.grad) + s.begin;
  for (int64_t i = 0, n = s.n; i < n; ++i) g[i] = F::load(src[i]);
  return g;
}

template <>
const float* load_grad<F32>(const ZaRun& r, const Span& s, float*) {
  return static_cast<const float*>(r.grad) + s.begin;
}

// ---- master: read gives the fp32 values to update (the storage itself or scratch), write stores them back
struct MasterParam {  // an fp32 parameter is its own master
  static float* read(const ZaRun& r, const Span& s, float*) { return static_cast<float*>(r.param) + s.begin; }
  static void write(const ZaRun&, const Span&, const float*) {}
};

template <class F>
struct MasterFp32 {  // an fp32 copy; the 16-bit parameter is its nearest value
  static float* read(const ZaRun& r, const Span& s, float*) { return r.master + s.begin; }
  static void write(const ZaRun& r, const Span& s, const float* __restrict__ x) {
    uint16_t* out = static_cast<uint16_t*>(r.param) + s.begin;
    for (int64_t i = 0, n = s.n; i < n; ++i) out[i] = uint16_t(F::round(x[i]));
  }
};

template <class F>
struct MasterCompact {  // state.compact_decode / compact_encode
  static float* read(const ZaRun& r, const Span& s, float* __restrict__ x) {
    const uint16_t* in = static_cast<const uint16_t*>(r.param) + s.begin;
    const int8_t* res = r.residual + s.begin;
    const float inv254 = float(1.0 / 254.0);
    for (int64_t i = 0, n = s.n; i < n; ++i) {
      x[i] = F::load(in[i]) + (float(res[i]) * ulp_up<F>(in[i])) * inv254;
    }
    return x;
  }
  static void write(const ZaRun& r, const Span& s, const float* __restrict__ x) {
    uint16_t* out = static_cast<uint16_t*>(r.param) + s.begin;
    int8_t* res = r.residual + s.begin;
    for (int64_t i = 0, n = s.n; i < n; ++i) {
      const uint32_t q = F::round(x[i]);
      float c = std::rint((x[i] - F::load(q)) * 254.0f / ulp_up<F>(q));
      c = c != c ? 0.0f : std::min(std::max(c, -127.0f), 127.0f);
      out[i] = uint16_t(q);
      res[i] = int8_t(c);
    }
  }
};

template <class F>
struct MasterNone {  // the 16-bit parameter alone, rounded stochastically
  static float* read(const ZaRun& r, const Span& s, float* __restrict__ x) {
    const uint16_t* in = static_cast<const uint16_t*>(r.param) + s.begin;
    for (int64_t i = 0, n = s.n; i < n; ++i) x[i] = F::load(in[i]);
    return x;
  }
  static void write(const ZaRun& r, const Span& s, const float* __restrict__ x) {
    uint16_t* out = static_cast<uint16_t*>(r.param) + s.begin;
    stochastic_round_block<F>(x, out, s.n, uint32_t(r.index_base + s.begin), r.seed_param);
  }
};

// reference.adamw_reference on one element, in its operation order; m and v in, updated m and v out, and
// root = sqrt(v) of the updated v (the int8 encoder reuses it; the other formats drop it).
inline float adamw(float grad, float x, float& m, float& v, float& root, const Coef32& c) {
  const float g = grad * c.grad_scale;  // update_torch: grad.float() * grad_scale
  const float xd = x * c.decay;
  const float start = float_of((bits_of(m) & c.lerp_from_m) | (bits_of(g) & ~c.lerp_from_m));
  m = std::fma(c.lerp_coeff, g - m, start);
  v = std::fma(c.one_minus_beta2 * g, g, v * c.beta2);
  root = std::sqrt(v);
  const float denom = root / c.bc2_sqrt + c.eps;
  return xd + (c.step_size * m) / denom;
}

// ---- moments: update runs adamw over a block, reading and writing the moments in their format.
// The coefficients come by value: with a reference, a store to x, m or v might alias them, and GCC's runtime
// alias check then sent the fp32 loop down its scalar version (1.2 -> 4.1 ns/element, one thread).
struct MomentsFp32 {  // in place
  static void update(const ZaRun& r, const Span& s, const float* __restrict__ g, float* __restrict__ x,
                     const Coef32 c) {
    float* __restrict__ m = static_cast<float*>(r.exp_avg) + s.begin;
    float* __restrict__ v = static_cast<float*>(r.exp_avg_sq) + s.begin;
    for (int64_t i = 0, n = s.n; i < n; ++i) {
      float root;
      x[i] = adamw(g[i], x[i], m[i], v[i], root, c);
    }
  }
};

// state.round_bf16_bits: |x|'s fp32 bits plus 16 random bits, truncated to bf16 (NaN: 0x7FC0, as BF16::round).
inline uint32_t round_bf16_bits(float x, uint32_t r16) {
  const uint32_t bits = bits_of(x), a = bits & 0x7FFFFFFFu;
  return a > 0x7F800000u ? 0x7FC0u : (((a + r16) >> 16) | ((bits >> 16) & 0x8000u));
}

struct MomentsBf16 {  // stochastic rounding on the way out, both moments from one hash (state.Moments.store)
  // One loop: the loads, the update and both roundings of an element together (no fp32 scratch round trip).
  static void update(const ZaRun& r, const Span& s, const float* __restrict__ g, float* __restrict__ x,
                     const Coef32 c) {
    uint16_t* __restrict__ bm = static_cast<uint16_t*>(r.exp_avg) + s.begin;
    uint16_t* __restrict__ bv = static_cast<uint16_t*>(r.exp_avg_sq) + s.begin;
    const uint32_t base = uint32_t(r.index_base + s.begin), seed = r.seed_exp_avg;
    const int32_t n = int32_t(s.n);  // <= 256; 32-bit lanes vectorize twice as wide as 64-bit ones
    for (int32_t i = 0; i < n; ++i) {
      float m = BF16::load(bm[i]), v = BF16::load(bv[i]), root;
      x[i] = adamw(g[i], x[i], m, v, root, c);
      const uint32_t h = hash32(base + uint32_t(i), seed);
      bm[i] = uint16_t(round_bf16_bits(m, h >> 16));
      bv[i] = uint16_t(round_bf16_bits(v, h & 0xFFFFu));
    }
  }
};

// int32_t(std::rint(x)) in one conversion in the current rounding mode (nearest even, as std::rint): GCC vectorizes
// __builtin_irintf to cvtps2dq, where rint then a cast takes two instructions. (NaN: INT32_MIN on x86, either way.)
inline int32_t rint_to_int(float x) {
#if defined(__GNUC__) && !defined(__clang__)
  return __builtin_irintf(x);
#else
  return int32_t(std::rint(x));
#endif
}

// [Note: the int8 block in two loops]
// The block is decoded, updated and reduced to its two absmax in one loop, then both moments are encoded in a
// second: every other pass over the block's fp32 scratch is gone. Full blocks (all but a run's last) take a copy
// of the loops whose trip count is the constant 256, so GCC drops the remainder code and its tests. The
// operations on each element are those of quant.dequantize / quant.encode_blocks, in their order.
// 4M elements on one Zen 4 core (min of 21 calls interleaved with the old kernel, a busy VM): 4.0 -> 3.7 ms. What
// remains is compute: three sqrt and two divisions per element, all correctly rounded (the definition), and ~50
// other vector operations; without the encoder's two sqrt the block ran in 3.1 ms.
struct MomentsInt8 {  // quant.dequantize, then quant.encode_blocks from the block's new absmax
  template <bool kFull, bool kDivide>
  static void encode(int8_t* __restrict__ cm, uint8_t* __restrict__ cv, const float* __restrict__ m,
                     const float* __restrict__ root, int64_t n_any, float dm, float inv_m, float inv_root_v) {
    const int64_t n = kFull ? kBlock : n_any;
    for (int64_t i = 0; i < n; ++i) {
      const float y = kDivide ? m[i] / dm : m[i] * inv_m;
      const int32_t qm = rint_to_int(std::sqrt(std::fabs(y)) * 127.0f);
      cm[i] = int8_t(y < 0 ? -qm : qm);
      const int32_t qv = rint_to_int(std::sqrt(root[i] * inv_root_v) * 255.0f);
      // The floor of 1 looks at v (v > 0 exactly where its root is, v >= 0 being no NaN): sqrt(v / scale)
      // underflows to 0 for v below ~1e-45 * scale. A NaN converts to INT32_MIN, stored as 0.
      cv[i] = uint8_t(root[i] > 0 && qv == 0 ? 1 : qv);
    }
  }

  template <bool kFull>
  static void block(const ZaRun& r, const Span& s, const float* __restrict__ g, float* __restrict__ x,
                    const Coef32 c) {
    int8_t* __restrict__ cm = static_cast<int8_t*>(r.exp_avg) + s.begin;
    uint8_t* __restrict__ cv = static_cast<uint8_t*>(r.exp_avg_sq) + s.begin;
    alignas(64) float m[kBlock], root[kBlock];
    const float sm = r.exp_avg_scale[s.block], sv = r.exp_avg_sq_scale[s.block];
    const int64_t n = kFull ? kBlock : s.n;
    // Non-negative floats order as their bit patterns, and an integer max vectorizes where a float max with
    // NaN semantics does not; a NaN (bits above inf) wins, as in torch's amax.
    uint32_t am = 0, av = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float a = float(cm[i]), b = float(cv[i]), b2 = b * b;
      float mi = ((a * std::fabs(a)) * kMUnit) * sm, vi = ((b2 * b2) * kVUnit) * sv, ri;
      x[i] = adamw(g[i], x[i], mi, vi, ri, c);
      m[i] = mi;
      root[i] = ri;
      am = std::max(am, bits_of(mi) & 0x7FFFFFFFu);
      av = std::max(av, bits_of(vi) & 0x7FFFFFFFu);
    }
    const float scale_m = float_of(am), scale_v = float_of(av);
    r.exp_avg_scale[s.block] = scale_m;
    r.exp_avg_sq_scale[s.block] = scale_v;
    // An all-zero block keeps its zeros with a scale of 1, as in quant.encode_blocks.
    const float dm = scale_m > 0 ? scale_m : 1.0f, dv = scale_v > 0 ? scale_v : 1.0f;
    const float inv_m = 1.0f / dm, inv_root_v = 1.0f / std::sqrt(dv);
    if (std::isinf(inv_m)) {  // a subnormal scale: divide, as quant.encode_blocks does
      encode<kFull, true>(cm, cv, m, root, n, dm, inv_m, inv_root_v);
    } else {
      encode<kFull, false>(cm, cv, m, root, n, dm, inv_m, inv_root_v);
    }
  }

  static void update(const ZaRun& r, const Span& s, const float* __restrict__ g, float* __restrict__ x,
                     const Coef32 c) {
    if (s.n == kBlock) {
      block<true>(r, s, g, x, c);
    } else {
      block<false>(r, s, g, x, c);
    }
  }
};

// A run is a fixed composition of phases, chosen once per call and applied to every block:
// gradient -> fp32 master value -> AdamW with the moments in their format -> parameter and master written back.
struct Kernel {
  const float* (*load_grad)(const ZaRun&, const Span&, float*) = nullptr;
  float* (*read_master)(const ZaRun&, const Span&, float*) = nullptr;
  void (*write_master)(const ZaRun&, const Span&, const float*) = nullptr;
  void (*update_moments)(const ZaRun&, const Span&, const float*, float*, Coef32) = nullptr;
};

template <class M>
void use_master(Kernel& k) {
  k.read_master = &M::read;
  k.write_master = &M::write;
}

template <class F>
bool use_master16(Kernel& k, int32_t kind) {
  switch (kind) {
    case kMasterFp32: use_master<MasterFp32<F>>(k); return true;
    case kMasterCompact: use_master<MasterCompact<F>>(k); return true;
    case kMasterNone: use_master<MasterNone<F>>(k); return true;
    default: return false;
  }
}

// 0, or 1 for a combination of formats that has no kernel (Python checks first; this is the backstop).
int compose(const ZaRun& r, Kernel& k) {
  switch (r.grad_dtype) {
    case kF32: k.load_grad = &load_grad<F32>; break;
    case kBF16: k.load_grad = &load_grad<BF16>; break;
    case kF16: k.load_grad = &load_grad<FP16>; break;
    default: return 1;
  }
  bool master_ok = false;
  switch (r.param_dtype) {
    case kF32:
      master_ok = r.master_kind == kMasterParam;
      use_master<MasterParam>(k);
      break;
    case kBF16: master_ok = use_master16<BF16>(k, r.master_kind); break;
    case kF16: master_ok = use_master16<FP16>(k, r.master_kind); break;
    default: break;
  }
  if (!master_ok) return 1;
  switch (r.moments_format) {
    case kMomentsFp32: k.update_moments = &MomentsFp32::update; break;
    case kMomentsBf16: k.update_moments = &MomentsBf16::update; break;
    case kMomentsInt8: k.update_moments = &MomentsInt8::update; break;
    default: return 1;
  }
  return 0;
}

}  // namespace

namespace {

Coef32 coef32(const ZaCoefficients& co) {
  const float w = float(co.lerp_weight);
  const bool small = std::fabs(w) < 0.5f;
  return Coef32{float(co.decay),     small ? w : w - 1.0f,  float(co.beta2),      float(co.one_minus_beta2),
                float(co.bc2_sqrt),  float(co.eps),         float(co.step_size),  float(co.grad_scale),
                small ? 0xFFFFFFFFu : 0u};
}

}  // namespace

// Every run with the same coefficients, in one pass over their blocks ([Note: many runs in one call]); a block is
// updated the same way whichever thread takes it. seeds: null, or the step's (exp_avg, exp_avg_sq, param) rounding
// seeds for every run in place of the runs' own (a table of runs kept between steps then changes only its gradient
// pointers). 0, or 1 + the index of the first run whose combination of formats has no kernel (nothing is written).
int zeroadam_adamw_steps(const ZaRun* runs, int32_t count, const ZaCoefficients* co, const uint32_t* seeds,
                         int32_t threads) {
  if (count <= 0) return 0;
  Kernel* kernels = new Kernel[count];
  int64_t* first = new int64_t[count + 1];
  first[0] = 0;
  for (int32_t i = 0; i < count; ++i) {
    if (compose(runs[i], kernels[i]) != 0) {
      delete[] kernels;
      delete[] first;
      return 1 + i;
    }
    first[i + 1] = first[i] + (runs[i].numel + kBlock - 1) / kBlock;
  }
  const Coef32 c = coef32(*co);
  over_blocks(first, count, threads, [&](int32_t, int32_t i, int64_t lo, int64_t hi) {
    ZaRun r = runs[i];
    if (seeds != nullptr) {
      r.seed_exp_avg = seeds[0];
      r.seed_exp_avg_sq = seeds[1];
      r.seed_param = seeds[2];
    }
    const Kernel& k = kernels[i];
    for (int64_t b = lo; b < hi; ++b) {
      alignas(64) float scratch_g[kBlock], scratch_x[kBlock];
      const Span s{b, b * kBlock, std::min(kBlock, r.numel - b * kBlock)};
      const float* g = k.load_grad(r, s, scratch_g);
      float* x = k.read_master(r, s, scratch_x);
      k.update_moments(r, s, g, x, c);
      k.write_master(r, s, x);
    }
  });
  delete[] kernels;
  delete[] first;
  return 0;
}

namespace {

// [Note: the pre-pass at memory speed]
// The squares are summed in fp64 (no finite fp32 square overflows, and a long sum keeps its small terms). A plain
// loop is one serial chain of dependent fp64 adds: ~4 cycles per element, ~6 GB/s of fp32 on a Xeon core. GCC
// does not vectorize it (that would reassociate the sum, which -O3 without -ffast-math forbids), and it did not
// vectorize sixteen scalar accumulators either (objdump: vmulsd / vaddsd only, on every -march). So the lanes are
// explicit: GCC / Clang vector types of 4 doubles, four accumulators (16 lanes), which the compiler lowers to
// what the target has (xmm pairs on SSE2 and NEON, ymm on AVX2 and AVX-512) with packed adds; the order of every
// addition is fixed by the source, so the sum is the same bits on every target and every call. bf16 and fp16 are
// widened in vector registers too (load4).
// A software prefetch 16 KiB ahead keeps more reads in flight than the hardware prefetchers alone: 20M fp32
// elements on 2 Zen 3 cores, 6.4-7.0 ms without it, 4.9-5.2 ms with it (a shared, busy VM).
// Vectors of 4 lanes: a V4d is one ymm register (AVX2, AVX-512) or two xmm (SSE2, NEON). 8-lane types were
// lowered through the stack with -march=x86-64-v3 (15 ms for 20M fp32 on one core, against 3.9 ms).
typedef double V4d __attribute__((vector_size(32)));
typedef float V4f __attribute__((vector_size(16)));
typedef uint32_t V4u __attribute__((vector_size(16)));
typedef int32_t V4i __attribute__((vector_size(16)));
typedef uint16_t V4h __attribute__((vector_size(8)));

template <class V, class T>
inline V vector_at(const T* p) {  // an unaligned load of sizeof(V) bytes
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class V, class U>
inline V bit_cast_vector(U u) {
  static_assert(sizeof(U) == sizeof(V), "same width");
  V v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// Four elements as fp32, in vector registers: F::load lane by lane. (Converting through a float array in memory
// instead stalled on store-to-load forwarding: 26 ms for 20M fp32 with -march=x86-64-v3 on 2 cores, against 8.)
template <class F>
V4f load4(const typename F::T* p);

template <>
inline V4f load4<F32>(const float* p) { return vector_at<V4f>(p); }

template <>
inline V4f load4<BF16>(const uint16_t* p) {
  return bit_cast_vector<V4f>(__builtin_convertvector(vector_at<V4h>(p), V4u) << 16);
}


template <class F>
double span_sq_sum(const typename F::T* __restrict__ x, int64_t n) {
  constexpr int64_t kAhead = 4096, kStep = 16;
  V4d acc[4] = {};
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    __builtin_prefetch(x + i + kAhead, 0, 0);
    for (int k = 0; k < 4; ++k) {
      const V4d d = __builtin_convertvector(load4<F>(x + i + 4 * k), V4d);
      acc[k] += d * d;
    }
  }
  double tail = 0;
  for (; i < n; ++i) {
    const double d = F::load(x[i]);
    tail += d * d;
  }
  const V4d sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  return tail + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
}

// fp16: sixteen scalar accumulators, which GCC vectorizes in part; load4<FP16>'s bit arithmetic in vector registers
// was slower (20M fp16 on one Zen 4 core: 12-15 ms against 6.4-7.5 ms with -march=native or x86-64-v3, with or
// without F16C's vcvtph2ps; about equal with SSE2).
template <>
double span_sq_sum<FP16>(const uint16_t* __restrict__ x, int64_t n) {
  constexpr int64_t kAhead = 4096;
  double acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __builtin_prefetch(x + i + kAhead, 0, 0);
    for (int j = 0; j < 16; ++j) {
      const double d = FP16::load(x[i + j]);
      acc[j] += d * d;
    }
  }
  double tail = 0;
  for (; i < n; ++i) {
    const double d = FP16::load(x[i]);
    tail += d * d;
  }
  double total = tail;
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
}

// sum over threads of part(lo, hi): threads take contiguous, block-aligned parts of [0, n) (over_blocks) and their
// partials are added in thread order, so the sum is the same on every call.
template <class Part>
double sum_over_parts(int64_t n, int32_t threads, const Part& part) {
  const int64_t first[2] = {0, (n + kBlock - 1) / kBlock};
  double partial[256] = {};
  over_blocks(first, 1, threads, [&](int32_t t, int32_t, int64_t lo, int64_t hi) {
    partial[t] = part(lo * kBlock, std::min(hi * kBlock, n));
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// [Note: landing a gradient with its norm]
// dst = dst + alpha * src (src given) or dst = alpha * dst (src null), then the sum of squares of the new dst in
// fp64: the reduced gradient lands in the shard and the step's norm is taken from values already in registers, so
// the step needs no pass of its own over the shard. The arithmetic is torch's add_(src, alpha=alpha) and mul_(alpha)
// in fp32 (a bf16 dst is computed in fp32 and rounded to nearest even, as torch does): one FMA where torch's AVX2 and
// AVX-512 kernels use vec::fmadd; on a target without FMA instructions a multiply and an add, as torch's DEFAULT
// kernels do (std::fma would be a libm call per element there). alpha == 1 needs neither.
inline float axpy(float alpha, float s, float d) {
#ifdef __FP_FAST_FMAF
  return std::fma(alpha, s, d);
#else
  return d + alpha * s;
#endif
}

template <class D>
inline void store_as(typename D::T* p, float v);
template <>
inline void store_as<F32>(float* p, float v) { *p = v; }
template <>
inline void store_as<BF16>(uint16_t* p, float v) { *p = uint16_t(BF16::round(v)); }

enum LandMode : int { kAdd = 0, kAxpy = 1, kScale = 2 };

// One elementwise loop per mode, without a reduction in it, so that it vectorizes; the sum of squares is then read
// back from the chunk just written (in L1) by span_sq_sum's explicit vector lanes: a double sum in the same loop
// would be a serial chain the compiler may not reorder (objdump: scalar vaddsd / vfmadd213ss only).
template <class D, class S, int kMode>
void land_span(typename D::T* __restrict__ dst, const typename S::T* __restrict__ src, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = D::load(dst[i]);
    float v;
    if constexpr (kMode == kAdd) {
      v = d + S::load(src[i]);
    } else if constexpr (kMode == kAxpy) {
      v = axpy(alpha, S::load(src[i]), d);
    } else {
      v = d * alpha;
    }
    store_as<D>(dst + i, v);
  }
}

template <class D, class S, int kMode>
double span_add_sq_sum(typename D::T* dst, const typename S::T* src, float alpha, int64_t n) {
  constexpr int64_t kChunk = 1024;  // 4 KiB of fp32: written, then summed from L1
  double total = 0;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t len = std::min(kChunk, n - i);
    land_span<D, S, kMode>(dst + i, kMode == kScale ? src : src + i, alpha, len);
    total += span_sq_sum<D>(dst + i, len);
  }
  return total;
}

template <class D, class S, int kMode>
double add_sq_sum(void* dst_data, const void* src_data, float alpha, int64_t n, int32_t threads) {
  auto* dst = static_cast<typename D::T*>(dst_data);
  const auto* src = static_cast<const typename S::T*>(src_data);
  return sum_over_parts(n, threads, [&](int64_t lo, int64_t hi) {
    return span_add_sq_sum<D, S, kMode>(dst + lo, kMode == kScale ? src : src + lo, alpha, hi - lo);
  });
}

template <class D, class S>
double add_sq_sum_mode(void* dst, const void* src, float alpha, int64_t n, int32_t threads) {
  return alpha == 1.0f ? add_sq_sum<D, S, kAdd>(dst, src, alpha, n, threads)
                       : add_sq_sum<D, S, kAxpy>(dst, src, alpha, n, threads);
}

template <class D>
double add_sq_sum_from(void* dst, const void* src, int32_t src_dtype, float alpha, int64_t n, int32_t threads) {
  if (src == nullptr) return add_sq_sum<D, D, kScale>(dst, src, alpha, n, threads);
  switch (src_dtype) {
    case kF32: return add_sq_sum_mode<D, F32>(dst, src, alpha, n, threads);
    case kBF16: return add_sq_sum_mode<D, BF16>(dst, src, alpha, n, threads);
    case kF16: return add_sq_sum_mode<D, FP16>(dst, src, alpha, n, threads);
    default: return std::nan("");
  }
}

}  // namespace

double zeroadam_add_sq_sum(void* dst, int32_t dst_dtype, const void* src, int32_t src_dtype, double alpha, int64_t numel,
                           int32_t threads) {
  switch (dst_dtype) {
    case kF32: return add_sq_sum_from<F32>(dst, src, src_dtype, float(alpha), numel, threads);
    case kBF16: return add_sq_sum_from<BF16>(dst, src, src_dtype, float(alpha), numel, threads);
    default: return std::nan("");
  }
}

// The sum of squares of several tensors in fp64, in one pass over their blocks ([Note: many runs in one call]): each
// thread sums its share in tensor order, the threads' partials are added in thread order. NaN for a dtype code it
// does not know.
double zeroadam_sq_sums(const void* const* data, const int64_t* numel, const int32_t* dtype, int32_t count,
                        int32_t threads) {
  if (count <= 0) return 0;
  int64_t* first = new int64_t[count + 1];
  first[0] = 0;
  double unknown = 0;
  for (int32_t i = 0; i < count; ++i) {
    if (dtype[i] != kF32 && dtype[i] != kBF16 && dtype[i] != kF16) unknown = std::nan("");
    first[i + 1] = first[i] + (numel[i] + kBlock - 1) / kBlock;
  }
  double partial[256] = {};
  over_blocks(first, count, threads, [&](int32_t t, int32_t i, int64_t lo, int64_t hi) {
    const int64_t begin = lo * kBlock, n = std::min(hi * kBlock, numel[i]) - begin;
    switch (dtype[i]) {
      case kF32: partial[t] += span_sq_sum<F32>(static_cast<const float*>(data[i]) + begin, n); break;
      case kBF16: partial[t] += span_sq_sum<BF16>(static_cast<const uint16_t*>(data[i]) + begin, n); break;
      case kF16: partial[t] += span_sq_sum<FP16>(static_cast<const uint16_t*>(data[i]) + begin, n); break;
      default: break;
    }
  });
  delete[] first;
  double total = unknown;
  for (double p : partial) total += p;
  return total;
}

// One fp32 value into each of many one-element tensors: a group's step counts in one call, where torch's
// _foreach_add_ on CPU scalars is a dispatched add_ per tensor (2.2 us each).
void zeroadam_fill_f32(float* const* ptrs, int32_t count, float value) {
  for (int32_t i = 0; i < count; ++i) *ptrs[i] = value;
}

// ---- layout: "Struct size=N;field=offset+size;...", one line per struct, for cpu.py to compare with ctypes.

namespace {

#define ZA_FIELD(S, f) (std::string(#f "=") + std::to_string(offsetof(S, f)) + "+" + std::to_string(sizeof(S::f)) + ";")

std::string describe_layout() {
  std::string out = "ZaRun size=" + std::to_string(sizeof(ZaRun)) + ";";
  out += ZA_FIELD(ZaRun, numel) + ZA_FIELD(ZaRun, param) + ZA_FIELD(ZaRun, grad) + ZA_FIELD(ZaRun, exp_avg);
  out += ZA_FIELD(ZaRun, exp_avg_sq) + ZA_FIELD(ZaRun, exp_avg_scale) + ZA_FIELD(ZaRun, exp_avg_sq_scale);
  out += ZA_FIELD(ZaRun, master) + ZA_FIELD(ZaRun, residual) + ZA_FIELD(ZaRun, param_dtype);
  out += ZA_FIELD(ZaRun, grad_dtype) + ZA_FIELD(ZaRun, moments_format) + ZA_FIELD(ZaRun, master_kind);
  out += ZA_FIELD(ZaRun, index_base) + ZA_FIELD(ZaRun, seed_exp_avg) + ZA_FIELD(ZaRun, seed_exp_avg_sq);
  out += ZA_FIELD(ZaRun, seed_param);
  out += "\nZaCoefficients size=" + std::to_string(sizeof(ZaCoefficients)) + ";";
  out += ZA_FIELD(ZaCoefficients, decay) + ZA_FIELD(ZaCoefficients, lerp_weight) + ZA_FIELD(ZaCoefficients, beta2);
  out += ZA_FIELD(ZaCoefficients, one_minus_beta2) + ZA_FIELD(ZaCoefficients, bc2_sqrt);
  out += ZA_FIELD(ZaCoefficients, eps) + ZA_FIELD(ZaCoefficients, step_size) + ZA_FIELD(ZaCoefficients, grad_scale);
  return out;
}

#undef ZA_FIELD

}  // namespace

const char* zeroadam_layout() {
  static const std::string layout = describe_layout();  // built once; the pointer stays valid for the process
  return layout.c_str();
}
