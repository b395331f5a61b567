// Fused CPU kernels for the GDNSQ quantizers (one forward pass, one backward pass per op).
//
// Same math as gdnsq_kernels/reference.py and the same dither hash as gdnsq_kernels/dither.py
// (uint32 lowbias32 of flat_index ^ key). Built on first use by gdnsq_kernels/cpu_quantize.py
// with torch.utils.cpp_extension.load (-O3 -fno-trapping-math, no fast-math and no FP contraction, so results
// match the reference bit for bit in the forward).
//
// Design notes:
// * Inputs arrive contiguous; element i of the flat buffer is the dither index, except for a
//   channels_last 4-D tensor, which the caller passes as its (contiguous) NHWC permutation with
//   (cl_channels, cl_pixels) = (C, H*W): the kernels read it in memory order (no copy) and the
//   dither index is the NCHW index of each element (nchw_indices), as for a contiguous tensor.
// * Loops are branch-free (ternaries) so the compiler vectorises them; round-half-to-even
//   uses the (v + 2^23) - 2^23 trick instead of nearbyint, which does not vectorise on SSE2.
// * Reductions use fixed-size chunks whose boundaries do not depend on the thread count,
//   each accumulated into LANES float lanes (vectorisable without reassociation) and then
//   summed in double; chunk totals are added in order, so results are deterministic.
// * s = 2^log2_step etc. are computed with at::exp2 so they equal the reference's exactly.
// ATen + the Python bindings only: torch/extension.h would also pull in the whole C++
// frontend (nn, optim, data), about a third more compile time on the first use.
#include <ATen/ATen.h>
#include <torch/python.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 16384;  // elements per reduction chunk (and parallel grain)
constexpr int kLanes = 16;
constexpr int kSub = 256;  // sub-block of the two-step (map, then lane-add) reductions
// Work per thread below which a loop runs on the calling thread: waking OpenMP workers costs
// more than it saves on small tensors (ResNet-20 weights are 2K..37K elements), and on a
// loaded machine a barrier waiting for a descheduled worker costs milliseconds.
constexpr int64_t kMinParallelWork = 65536;

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

template <typename T>
inline T dither_at(int64_t i, uint32_t key, T mag) {
  uint32_t h = lowbias32(static_cast<uint32_t>(i) ^ key);
  return (h >> 31) ? mag : -mag;
}

// NCHW (row-major logical) indices of memory positions [start, start + len) of a channels_last
// tensor with C channels and HW = H*W pixels per image (memory order N, H, W, C), without a
// division per element: the channel runs fastest in memory, so the indices are stepped
// (pixel, image) from the first one. Filled before the vectorised loop that hashes them, so
// that loop stays free of integer divisions.
inline void nchw_indices(int64_t start, int len, int64_t C, int64_t HW, uint32_t* __restrict__ out) {
  int64_t c = start % C;
  const int64_t p = start / C;
  int64_t n = p / HW;
  int64_t hw = p - n * HW;
  // One run per pixel: along a pixel's channels the index grows by HW (a loop that vectorises);
  // uint32 arithmetic wraps exactly like the cast of the int64 index.
  for (int j = 0; j < len;) {
    const int run = static_cast<int>(std::min<int64_t>(C - c, len - j));
    const uint32_t first = static_cast<uint32_t>((n * C + c) * HW + hw);
    const uint32_t stride = static_cast<uint32_t>(HW);
    for (int k = 0; k < run; ++k) out[j + k] = first + static_cast<uint32_t>(k) * stride;
    j += run;
    c = 0;
    if (++hw == HW) {
      hw = 0;
      ++n;
    }
  }
}

template <typename T>
inline T round_half_even(T v) {
  constexpr T magic = std::is_same<T, double>::value ? T(4503599627370496.0) : T(8388608.0);
  T c = std::copysign(magic, v);
  T r = (v + c) - c;
  return std::fabs(v) < magic ? r : v;  // |v| >= magic (or NaN: comparison false) -> v
}

template <typename T>
T scalar_of(const at::Tensor& t) {
  return t.to(std::is_same<T, double>::value ? at::kDouble : at::kFloat).reshape({}).template item<T>();
}

void check_cpu_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// An upstream gradient comes in x's dtype, or in the compute dtype (float32 for a float16 /
// bfloat16 x), which keeps the bits a half-precision copy would lose.
void check_grad_dtype(const at::Tensor& g, const at::Tensor& x, const char* name) {
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(g.scalar_type() == x.scalar_type() || g.scalar_type() == ct, name,
              " must have the input's dtype or the compute dtype, got ", g.scalar_type());
}

// Loop bodies as free functions over raw __restrict__ pointers and by-value scalars: inside
// the dispatch lambdas the scalars are captured by reference, and the compiler then cannot
// prove the output stores leave them unchanged, which blocks vectorisation.
template <typename scalar_t, typename acc_t>
void act_forward_range(const scalar_t* __restrict__ xp, scalar_t* __restrict__ yp, int64_t b,
                       int64_t e, acc_t s, acc_t lo, acc_t hi) {
  for (int64_t i = b; i < e; ++i) {
    acc_t xv = static_cast<acc_t>(xp[i]);
    acc_t xc = xv < lo ? lo : xv;  // comparisons keep NaN, like torch.clamp
    xc = xc > hi ? hi : xc;
    acc_t v = (xc - lo) / s;
    yp[i] = static_cast<scalar_t>(lo + s * round_half_even(v));
  }
}

// The unsigned integer type with scalar_t's size: selects between a value and +0.0 are done on
// the bits (+0.0 is all zero bits). A ternary on c10::BFloat16 / c10::Half objects is neither
// if-converted nor vectorised by GCC: it compiled to a branch per element, mispredicted about
// half the time on activations around the clamp bounds (8 ms for 1M bfloat16 elements, 18x
// the float32 loop).
template <typename T>
using bits_of = std::conditional_t<sizeof(T) == 2, uint16_t,
                                   std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

// grad_t is x's scalar_t, or the compute type acc_t when the upstream gradient is wider than a
// half-precision x (it is then rounded to scalar_t once, at the store, as the reference does).
template <typename scalar_t, typename grad_t, typename acc_t>
void act_grad_x_range(const scalar_t* __restrict__ xp, const grad_t* __restrict__ gp,
                      scalar_t* __restrict__ dxp, int64_t b, int64_t e, acc_t lo, acc_t hi) {
  using U = bits_of<scalar_t>;
  static_assert(sizeof(U) == sizeof(scalar_t), "no integer type of the element's size");
  U* __restrict__ dxbits = reinterpret_cast<U*>(dxp);
  if constexpr (std::is_same<grad_t, scalar_t>::value) {
    const U* __restrict__ gbits = reinterpret_cast<const U*>(gp);
    for (int64_t i = b; i < e; ++i) {
      acc_t xv = static_cast<acc_t>(xp[i]);
      bool inside = (xv >= lo) & (xv <= hi);  // False for NaN
      dxbits[i] = gbits[i] & static_cast<U>(-static_cast<U>(inside));  // g or +0.0
    }
  } else {
    for (int64_t i = b; i < e; ++i) {
      acc_t xv = static_cast<acc_t>(xp[i]);
      bool inside = (xv >= lo) & (xv <= hi);
      const scalar_t gv = static_cast<scalar_t>(gp[i]);  // round to nearest even, as Tensor.to
      U gb;
      std::memcpy(&gb, &gv, sizeof(U));
      dxbits[i] = gb & static_cast<U>(-static_cast<U>(inside));
    }
  }
}

// Sums a buffer of kSub values into kLanes float lanes (vectorisable without reassociation).
template <typename acc_t>
inline void add_lanes(const acc_t* __restrict__ buf, acc_t* __restrict__ lanes) {
  for (int j0 = 0; j0 < kSub; j0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += buf[j0 + l];
  }
}

// The three lane sets of the activation backward's sums, each added up in double, into out[0..2].
template <typename acc_t>
inline void lanes_to_sums(const acc_t* l0, const acc_t* l1, const acc_t* l2, double* out) {
  double d0 = 0, d1 = 0, d2 = 0;
  for (int l = 0; l < kLanes; ++l) {
    d0 += l0[l];
    d1 += l1[l];
    d2 += l2[l];
  }
  out[0] = d0;
  out[1] = d1;
  out[2] = d2;
}

// Adds [sum g*t, sum_{x>hi} g, sum_out g] over [b, e) to out[0..2]; t = e - [x>hi] + s*r.
// Each sub-block of kSub elements is first mapped elementwise into small buffers (a plain
// loop the compiler vectorises, dither hash included), then added into lanes.
// kCL: the buffer is a channels_last tensor in memory order (see nchw_indices); only the dither
// index changes (a separate instantiation so that the contiguous loop stays vectorised).
template <typename scalar_t, typename grad_t, typename acc_t, bool kDither, bool kCL>
void act_param_sums_range(const scalar_t* __restrict__ xp, const grad_t* __restrict__ gp,
                          int64_t b, int64_t e, acc_t s, acc_t lo, acc_t hi, acc_t smag,
                          uint32_t key, int64_t cl_c, int64_t cl_hw, double* out) {
  acc_t l0[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {};
  alignas(64) acc_t t0[kSub], t1[kSub], t2[kSub];
  alignas(64) uint32_t cl_idx[kCL ? kSub : 1];
  for (int64_t sb = b; sb < e; sb += kSub) {
    const int len = static_cast<int>(std::min<int64_t>(kSub, e - sb));
    const scalar_t* __restrict__ xs = xp + sb;
    const grad_t* __restrict__ gs = gp + sb;
    const uint32_t base = static_cast<uint32_t>(sb);
    if (kCL && kDither) nchw_indices(sb, len, cl_c, cl_hw, cl_idx);
    for (int j = 0; j < len; ++j) {
      acc_t xv = static_cast<acc_t>(xs[j]);
      acc_t gv = static_cast<acc_t>(gs[j]);
      bool below = xv < lo;
      bool above = xv > hi;
      acc_t xc = below ? lo : xv;
      xc = xc > hi ? hi : xc;
      acc_t v = (xc - lo) / s;
      acc_t t = (round_half_even(v) - v) - (above ? acc_t(1) : acc_t(0));
      if (kDither) {
        const uint32_t idx = kCL ? cl_idx[j] : base + static_cast<uint32_t>(j);
        t = t + dither_at<acc_t>(idx, key, smag);  // s*r
      }
      t0[j] = gv * t;
      t1[j] = above ? gv : acc_t(0);
      t2[j] = (below | above) ? gv : acc_t(0);
    }
    for (int j = len; j < kSub; ++j) t0[j] = t1[j] = t2[j] = acc_t(0);
    add_lanes(t0, l0);
    add_lanes(t1, l1);
    add_lanes(t2, l2);
  }
  lanes_to_sums(l0, l1, l2, out);
}

template <typename scalar_t, typename acc_t>
void w_quantize_row(const scalar_t* __restrict__ row, scalar_t* __restrict__ yrow, int64_t K,
                    acc_t s, acc_t zc) {
  for (int64_t i = 0; i < K; ++i) {
    acc_t v = (static_cast<acc_t>(row[i]) - zc) / s;
    yrow[i] = static_cast<scalar_t>(zc + s * round_half_even(v));
  }
}

template <typename scalar_t, typename grad_t, typename acc_t, bool kDither, bool kCL>
double w_grad_row(const scalar_t* __restrict__ wp, const grad_t* __restrict__ gp,
                  int64_t base, int64_t K, acc_t s, acc_t zc, acc_t smag, uint32_t key,
                  int64_t cl_c, int64_t cl_hw) {
  acc_t lanes[kLanes] = {};
  alignas(64) acc_t tb[kSub];
  alignas(64) uint32_t cl_idx[kCL ? kSub : 1];
  for (int64_t sb = base; sb < base + K; sb += kSub) {
    const int len = static_cast<int>(std::min<int64_t>(kSub, base + K - sb));
    const scalar_t* __restrict__ ws = wp + sb;
    const grad_t* __restrict__ gs = gp + sb;
    const uint32_t ib = static_cast<uint32_t>(sb);
    if (kCL && kDither) nchw_indices(sb, len, cl_c, cl_hw, cl_idx);
    for (int j = 0; j < len; ++j) {
      acc_t v = (static_cast<acc_t>(ws[j]) - zc) / s;
      acc_t t = round_half_even(v) - v;
      if (kDither) {
        const uint32_t idx = kCL ? cl_idx[j] : ib + static_cast<uint32_t>(j);
        t = t + dither_at<acc_t>(idx, key, smag);
      }
      tb[j] = static_cast<acc_t>(gs[j]) * t;
    }
    for (int j = len; j < kSub; ++j) tb[j] = acc_t(0);
    add_lanes(tb, lanes);
  }
  double tot = 0;
  for (int l = 0; l < kLanes; ++l) tot += lanes[l];
  return tot;
}

// Per-row minimum, NaN if the row holds a NaN, 0 for an empty row. GCC does not vectorise a
// float min reduction without -ffinite-math-only, so float rows use AVX intrinsics when
// compiled with AVX2 (NaN is tracked separately: vminps ignores it in this operand order).
template <typename scalar_t, typename acc_t>
acc_t row_min(const scalar_t* __restrict__ row, int64_t K) {
  if (K == 0) return acc_t(0);
  acc_t m = std::numeric_limits<acc_t>::infinity();
  bool has_nan = false;
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    __m256 vm0 = _mm256_set1_ps(m), vm1 = vm0;
    __m256 vn = _mm256_setzero_ps();
    for (; i + 16 <= K; i += 16) {
      __m256 a = _mm256_loadu_ps(row + i);
      __m256 b = _mm256_loadu_ps(row + i + 8);
      vm0 = _mm256_min_ps(a, vm0);  // NaN in a -> vm0 kept
      vm1 = _mm256_min_ps(b, vm1);
      vn = _mm256_or_ps(vn, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q),
                                         _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
    }
    alignas(32) float t0[8], t1[8], tn[8];
    _mm256_store_ps(t0, vm0);
    _mm256_store_ps(t1, vm1);
    _mm256_store_ps(tn, vn);
    for (int l = 0; l < 8; ++l) {
      m = t0[l] < m ? t0[l] : m;
      m = t1[l] < m ? t1[l] : m;
      has_nan |= tn[l] != 0.0f;  // all-ones bit pattern is a NaN, != 0 is true
    }
  }
#endif
  for (; i < K; ++i) {
    acc_t v = static_cast<acc_t>(row[i]);
    m = v < m ? v : m;
    has_nan |= (v != v);
  }
  return has_nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
}

// ----------------------------------------------------------------------------- AVX-512 paths
//
// Hand-vectorised activation forward and backward for float32 and bfloat16 tensors whose
// upstream gradient has the input's dtype (what a float32 or a bf16-autocast training step
// hands them), used when the extension is compiled with AVX-512 (F, BW, VL, DQ). The generic
// loops above leave GCC three things it does badly: round-half-even as four adds and selects
// instead of one vrndscaleps, the bf16 <-> float conversions of c10::BFloat16, and the
// parameter sums through small buffers (one store and one reload per element and sum). Here
// the whole backward is one pass per 16 elements: dx, the three sums in registers and the dither
// hash. Values are those of the generic loops: the same float operations in the same order
// (no FMA), vrndscaleps is round-half-even like round_half_even, bf16 stores round like
// c10::BFloat16, and the sums' lanes take the same elements in the same order (lane l holds
// the elements l mod 16 of the chunk, added in memory order).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define GDNSQ_AVX512_PATHS 1

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  // unmasked 256-bit moves for whole vectors: masked 16-bit element moves are slower on Zen 4
  const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float -> bfloat16 bits as c10::BFloat16(float): NaN -> 0x7FC0, else round to nearest even.
inline __m256i to_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16_bits(c10::BFloat16* p, __m256i bits, __mmask16 m) {
  if (m == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  } else {
    _mm256_mask_storeu_epi16(p, m, bits);
  }
}
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
#if defined(__AVX512BF16__)
  // One vcvtneps2bf16 where the CPU has it (a third of the emulation's cost per vector): it
  // rounds to nearest even as c10::BFloat16 does, but flushes denormal inputs to zero and
  // keeps a NaN's sign and payload, so a vector holding a NaN or a denormal (class bits 0x01
  // QNaN, 0x20 denormal, 0x80 SNaN) takes the exact emulation instead.
  if (_mm512_fpclass_ps_mask(v, 0xA1) == 0) {
    store16_bits(p, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)), m);
    return;
  }
#endif
  store16_bits(p, to_bf16_bits(v), m);
}

// dx = inside ? g : +0.0 on the gradient's bits (no conversion, as act_grad_x_range).
inline void store_masked_grad(float* dx, const float* g, __mmask16 inside, __mmask16 m) {
  _mm512_mask_storeu_ps(dx, m, _mm512_maskz_loadu_ps(inside & m, g));
}
inline void store_masked_grad(c10::BFloat16* dx, const c10::BFloat16* g, __mmask16 inside, __mmask16 m) {
  if (m == 0xFFFF) {  // whole vector: plain 256-bit moves, the zeros by a register blend
    const __m256i gv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dx), _mm256_maskz_mov_epi16(inside, gv));
  } else {
    _mm256_mask_storeu_epi16(dx, m, _mm256_maskz_loadu_epi16(inside & m, g));
  }
}

inline __m512 rne16(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

template <typename scalar_t>
void act_forward_avx512(const scalar_t* __restrict__ xp, scalar_t* __restrict__ yp, int64_t b, int64_t e,
                        float s, float lo, float hi) {
  const __m512 vs = _mm512_set1_ps(s), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  for (int64_t i = b; i < e; i += 16) {
    const __mmask16 m = tail_mask(e - i);
    const __m512 xv = load16(xp + i, m);
    __m512 xc = _mm512_mask_mov_ps(xv, _mm512_cmp_ps_mask(xv, vlo, _CMP_LT_OQ), vlo);
    xc = _mm512_mask_mov_ps(xc, _mm512_cmp_ps_mask(xc, vhi, _CMP_GT_OQ), vhi);
    const __m512 v = _mm512_div_ps(_mm512_sub_ps(xc, vlo), vs);
    store16(yp + i, _mm512_add_ps(vlo, _mm512_mul_ps(vs, rne16(v))), m);
  }
}

// The sign bit of lowbias32(idx ^ key) as a mask (its last xor-shift leaves bit 31 unchanged).
inline __mmask16 dither_sign(__m512i idx, __m512i key) {
  __m512i h = _mm512_xor_si512(idx, key);
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm512_movepi32_mask(h);
}

// One chunk [b, e) of the activation backward (b a multiple of 16): dx (kDX) and the three
// parameter sums (kParams) added to out[0..2], as act_grad_x_range + act_param_sums_range.
template <typename scalar_t, bool kDX, bool kParams, bool kDither, bool kCL>
void act_backward_avx512(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ gp,
                         scalar_t* __restrict__ dxp, int64_t b, int64_t e, float s, float lo, float hi,
                         float smag, uint32_t key, int64_t cl_c, int64_t cl_hw, double* out) {
  const __m512 vs = _mm512_set1_ps(s), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const __m512 one = _mm512_set1_ps(1.0f), vpos = _mm512_set1_ps(smag), vneg = _mm512_set1_ps(-smag);
  const __m512i vkey = _mm512_set1_epi32(static_cast<int>(key));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // channels_last: NCHW index of memory position p = (n, hw, c) is (n*C + c)*HW + hw; along a
  // pixel's channels it steps by HW. (c, n, hw) of the current position are tracked.
  const __m512i iota_hw = _mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int>(cl_hw)));
  int64_t c = 0, n = 0, hw = 0;
  if (kCL && kDither) {
    c = b % cl_c;
    const int64_t pix = b / cl_c;
    n = pix / cl_hw;
    hw = pix - n * cl_hw;
  }
  alignas(64) uint32_t idx_buf[16];
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  for (int64_t i = b; i < e; i += 16) {
    const __mmask16 m = tail_mask(e - i);
    const __m512 xv = load16(xp + i, m);
    const __mmask16 below = _mm512_cmp_ps_mask(xv, vlo, _CMP_LT_OQ);
    const __mmask16 above = _mm512_cmp_ps_mask(xv, vhi, _CMP_GT_OQ);
    if (kDX) {
      const __mmask16 inside = _mm512_cmp_ps_mask(xv, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(xv, vhi, _CMP_LE_OQ);
      store_masked_grad(dxp + i, gp + i, inside, m);
    }
    if (!kParams) continue;
    const __m512 gv = load16(gp + i, m);  // 0 in the tail lanes: they add nothing
    __m512 xc = _mm512_mask_mov_ps(xv, below, vlo);
    xc = _mm512_mask_mov_ps(xc, _mm512_cmp_ps_mask(xc, vhi, _CMP_GT_OQ), vhi);
    const __m512 v = _mm512_div_ps(_mm512_sub_ps(xc, vlo), vs);
    __m512 t = _mm512_sub_ps(rne16(v), v);
    t = _mm512_mask_sub_ps(t, above, t, one);
    if (kDither) {
      __m512i idx;
      if (!kCL) {
        idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(i))), iota);
      } else if (c + 16 <= cl_c) {  // the 16 positions are channels of one pixel
        const uint32_t first = static_cast<uint32_t>((n * cl_c + c) * cl_hw + hw);
        idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), iota_hw);
        c += 16;
        if (c == cl_c) {
          c = 0;
          if (++hw == cl_hw) { hw = 0; ++n; }
        }
      } else {  // they straddle pixels (C not a multiple of 16)
        const int len = static_cast<int>(std::min<int64_t>(16, e - i));
        nchw_indices(i, len, cl_c, cl_hw, idx_buf);
        idx = _mm512_maskz_loadu_epi32(m, idx_buf);
        const int64_t next = i + 16;
        c = next % cl_c;
        const int64_t pix = next / cl_c;
        n = pix / cl_hw;
        hw = pix - n * cl_hw;
      }
      t = _mm512_add_ps(t, _mm512_mask_blend_ps(dither_sign(idx, vkey), vneg, vpos));
    }
    a0 = _mm512_add_ps(a0, _mm512_mul_ps(gv, t));
    a1 = _mm512_mask_add_ps(a1, above, a1, gv);
    a2 = _mm512_mask_add_ps(a2, below | above, a2, gv);
  }
  if (!kParams) return;
  alignas(64) float l0[16], l1[16], l2[16];
  _mm512_store_ps(l0, a0);
  _mm512_store_ps(l1, a1);
  _mm512_store_ps(l2, a2);
  lanes_to_sums(l0, l1, l2, out);
}

template <typename scalar_t>
void act_backward_avx512_dispatch(const scalar_t* xp, const scalar_t* gp, scalar_t* dxp, int64_t b, int64_t e,
                                  float s, float lo, float hi, float smag, uint32_t key, bool need_dx,
                                  bool need_params, bool dither, int64_t cl_c, int64_t cl_hw, double* out) {
#define GDNSQ_ACT_BWD(DX, PAR, DI, CL) \
  act_backward_avx512<scalar_t, DX, PAR, DI, CL>(xp, gp, dxp, b, e, s, lo, hi, smag, key, cl_c, cl_hw, out)
  const bool cl = cl_c > 0;
  if (!need_params) {
    GDNSQ_ACT_BWD(true, false, false, false);
  } else if (need_dx) {
    if (!dither) GDNSQ_ACT_BWD(true, true, false, false);
    else if (cl) GDNSQ_ACT_BWD(true, true, true, true);
    else GDNSQ_ACT_BWD(true, true, true, false);
  } else {
    if (!dither) GDNSQ_ACT_BWD(false, true, false, false);
    else if (cl) GDNSQ_ACT_BWD(false, true, true, true);
    else GDNSQ_ACT_BWD(false, true, true, false);
  }
#undef GDNSQ_ACT_BWD
}
#endif  // AVX-512

}  // namespace

// The activation grid in the compute type acc_t: step s = 2^log2_step, lowest level lo = offset,
// highest level hi = lo + Q - s with range Q = 2^log2_range.
template <typename acc_t>
struct ActGrid {
  acc_t s, lo, hi;
};

template <typename acc_t>
ActGrid<acc_t> act_grid(const at::Tensor& log2_step, const at::Tensor& log2_range, const at::Tensor& offset) {
  const auto ct = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  const acc_t s = at::exp2(log2_step.to(ct)).reshape({}).template item<acc_t>();
  const acc_t q = at::exp2(log2_range.to(ct)).reshape({}).template item<acc_t>();
  const acc_t lo = scalar_of<acc_t>(offset);
  return {s, lo, lo + q - s};
}

// y = lo + s * round((clamp(x, lo, hi) - lo) / s), written into y (allocated by the caller
// with torch.empty_like, so the tests' NaN poisoning reaches it).
void act_forward(const at::Tensor& x, at::Tensor y, const at::Tensor& log2_step,
                 const at::Tensor& log2_range, const at::Tensor& offset) {
  check_cpu_contig(x, "x");
  check_cpu_contig(y, "y");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "y must be like x");
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "act_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ActGrid<acc_t> grid = act_grid<acc_t>(log2_step, log2_range, offset);
    const acc_t s = grid.s, lo = grid.lo, hi = grid.hi;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, kMinParallelWork, [&](int64_t b, int64_t e) {
#if defined(GDNSQ_AVX512_PATHS)
      if constexpr (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, c10::BFloat16>::value) {
        act_forward_avx512<scalar_t>(xp, yp, b, e, s, lo, hi);
        return;
      }
#endif
      act_forward_range<scalar_t, acc_t>(xp, yp, b, e, s, lo, hi);
    });
  });
}

// Writes grad_x into dx when need_dx; returns sums (3,) float64 =
// [sum g*t, sum_{x>hi} g, sum_out g] with t = e - [x > hi] + s*r (zeros unless need_params).
// The caller applies ln2*s and ln2*Q.
at::Tensor act_backward(const at::Tensor& g, const at::Tensor& x, at::Tensor dx,
                                     const at::Tensor& log2_step, const at::Tensor& log2_range,
                                     const at::Tensor& offset, int64_t key, bool dither,
                                     bool need_dx, bool need_params, double mag,
                                     int64_t cl_channels, int64_t cl_pixels) {
  const bool cl = cl_channels > 0;
  TORCH_CHECK(!cl || cl_pixels > 0, "cl_pixels must be positive with cl_channels");
  check_cpu_contig(x, "x");
  check_cpu_contig(g, "grad_y");
  check_grad_dtype(g, x, "grad_y");
  const int64_t n = x.numel();
  if (need_dx) {
    check_cpu_contig(dx, "dx");
    TORCH_CHECK(dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type(), "dx must be like x");
  }
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(need_params ? n_chunks * 3 : 0, 0.0);
  const uint32_t ukey = static_cast<uint32_t>(key);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "act_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ActGrid<acc_t> grid = act_grid<acc_t>(log2_step, log2_range, offset);
    const acc_t s = grid.s, lo = grid.lo, hi = grid.hi;
    const acc_t smag = dither ? s * static_cast<acc_t>(mag) : acc_t(0);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    auto run = [&](const auto* gp) {
      using grad_t = std::remove_cv_t<std::remove_pointer_t<decltype(gp)>>;
      at::parallel_for(0, n_chunks, kMinParallelWork / kChunk, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          const int64_t b = c * kChunk;
          const int64_t e = std::min(n, b + kChunk);
#if defined(GDNSQ_AVX512_PATHS)
          if constexpr (std::is_same<grad_t, scalar_t>::value &&
                        (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, c10::BFloat16>::value)) {
            if (need_dx || need_params) {
              act_backward_avx512_dispatch<scalar_t>(xp, gp, dxp, b, e, s, lo, hi, smag, ukey, need_dx,
                                                     need_params, dither, cl ? cl_channels : 0, cl_pixels,
                                                     need_params ? &part[c * 3] : nullptr);
            }
            continue;
          }
#endif
          if (need_dx) act_grad_x_range<scalar_t, grad_t, acc_t>(xp, gp, dxp, b, e, lo, hi);
          if (!need_params) continue;
          double* out = &part[c * 3];
          if (dither && cl) {
            act_param_sums_range<scalar_t, grad_t, acc_t, true, true>(
                xp, gp, b, e, s, lo, hi, smag, ukey, cl_channels, cl_pixels, out);
          } else if (dither) {
            act_param_sums_range<scalar_t, grad_t, acc_t, true, false>(
                xp, gp, b, e, s, lo, hi, smag, ukey, 0, 1, out);
          } else {
            act_param_sums_range<scalar_t, grad_t, acc_t, false, false>(
                xp, gp, b, e, s, lo, hi, smag, ukey, 0, 1, out);
          }
        }
      });
    };
    if (g.scalar_type() == x.scalar_type()) {
      run(g.data_ptr<scalar_t>());
    } else {
      run(g.data_ptr<acc_t>());
    }
  });
  at::Tensor sums = at::zeros({3}, at::kDouble);
  if (need_params) {
    double* sp = sums.data_ptr<double>();
    for (int64_t c = 0; c < n_chunks; ++c) {
      sp[0] += part[c * 3 + 0];
      sp[1] += part[c * 3 + 1];
      sp[2] += part[c * 3 + 2];
    }
  }
  return sums;
}

// w: contiguous (C, K). Writes w_hat into y (C, K) and the zero point into z (C,) (compute dtype).
void w_forward(const at::Tensor& w, at::Tensor y, at::Tensor z, const at::Tensor& log2_step) {
  check_cpu_contig(w, "w");
  check_cpu_contig(y, "y");
  check_cpu_contig(z, "zero_point");
  TORCH_CHECK(w.dim() == 2, "w must be 2-D (C, K) here");
  const int64_t C = w.size(0), K = w.size(1);
  TORCH_CHECK(y.sizes() == w.sizes() && y.scalar_type() == w.scalar_type(), "y must be like w");
  const bool is_double = w.scalar_type() == at::kDouble;
  TORCH_CHECK(z.numel() == C && z.scalar_type() == (is_double ? at::kDouble : at::kFloat),
              "zero_point must be (C,) in the compute dtype");
  const bool per_channel = log2_step.numel() == C && log2_step.dim() == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "w_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ct = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    at::Tensor st = at::exp2(log2_step.to(ct)).reshape({-1}).contiguous();
    const acc_t* sp = st.data_ptr<acc_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* zp = z.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(K, 1));
    at::parallel_for(0, C, grain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const scalar_t* row = wp + c * K;
        scalar_t* yrow = yp + c * K;
        const acc_t s = sp[per_channel ? c : 0];
        const acc_t zc = row_min<scalar_t, acc_t>(row, K);
        zp[c] = zc;
        w_quantize_row<scalar_t, acc_t>(row, yrow, K, s, zc);
      }
    });
  });
}

// Per-channel sums (C,) float64 of g*(e + s*r); the caller applies ln2*s (and sums for a
// per-tensor step).
at::Tensor w_backward(const at::Tensor& g, const at::Tensor& w, const at::Tensor& log2_step,
                      const at::Tensor& zero_point, int64_t key, bool dither, double mag,
                      int64_t cl_channels, int64_t cl_pixels) {
  const bool cl = cl_channels > 0;
  TORCH_CHECK(!cl || cl_pixels > 0, "cl_pixels must be positive with cl_channels");
  check_cpu_contig(w, "w");
  check_cpu_contig(g, "grad_w_hat");
  TORCH_CHECK(w.dim() == 2 && g.sizes() == w.sizes(), "w and grad must be (C, K)");
  check_grad_dtype(g, w, "grad_w_hat");
  const int64_t C = w.size(0), K = w.size(1);
  const bool per_channel = log2_step.numel() == C && log2_step.dim() == 1;
  at::Tensor out = at::empty({C}, at::kDouble);
  const uint32_t ukey = static_cast<uint32_t>(key);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "w_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ct = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    at::Tensor st = at::exp2(log2_step.to(ct)).reshape({-1}).contiguous();
    at::Tensor zt = zero_point.to(ct).contiguous();
    const acc_t* sp = st.data_ptr<acc_t>();
    const acc_t* zp = zt.data_ptr<acc_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    double* op = out.data_ptr<double>();
    const int64_t grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(K, 1));
    auto run = [&](const auto* gp) {
      using grad_t = std::remove_cv_t<std::remove_pointer_t<decltype(gp)>>;
      at::parallel_for(0, C, grain, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          const int64_t base = c * K;
          const acc_t s = sp[per_channel ? c : 0];
          const acc_t zc = zp[c];
          const acc_t smag = dither ? s * static_cast<acc_t>(mag) : acc_t(0);
          if (dither && cl) {
            op[c] = w_grad_row<scalar_t, grad_t, acc_t, true, true>(wp, gp, base, K, s, zc, smag,
                                                                    ukey, cl_channels, cl_pixels);
          } else if (dither) {
            op[c] = w_grad_row<scalar_t, grad_t, acc_t, true, false>(wp, gp, base, K, s, zc, smag,
                                                                     ukey, 0, 1);
          } else {
            op[c] = w_grad_row<scalar_t, grad_t, acc_t, false, false>(wp, gp, base, K, s, zc, smag,
                                                                      ukey, 0, 1);
          }
        }
      });
    };
    if (g.scalar_type() == w.scalar_type()) {
      run(g.data_ptr<scalar_t>());
    } else {
      run(g.data_ptr<acc_t>());
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("act_forward", &act_forward, "GDNSQ activation quantizer forward (fused)");
  m.def("act_backward", &act_backward, "GDNSQ activation quantizer backward (fused)");
  m.def("w_forward", &w_forward, "GDNSQ weight quantizer forward (fused)");
  m.def("w_backward", &w_backward, "GDNSQ weight quantizer backward (fused)");
}
