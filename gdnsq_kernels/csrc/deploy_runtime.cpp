// Fused bit-packed runtime for the quantized trunk of a frozen CIFAR-ResNet-style model.
//
// One call runs every basic block (conv1 -> BN -> ReLU -> conv2 -> BN -> + shortcut -> ReLU)
// on NHWC data. Between the two convs of a block the activation never exists as float: conv1's
// epilogue compares its float32 output with per-channel thresholds (BN + ReLU + the next
// quantizer folded at plan time, in Python, through the real PyTorch ops) and writes bit
// planes. conv2's epilogue applies BN (fmaf, the op PyTorch's CPU kernel runs), adds the
// shortcut, applies ReLU, writes the float residual stream and packs the next block's codes with
// per-tensor thresholds.
//
// Each conv reads its input in one of two formats, chosen per conv at plan time (the producing
// epilogue writes the consumer's format; see enum Format):
// * packed: [N][H][W][planes][CW] uint64, CW = ceil(C/64), bit c%64 of word c/64 of plane q =
//   bit q of channel c's code; bits past C are 0 (popcount convolution below);
// * bytes: one uint8 code per channel, spatially zero-padded ([N][H+2ph][W+2pw][Cp]); the
//   convolution runs vpdpbusd (uint8 codes x int8 weight codes -> int32) on AVX-512 VNNI
//   builds, register-blocked over output channels and adjacent output pixels, plain integer
//   loops elsewhere. Both give the same exact integer sums S_kj and S_j.
// The trunk runs chunk_images images at a time through all blocks, reusing its buffers.
// Packed convolution: per output pixel an implicit-im2col row of K = kh*kw*C bits per plane is built
// (tap-major, channel-minor, packed tightly: a 16-channel layer puts 4 taps in one 64-bit word,
// no all-ones row), padded taps are code 0. S_kj = sum_{p,q} 2^(p+q) popcount(row_q & w_p),
// S_j = sum_q 2^q popcount(row_q). Epilogue (float64, same order as binary_ops' conv
// epilogue): y = float(S_kj*s[o] + cst[pos][o] + S_j*ms[o]).
//
// Build with -ffp-contract=off: the float64 epilogue must not be contracted into FMAs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define GDNSQ_RT_AVX512 1
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GDNSQ_RT_VNNI 1
#endif
#endif

namespace {

const char* isa_name() {
#if defined(GDNSQ_RT_VNNI)
  return "avx512_vnni";
#elif defined(GDNSQ_RT_AVX512)
  return "avx512_vpopcntdq";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

inline int popcnt64(uint64_t v) { return __builtin_popcountll(v); }

// The entry points check what gdnsq/deploy/runtime.py already guarantees (a last line of
// defence): tensors on the CPU (their data pointers are read as host memory) and a conv
// geometry that is positive and self-consistent (it sizes every buffer and loop bound).
void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

constexpr int64_t kMaxExtent = int64_t(1) << 20;  // any one size of the geometry (no overflow)
constexpr int64_t kMaxBits = 16;

// Input formats of a conv (chosen per conv at plan time; the producer writes the consumer's):
//  * kPacked: bit planes, [N][H][W][ba][CWin] uint64 (see the file comment);
//  * kBytes: one uint8 code per channel, spatially zero-padded by the conv's own padding,
//    [N][H + 2ph][W + 2pw][Cp] with Cp = Cin rounded up to 4 (pad channels and border = code 0,
//    which is what a padded tap contributes to S_kj and S_j; C holds the real-tap corrections).
enum Format : int64_t { kPacked = 0, kBytes = 1 };

struct Conv {
  int64_t Cin, O, kh, kw, sh, sw, ph, pw, H, W, Ho, Wo, ba, bw, fmt;
  int64_t CWin, K, Kw, Opad;
  int64_t Cp, Hp, Wp;         // kBytes geometry
  std::vector<uint64_t> wT;   // kPacked: [bw][Kw][Opad]
  std::vector<int8_t> wB;     // kBytes: [kh*kw*Cp/4][Opad][4] weight codes (vpdpbusd operand order)
  std::vector<int32_t> wI;    // kBytes without VNNI: [kh*kw*Cp][Opad]
  std::vector<double> s, ms;  // [Opad]
  std::vector<double> cst;    // [Ho*Wo][Opad]

  // size of one image of this conv's input buffer, in bytes
  int64_t img_bytes() const { return fmt == kBytes ? Hp * Wp * Cp : H * W * ba * CWin * 8; }
  // the input buffer of N images (zeroed), as 64-bit words (+1 word of slack for the byte loads)
  int64_t input_words(int64_t N) const { return (N * img_bytes() + 7) / 8 + 1; }
  std::vector<uint64_t> alloc_input(int64_t N) const { return std::vector<uint64_t>(input_words(N), 0); }
  // where the codes of input pixel (n, h, w) go: uint64 planes (kPacked) or Cp bytes (kBytes)
  // image n of an input buffer
  const void* image(const uint64_t* buf, int64_t n) const { return reinterpret_cast<const uint8_t*>(buf) + n * img_bytes(); }
  void* pixel(uint64_t* buf, int64_t n, int64_t h, int64_t w) const {
    if (fmt == kBytes) return reinterpret_cast<uint8_t*>(buf) + ((n * Hp + h + ph) * Wp + w + pw) * Cp;
    return buf + ((n * H + h) * W + w) * ba * CWin;
  }
};

Conv make_conv(const std::vector<int64_t>& meta, const torch::Tensor& wT, const torch::Tensor& s,
               const torch::Tensor& ms, const torch::Tensor& cst) {
  TORCH_CHECK(meta.size() == 15, "conv meta must have 15 entries");
  for (const torch::Tensor* t : {&wT, &s, &ms, &cst}) check_cpu(*t, "conv tables");
  Conv c;
  c.Cin = meta[0]; c.O = meta[1]; c.kh = meta[2]; c.kw = meta[3]; c.sh = meta[4]; c.sw = meta[5];
  c.ph = meta[6]; c.pw = meta[7]; c.H = meta[8]; c.W = meta[9]; c.Ho = meta[10]; c.Wo = meta[11];
  c.ba = meta[12]; c.bw = meta[13]; c.fmt = meta[14];
  TORCH_CHECK(c.fmt == kPacked || c.fmt == kBytes, "conv format must be 0 (packed) or 1 (bytes)");
  for (int64_t v : {c.Cin, c.O, c.kh, c.kw, c.sh, c.sw, c.H, c.W})
    TORCH_CHECK_VALUE(v >= 1 && v <= kMaxExtent, "conv meta: Cin, O, kh, kw, strides, H, W must be in [1, ",
                      kMaxExtent, "], got ", v);
  TORCH_CHECK_VALUE(c.ph >= 0 && c.ph <= kMaxExtent && c.pw >= 0 && c.pw <= kMaxExtent,
                    "conv meta: padding must be in [0, ", kMaxExtent, "], got ", c.ph, ", ", c.pw);
  TORCH_CHECK_VALUE(c.H + 2 * c.ph >= c.kh && c.W + 2 * c.pw >= c.kw &&
                        c.Ho == (c.H + 2 * c.ph - c.kh) / c.sh + 1 && c.Wo == (c.W + 2 * c.pw - c.kw) / c.sw + 1,
                    "conv meta: Ho, Wo = ", c.Ho, ", ", c.Wo, " do not follow from H, W, kernel, stride, padding");
  TORCH_CHECK_VALUE(c.ba >= 1 && c.ba <= kMaxBits && c.bw >= 1 && c.bw <= kMaxBits,
                    "conv meta: act_bits and weight_bits must be in [1, ", kMaxBits, "], got ", c.ba, ", ", c.bw);
  c.CWin = (c.Cin + 63) / 64;
  c.K = c.kh * c.kw * c.Cin;
  c.Kw = (c.K + 63) / 64;
  c.Opad = (c.O + 15) / 16 * 16;
  c.Cp = (c.Cin + 3) / 4 * 4;
  c.Hp = c.H + 2 * c.ph;
  c.Wp = c.W + 2 * c.pw;
  if (c.fmt == kPacked) {
    TORCH_CHECK(wT.dtype() == torch::kInt64 && wT.is_contiguous() && wT.numel() == c.bw * c.Kw * c.Opad,
                "wT must be int64 contiguous of bw*Kw*Opad words");
    c.wT.resize(wT.numel());
    std::memcpy(c.wT.data(), wT.data_ptr<int64_t>(), wT.numel() * 8);
  } else {
    TORCH_CHECK(c.ba <= 8 && c.bw <= 7, "bytes format needs act_bits <= 8 and weight_bits <= 7");
    const int64_t nk = c.kh * c.kw * c.Cp;
    TORCH_CHECK(wT.dtype() == torch::kInt8 && wT.is_contiguous() && wT.numel() == nk * c.Opad,
                "bytes weights must be int8 contiguous (kh*kw*Cp/4, Opad, 4)");
    const int8_t* src = wT.data_ptr<int8_t>();
#if defined(GDNSQ_RT_VNNI)
    c.wB.assign(src, src + wT.numel());
#else
    c.wI.assign(nk * c.Opad, 0);
    for (int64_t k = 0; k < nk; ++k)
      for (int64_t o = 0; o < c.Opad; ++o) c.wI[k * c.Opad + o] = src[((k / 4) * c.Opad + o) * 4 + k % 4];
#endif
  }
  TORCH_CHECK(s.dtype() == torch::kFloat64 && s.numel() == c.O && ms.dtype() == torch::kFloat64 && ms.numel() == c.O,
              "s/ms must be float64 (O,)");
  auto sc = s.contiguous(), msc = ms.contiguous();
  // per-channel arrays padded to Opad (zeros): the vector epilogue reads whole 16-channel blocks
  c.s.assign(c.Opad, 0.0);
  c.ms.assign(c.Opad, 0.0);
  std::copy(sc.data_ptr<double>(), sc.data_ptr<double>() + c.O, c.s.begin());
  std::copy(msc.data_ptr<double>(), msc.data_ptr<double>() + c.O, c.ms.begin());
  TORCH_CHECK(cst.dtype() == torch::kFloat64 && cst.numel() == c.Ho * c.Wo * c.O, "cst must be float64 (Ho*Wo, O)");
  auto cc = cst.contiguous();
  c.cst.assign(c.Ho * c.Wo * c.Opad, 0.0);
  for (int64_t p = 0; p < c.Ho * c.Wo; ++p)
    std::copy(cc.data_ptr<double>() + p * c.O, cc.data_ptr<double>() + (p + 1) * c.O, c.cst.begin() + p * c.Opad);
  return c;
}

// OR `nbits` bits (from words `src`, bits past nbits are 0) into `dst` at bit offset `off`.
inline void insert_bits(uint64_t* dst, const uint64_t* src, int64_t nbits, int64_t off) {
  const int64_t nw = (nbits + 63) / 64;
  const int64_t w0 = off >> 6, sh = off & 63;
  if (sh == 0) {
    for (int64_t i = 0; i < nw; ++i) dst[w0 + i] |= src[i];
    return;
  }
  for (int64_t i = 0; i < nw; ++i) {
    const uint64_t v = src[i];
    dst[w0 + i] |= v << sh;
    const int64_t hi_bits = std::min<int64_t>(64, nbits - 64 * i);
    if (sh + hi_bits > 64) dst[w0 + i + 1] |= v >> (64 - sh);
  }
}

// Integer sums of one output pixel: acc[o] = S_kj (o < Opad), returns S_j.
// row: [ba][Kw] scratch, filled here.
inline int64_t pixel_sums(const Conv& c, const uint64_t* in_n, int64_t oh, int64_t ow, uint64_t* row,
                          int64_t* acc) {
  std::memset(row, 0, sizeof(uint64_t) * c.ba * c.Kw);
  const int64_t pix_words = c.ba * c.CWin;
  for (int64_t i = 0; i < c.kh; ++i) {
    const int64_t ih = oh * c.sh - c.ph + i;
    if (ih < 0 || ih >= c.H) continue;
    for (int64_t j = 0; j < c.kw; ++j) {
      const int64_t iw = ow * c.sw - c.pw + j;
      if (iw < 0 || iw >= c.W) continue;
      const uint64_t* px = in_n + (ih * c.W + iw) * pix_words;
      const int64_t off = (i * c.kw + j) * c.Cin;
      for (int64_t q = 0; q < c.ba; ++q) insert_bits(row + q * c.Kw, px + q * c.CWin, c.Cin, off);
    }
  }
  int64_t sj = 0;
  for (int64_t q = 0; q < c.ba; ++q) {
    int64_t t = 0;
    for (int64_t w = 0; w < c.Kw; ++w) t += popcnt64(row[q * c.Kw + w]);
    sj += t << q;
  }
#if defined(GDNSQ_RT_AVX512)
  for (int64_t ob = 0; ob < c.Opad; ob += 8) {
    __m512i tot = _mm512_setzero_si512();
    for (int64_t p = 0; p < c.bw; ++p) {
      const uint64_t* wp = c.wT.data() + p * c.Kw * c.Opad + ob;
      for (int64_t q = 0; q < c.ba; ++q) {
        const uint64_t* rq = row + q * c.Kw;
        __m512i a = _mm512_setzero_si512();
        for (int64_t w = 0; w < c.Kw; ++w) {
          const __m512i wv = _mm512_loadu_si512(reinterpret_cast<const void*>(wp + w * c.Opad));
          a = _mm512_add_epi64(a, _mm512_popcnt_epi64(_mm512_and_si512(_mm512_set1_epi64((long long)rq[w]), wv)));
        }
        tot = _mm512_add_epi64(tot, _mm512_sll_epi64(a, _mm_cvtsi64_si128(p + q)));
      }
    }
    _mm512_storeu_si512(reinterpret_cast<void*>(acc + ob), tot);
  }
#else
  for (int64_t o = 0; o < c.Opad; ++o) acc[o] = 0;
  for (int64_t p = 0; p < c.bw; ++p) {
    for (int64_t q = 0; q < c.ba; ++q) {
      const uint64_t* rq = row + q * c.Kw;
      for (int64_t w = 0; w < c.Kw; ++w) {
        const uint64_t r = rq[w];
        if (r == 0) continue;
        const uint64_t* wp = c.wT.data() + (p * c.Kw + w) * c.Opad;
        for (int64_t o = 0; o < c.O; ++o) acc[o] += (int64_t)popcnt64(r & wp[o]) << (p + q);
      }
    }
  }
#endif
  return sj;
}

// ---- kBytes: uint8 activation codes x int8 weight codes -> int32 (exact: the plan checks
// K * (2^ba - 1) * (2^bw - 1) < 2^31) ----

// S_j of output pixel (oh, ow): the sum of the codes under the window (padded taps are 0).
inline int64_t bytes_sj(const Conv& c, const uint8_t* in_n, int64_t oh, int64_t ow) {
  const int64_t len = c.kw * c.Cp;  // one kernel row of taps is contiguous in the padded layout
#if defined(GDNSQ_RT_VNNI)
  // vpsadbw sums of every kernel row in one accumulator, one horizontal sum per pixel
  const int64_t full = len & ~int64_t(63);
  const __mmask64 tail = (__mmask64(1) << (len - full)) - 1;  // len - full < 64
  __m512i tot = _mm512_setzero_si512();
  for (int64_t i = 0; i < c.kh; ++i) {
    const uint8_t* r = in_n + ((oh * c.sh + i) * c.Wp + ow * c.sw) * c.Cp;
    for (int64_t b = 0; b < full; b += 64)
      tot = _mm512_add_epi64(tot, _mm512_sad_epu8(_mm512_loadu_si512(reinterpret_cast<const void*>(r + b)),
                                                  _mm512_setzero_si512()));
    if (tail) tot = _mm512_add_epi64(tot, _mm512_sad_epu8(_mm512_maskz_loadu_epi8(tail, r + full), _mm512_setzero_si512()));
  }
  return _mm512_reduce_add_epi64(tot);
#else
  int64_t sj = 0;
  for (int64_t i = 0; i < c.kh; ++i) {
    const uint8_t* r = in_n + ((oh * c.sh + i) * c.Wp + ow * c.sw) * c.Cp;
    int64_t t = 0;
    for (int64_t b = 0; b < len; ++b) t += r[b];
    sj += t;
  }
  return sj;
#endif
}

#if defined(GDNSQ_RT_VNNI)
inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// S_kj of P adjacent output pixels (ow0 .. ow0+P-1) for the NB 16-channel blocks from ob0:
// per tap and group of 4 channels, one weight load per block, one vpdpbusd per (pixel, block).
template <int NB, int P>
inline void vnni_tile(const Conv& c, const uint8_t* in_n, int64_t oh, int64_t ow0, int64_t ob0, int64_t* acc) {
  __m512i a[P][NB];
  for (int p = 0; p < P; ++p)
    for (int nb = 0; nb < NB; ++nb) a[p][nb] = _mm512_setzero_si512();
  const int64_t cq = c.Cp / 4, pstep = c.sw * c.Cp;
  for (int64_t i = 0; i < c.kh; ++i) {
    for (int64_t j = 0; j < c.kw; ++j) {
      const uint8_t* px = in_n + ((oh * c.sh + i) * c.Wp + ow0 * c.sw + j) * c.Cp;
      const int8_t* wt = c.wB.data() + ((i * c.kw + j) * cq * c.Opad + ob0) * 4;
      for (int64_t q = 0; q < cq; ++q) {
        __m512i w[NB];
        for (int nb = 0; nb < NB; ++nb)
          w[nb] = _mm512_loadu_si512(reinterpret_cast<const void*>(wt + (q * c.Opad + 16 * nb) * 4));
        for (int p = 0; p < P; ++p) {
          const __m512i x = _mm512_set1_epi32(load_i32(px + p * pstep + 4 * q));
          for (int nb = 0; nb < NB; ++nb) a[p][nb] = _mm512_dpbusd_epi32(a[p][nb], x, w[nb]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int nb = 0; nb < NB; ++nb) {
      int64_t* dst = acc + p * c.Opad + ob0 + 16 * nb;
      _mm512_storeu_si512(reinterpret_cast<void*>(dst), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a[p][nb])));
      _mm512_storeu_si512(reinterpret_cast<void*>(dst + 8), _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a[p][nb], 1)));
    }
}

template <int NB, int P>
inline void vnni_row(const Conv& c, const uint8_t* in_n, int64_t oh, int64_t ob0, int64_t* acc) {
  int64_t ow = 0;
  for (; ow + P <= c.Wo; ow += P) vnni_tile<NB, P>(c, in_n, oh, ow, ob0, acc + ow * c.Opad);
  for (; ow < c.Wo; ++ow) vnni_tile<NB, 1>(c, in_n, oh, ow, ob0, acc + ow * c.Opad);
}
#endif

// S_kj of a whole output row (acc [Wo][Opad]) and S_j (sj [Wo]) on kBytes input
inline void bytes_row_sums(const Conv& c, const uint8_t* in_n, int64_t oh, int64_t* acc, int64_t* sj) {
  for (int64_t ow = 0; ow < c.Wo; ++ow) sj[ow] = bytes_sj(c, in_n, oh, ow);
#if defined(GDNSQ_RT_VNNI)
  // output channels in chunks of up to 4 blocks of 16; pixel tiles sized to the 32 zmm registers
  for (int64_t ob0 = 0; ob0 < c.Opad; ob0 += 64) {
    switch ((c.Opad - ob0) >= 64 ? 4 : (c.Opad - ob0) / 16) {
      case 4: vnni_row<4, 4>(c, in_n, oh, ob0, acc); break;
      case 3: vnni_row<3, 6>(c, in_n, oh, ob0, acc); break;
      case 2: vnni_row<2, 8>(c, in_n, oh, ob0, acc); break;
      default: vnni_row<1, 8>(c, in_n, oh, ob0, acc); break;
    }
  }
#else
  std::vector<int32_t> abuf(c.Opad);
  int32_t* __restrict a = abuf.data();
  for (int64_t ow = 0; ow < c.Wo; ++ow) {
    std::fill(abuf.begin(), abuf.end(), 0);
    for (int64_t i = 0; i < c.kh; ++i) {
      for (int64_t j = 0; j < c.kw; ++j) {
        const uint8_t* px = in_n + ((oh * c.sh + i) * c.Wp + ow * c.sw + j) * c.Cp;
        const int32_t* wt = c.wI.data() + (i * c.kw + j) * c.Cp * c.Opad;
        for (int64_t ch = 0; ch < c.Cin; ++ch) {
          const int32_t x = px[ch];
          if (x == 0) continue;
          const int32_t* __restrict w = wt + ch * c.Opad;
          for (int64_t o = 0; o < c.Opad; ++o) a[o] += x * w[o];
        }
      }
    }
    for (int64_t o = 0; o < c.Opad; ++o) acc[ow * c.Opad + o] = a[o];
  }
#endif
}

// S_kj (acc [Wo][Opad]) and S_j (sj [Wo]) of output row oh of image in_n, either format.
// row: kPacked scratch of ba*Kw words.
inline void row_sums(const Conv& c, const void* img, int64_t oh, uint64_t* row, int64_t* acc, int64_t* sj) {
  if (c.fmt == kBytes) {
    bytes_row_sums(c, static_cast<const uint8_t*>(img), oh, acc, sj);
    return;
  }
  const uint64_t* in_n = static_cast<const uint64_t*>(img);
  for (int64_t ow = 0; ow < c.Wo; ++ow) sj[ow] = pixel_sums(c, in_n, oh, ow, row, acc + ow * c.Opad);
}

// Calls fn(n, oh, ow, pos, acc, sj) for every output pixel of conv c over the N images of `in`
// (output rows split across threads): acc points at the pixel's Opad integer sums S_kj, sj is
// its S_j, pos = oh * Wo + ow.
template <class F>
void for_each_output_pixel(const Conv& c, const uint64_t* in, int64_t N, F&& fn) {
  at::parallel_for(0, N * c.Ho, 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint64_t> row(c.ba * c.Kw);
    std::vector<int64_t> acc(c.Wo * c.Opad), sjs(c.Wo);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / c.Ho, oh = r % c.Ho;
      row_sums(c, c.image(in, n), oh, row.data(), acc.data(), sjs.data());
      for (int64_t ow = 0; ow < c.Wo; ++ow) fn(n, oh, ow, oh * c.Wo + ow, acc.data() + ow * c.Opad, sjs[ow]);
    }
  });
}

inline float epilogue(const Conv& c, int64_t pos, int64_t o, int64_t kj, int64_t sj) {
  double t = static_cast<double>(kj) * c.s[o];
  t = t + c.cst[pos * c.Opad + o];
  t = t + static_cast<double>(sj) * c.ms[o];
  return static_cast<float>(t);
}

#if defined(GDNSQ_RT_AVX512)
// epilogue() of channels ob..ob+15 (ob a multiple of 16), same float64 operations per lane
inline __m512 epilogue16(const Conv& c, int64_t pos, int64_t ob, const int64_t* acc, int64_t sj) {
  const __m512d sjd = _mm512_set1_pd(static_cast<double>(sj));
  const double* cs = c.cst.data() + pos * c.Opad + ob;
  __m256 half[2];
  for (int h = 0; h < 2; ++h) {
    const int64_t o = ob + 8 * h;
    __m512d t = _mm512_mul_pd(_mm512_cvtepi64_pd(_mm512_loadu_si512(reinterpret_cast<const void*>(acc + o))),
                              _mm512_loadu_pd(c.s.data() + o));
    t = _mm512_add_pd(t, _mm512_loadu_pd(cs + 8 * h));
    t = _mm512_add_pd(t, _mm512_mul_pd(sjd, _mm512_loadu_pd(c.ms.data() + o)));
    half[h] = _mm512_cvtpd_ps(t);
  }
  return _mm512_insertf32x8(_mm512_castps256_ps512(half[0]), half[1], 1);
}

inline __mmask16 lanes_below(int64_t ob, int64_t n) {
  const int64_t r = n - ob;
  return r >= 16 ? (__mmask16)0xFFFF : (r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1));
}

// OR the bit planes of 16 codes (channels ob..ob+15) into a pixel's planes
inline void pack16(uint64_t* planes, int64_t cw, int64_t ob, __m512i code, int64_t nplanes, __mmask16 valid) {
  for (int64_t q = 0; q < nplanes; ++q) {
    const __mmask16 m = _mm512_test_epi32_mask(code, _mm512_set1_epi32(1 << q)) & valid;
    planes[q * cw + (ob >> 6)] |= static_cast<uint64_t>(m) << (ob & 63);
  }
}

// store 16 codes (channels ob..ob+15, lanes in `valid`) into a pixel of conv dst's input
inline void store16(const Conv& dst, void* pix, int64_t ob, __m512i code, __mmask16 valid) {
  if (dst.fmt == kBytes)
    _mm512_mask_cvtepi32_storeu_epi8(static_cast<uint8_t*>(pix) + ob, valid, code);
  else
    pack16(static_cast<uint64_t*>(pix), dst.CWin, ob, code, dst.ba, valid);
}

// #{l : v >= t[l]} per lane, t[l] broadcast (per-tensor) or per lane (stride > 0)
inline __m512i count16(__m512 v, const float* t, int64_t n, int64_t stride) {
  __m512i code = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t l = 0; l < n; ++l) {
    const __m512 tl = stride ? _mm512_loadu_ps(t + l * stride) : _mm512_set1_ps(t[l]);
    code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(v, tl, _CMP_GE_OQ), code, one);
  }
  return code;
}
#endif

struct Block {
  Conv c1, c2;
  int64_t lv1;               // threshold levels of conv2's input codes (2^ba2 - 1)
  std::vector<float> thr1;   // [O1][lv1]
  std::vector<int8_t> dir1;  // [O1]: +1 code counts y >= t, -1 counts y <= t
  std::vector<float> thr1v, sign1;   // vector form: [lv1][Opad] sign*thr, [Opad] sign (code = #(sign*y >= .))
  std::vector<float> alpha2, beta2;  // BN after conv2: fmaf(y, alpha, beta), [Opad]
  int64_t sc_pad;            // -1: identity shortcut; else option A: x[:, ::2, ::2] padded by sc_pad channels
  int64_t lvn;               // levels of the next block's input codes (0: last block)
  std::vector<float> thrn;   // [lvn], per tensor, counts z >= t
};

inline void pack_code(uint64_t* planes, int64_t cw, int64_t ch, int code, int64_t nplanes) {
  for (int64_t q = 0; q < nplanes; ++q)
    if ((code >> q) & 1) planes[q * cw + (ch >> 6)] |= uint64_t(1) << (ch & 63);
}

// store the code of channel ch into a pixel of conv dst's input
inline void store_code(const Conv& dst, void* pix, int64_t ch, int code) {
  if (dst.fmt == kBytes)
    static_cast<uint8_t*>(pix)[ch] = static_cast<uint8_t>(code);
  else
    pack_code(static_cast<uint64_t*>(pix), dst.CWin, ch, code, dst.ba);
}

inline int count_ge(float v, const float* t, int64_t n) {
  int code = 0;
  for (int64_t l = 0; l < n; ++l) code += (v >= t[l]);
  return code;
}

class Runtime {
 public:
  std::vector<Block> blocks;
  int64_t lv0 = 0;
  std::vector<float> thr0;

  void set_entry(torch::Tensor thr) {
    check_cpu(thr, "entry thresholds");
    auto t = thr.contiguous();
    TORCH_CHECK(t.dtype() == torch::kFloat32, "entry thresholds must be float32");
    thr0.assign(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
    lv0 = t.numel();
  }

  void add_block(std::vector<int64_t> meta1, torch::Tensor w1, torch::Tensor s1, torch::Tensor ms1,
                 torch::Tensor cst1, torch::Tensor thr1, torch::Tensor dir1, std::vector<int64_t> meta2,
                 torch::Tensor w2, torch::Tensor s2, torch::Tensor ms2, torch::Tensor cst2, torch::Tensor alpha2,
                 torch::Tensor beta2, int64_t sc_pad, torch::Tensor thrn) {
    for (const torch::Tensor* t : {&thr1, &dir1, &alpha2, &beta2, &thrn}) check_cpu(*t, "block tables");
    Block b;
    b.c1 = make_conv(meta1, w1, s1, ms1, cst1);
    b.c2 = make_conv(meta2, w2, s2, ms2, cst2);
    TORCH_CHECK(b.c2.Cin == b.c1.O && b.c2.H == b.c1.Ho && b.c2.W == b.c1.Wo, "conv2 must read conv1's output");
    b.lv1 = (int64_t(1) << b.c2.ba) - 1;
    auto t1 = thr1.contiguous();
    TORCH_CHECK(t1.dtype() == torch::kFloat32 && t1.numel() == b.c1.O * b.lv1, "thr1 must be float32 (O1, lv1)");
    b.thr1.assign(t1.data_ptr<float>(), t1.data_ptr<float>() + t1.numel());
    auto d1 = dir1.contiguous();
    TORCH_CHECK(d1.dtype() == torch::kInt8 && d1.numel() == b.c1.O, "dir1 must be int8 (O1,)");
    b.dir1.assign(d1.data_ptr<int8_t>(), d1.data_ptr<int8_t>() + d1.numel());
    auto a2 = alpha2.contiguous(), be2 = beta2.contiguous();
    TORCH_CHECK(a2.dtype() == torch::kFloat32 && a2.numel() == b.c2.O && be2.dtype() == torch::kFloat32 &&
                    be2.numel() == b.c2.O, "alpha2/beta2 must be float32 (O2,)");
    b.alpha2.assign(b.c2.Opad, 0.0f);
    b.beta2.assign(b.c2.Opad, 0.0f);
    std::copy(a2.data_ptr<float>(), a2.data_ptr<float>() + b.c2.O, b.alpha2.begin());
    std::copy(be2.data_ptr<float>(), be2.data_ptr<float>() + b.c2.O, b.beta2.begin());
    b.sign1.assign(b.c1.Opad, 1.0f);
    b.thr1v.assign(b.lv1 * b.c1.Opad, 0.0f);
    for (int64_t o = 0; o < b.c1.O; ++o) {
      const float sg = b.dir1[o] > 0 ? 1.0f : -1.0f;  // y <= t  <=>  -y >= -t (negation is exact)
      b.sign1[o] = sg;
      for (int64_t l = 0; l < b.lv1; ++l) b.thr1v[l * b.c1.Opad + o] = sg * b.thr1[o * b.lv1 + l];
    }
    b.sc_pad = sc_pad;
    if (sc_pad < 0) {
      TORCH_CHECK(b.c1.Cin == b.c2.O && b.c1.H == b.c2.Ho && b.c1.W == b.c2.Wo, "identity shortcut shape");
    } else {
      TORCH_CHECK(b.c1.Cin + 2 * sc_pad == b.c2.O && (b.c1.H + 1) / 2 == b.c2.Ho && (b.c1.W + 1) / 2 == b.c2.Wo,
                  "option-A shortcut shape");
    }
    auto tn = thrn.contiguous();
    TORCH_CHECK(tn.dtype() == torch::kFloat32, "next thresholds must be float32");
    b.thrn.assign(tn.data_ptr<float>(), tn.data_ptr<float>() + tn.numel());
    b.lvn = tn.numel();
    if (!blocks.empty()) {
      const Block& p = blocks.back();
      TORCH_CHECK(p.lvn == (int64_t(1) << b.c1.ba) - 1 && p.c2.O == b.c1.Cin && p.c2.Ho == b.c1.H && p.c2.Wo == b.c1.W,
                  "block input does not match the previous block's output");
    }
    blocks.push_back(std::move(b));
  }

  // images per pass through the whole trunk: the activations of a few images stay in the
  // cache between layers and the buffers are reused (no page faults on fresh buffers per layer)
  int64_t chunk_images = 8;

  // x: (N, H, W, C) float32 contiguous, the trunk input. Returns the last block's output, NHWC.
  torch::Tensor forward(torch::Tensor x) {
    TORCH_CHECK(!blocks.empty(), "runtime has no block");
    check_cpu(x, "x");
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(), "x must be float32 NHWC contiguous");
    const Conv& first = blocks[0].c1;
    TORCH_CHECK(x.size(1) == first.H && x.size(2) == first.W && x.size(3) == first.Cin, "x shape does not match the plan");
    TORCH_CHECK(lv0 == (int64_t(1) << first.ba) - 1, "entry thresholds do not match block 0");
    TORCH_CHECK(chunk_images >= 1, "chunk_images must be >= 1");
    const Conv& last = blocks.back().c2;
    const int64_t N = x.size(0);
    auto out = torch::empty({N, last.Ho, last.Wo, last.O}, x.options());
    const int64_t in_img = first.H * first.W * first.Cin, out_img = last.Ho * last.Wo * last.O;
    Scratch sc;
    for (int64_t n0 = 0; n0 < N; n0 += chunk_images) {
      const int64_t nc = std::min(chunk_images, N - n0);
      forward_chunk(x.data_ptr<float>() + n0 * in_img, nc, out.data_ptr<float>() + n0 * out_img, sc);
    }
    return out;
  }

 private:
  struct Scratch {
    std::vector<uint64_t> a, b, mid;  // codes: current block input, next block input, conv2 input
    std::vector<float> z[2];          // float residual stream between blocks
  };

  // the trunk on N images: X (N, H, W, Cin) -> OUT (N, Ho, Wo, O) of the last block
  void forward_chunk(const float* X0, int64_t N, float* OUT, Scratch& sc) {
    const Conv& first = blocks[0].c1;
    // entry: per-tensor codes of x, in block 0's conv1 input format
    std::vector<uint64_t>& packed = sc.a;
    packed.assign(first.input_words(N), 0);
    {
      const float* X = X0;
      const int64_t C = first.Cin, HW = first.H * first.W;
      uint64_t* dst = packed.data();
      const float* t0 = thr0.data();
      const int64_t lv = lv0;
      at::parallel_for(0, N * HW, 256, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          void* pix = first.pixel(dst, p / HW, (p % HW) / first.W, p % first.W);
          const float* xp = X + p * C;
#if defined(GDNSQ_RT_AVX512)
          for (int64_t cb = 0; cb < C; cb += 16) {
            const __mmask16 valid = lanes_below(cb, C);
            store16(first, pix, cb, count16(_mm512_maskz_loadu_ps(valid, xp + cb), t0, lv, 0), valid);
          }
#else
          for (int64_t ch = 0; ch < C; ++ch) store_code(first, pix, ch, count_ge(xp[ch], t0, lv));
#endif
        }
      });
    }
    const float* cur = X0;
    for (size_t bi = 0; bi < blocks.size(); ++bi) {
      const Block& b = blocks[bi];
      const Conv& c1 = b.c1;
      const Conv& c2 = b.c2;
      // conv1 -> codes of conv2's input (conv2's format)
      std::vector<uint64_t>& mid = sc.mid;
      mid.assign(c2.input_words(N), 0);
      {
        const uint64_t* in = packed.data();
        uint64_t* out = mid.data();
        for_each_output_pixel(c1, in, N, [&](int64_t n, int64_t oh, int64_t ow, int64_t pos, const int64_t* a, int64_t sj) {
              void* pix = c2.pixel(out, n, oh, ow);
#if defined(GDNSQ_RT_AVX512)
              for (int64_t ob = 0; ob < c1.Opad; ob += 16) {
                const __mmask16 valid = lanes_below(ob, c1.O);
                const __m512 y = _mm512_mul_ps(epilogue16(c1, pos, ob, a, sj), _mm512_loadu_ps(b.sign1.data() + ob));
                if (b.lv1 == 1 && c2.fmt == kPacked) {
                  const __mmask16 m = _mm512_cmp_ps_mask(y, _mm512_loadu_ps(b.thr1v.data() + ob), _CMP_GE_OQ) & valid;
                  static_cast<uint64_t*>(pix)[ob >> 6] |= static_cast<uint64_t>(m) << (ob & 63);
                } else {
                  store16(c2, pix, ob, count16(y, b.thr1v.data() + ob, b.lv1, c1.Opad), valid);
                }
              }
#else
              for (int64_t o = 0; o < c1.O; ++o) {
                const float y = epilogue(c1, pos, o, a[o], sj);
                const float* t = b.thr1.data() + o * b.lv1;
                int code = 0;
                if (b.dir1[o] > 0) {
                  for (int64_t l = 0; l < b.lv1; ++l) code += (y >= t[l]);
                } else {
                  for (int64_t l = 0; l < b.lv1; ++l) code += (y <= t[l]);
                }
                store_code(c2, pix, o, code);
              }
#endif
        });
      }
      // conv2 -> BN, + shortcut, ReLU -> float stream (+ next block's codes, in its format)
      float* Z = OUT;
      if (bi + 1 < blocks.size()) {
        sc.z[bi & 1].resize(N * c2.Ho * c2.Wo * c2.O);
        Z = sc.z[bi & 1].data();
      }
      const Conv* nc = b.lvn > 0 ? &blocks[bi + 1].c1 : nullptr;
      std::vector<uint64_t>& next = sc.b;
      next.assign(nc ? nc->input_words(N) : 0, 0);
      {
        const uint64_t* in = mid.data();
        const float* X = cur;
        uint64_t* nxt = next.data();
        const int64_t xH = c1.H, xW = c1.W, xC = c1.Cin;
        for_each_output_pixel(c2, in, N, [&](int64_t n, int64_t oh, int64_t ow, int64_t pos, const int64_t* a, int64_t sj) {
              float* zp = Z + ((n * c2.Ho + oh) * c2.Wo + ow) * c2.O;
              const float* xs;
              if (b.sc_pad < 0)
                xs = X + ((n * xH + oh) * xW + ow) * xC;
              else
                xs = X + ((n * xH + 2 * oh) * xW + 2 * ow) * xC;
              void* pix = nc ? nc->pixel(nxt, n, oh, ow) : nullptr;
#if defined(GDNSQ_RT_AVX512)
              const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
              for (int64_t ob = 0; ob < c2.Opad; ob += 16) {
                const __mmask16 valid = lanes_below(ob, c2.O);
                const __m512 y = epilogue16(c2, pos, ob, a, sj);
                const __m512 bn = _mm512_fmadd_ps(y, _mm512_loadu_ps(b.alpha2.data() + ob), _mm512_loadu_ps(b.beta2.data() + ob));
                __m512 sc;
                if (b.sc_pad < 0) {
                  sc = _mm512_maskz_loadu_ps(valid, xs + ob);
                } else {
                  const __m512i ci = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(ob - b.sc_pad)));
                  const __mmask16 in = _mm512_cmpge_epi32_mask(ci, _mm512_setzero_si512()) &
                                       _mm512_cmplt_epi32_mask(ci, _mm512_set1_epi32(static_cast<int>(xC))) & valid;
                  sc = _mm512_maskz_loadu_ps(in, xs + (ob - b.sc_pad));  // masked lanes are not read
                }
                const __m512 v = _mm512_max_ps(_mm512_add_ps(bn, sc), _mm512_setzero_ps());  // s > 0 ? s : +0
                _mm512_mask_storeu_ps(zp + ob, valid, v);
                if (pix) store16(*nc, pix, ob, count16(v, b.thrn.data(), b.lvn, 0), valid);
              }
#else
              for (int64_t o = 0; o < c2.O; ++o) {
                const float y = epilogue(c2, pos, o, a[o], sj);
                const float bn = std::fmaf(y, b.alpha2[o], b.beta2[o]);
                float sc;
                if (b.sc_pad < 0) {
                  sc = xs[o];
                } else {
                  const int64_t ci = o - b.sc_pad;
                  sc = (ci >= 0 && ci < xC) ? xs[ci] : 0.0f;
                }
                const float s = bn + sc;
                const float v = s > 0.0f ? s : 0.0f;  // as max_ps: NaN -> 0
                zp[o] = v;
                if (pix) store_code(*nc, pix, o, count_ge(v, b.thrn.data(), b.lvn));
              }
#endif
        });
      }
      cur = Z;
      packed.swap(next);
    }
  }
};

// Standalone integer sums of one conv on NHWC codes, for tests: codes (N, H, W, C) int32 in
// [0, 2^ba), weights in the conv's format (meta[14]). Returns (S_kj (N, Ho, Wo, O) int64,
// S_j (N, Ho, Wo) int64).
std::vector<torch::Tensor> conv_sums(torch::Tensor codes, std::vector<int64_t> meta, torch::Tensor wT) {
  TORCH_CHECK(meta.size() == 15, "conv meta must have 15 entries");
  const int64_t O = meta[1], Ho = meta[10], Wo = meta[11];
  auto zeros_d = torch::zeros({O}, torch::kFloat64);
  Conv c = make_conv(meta, wT, zeros_d, zeros_d, torch::zeros({Ho * Wo * O}, torch::kFloat64));
  check_cpu(codes, "codes");
  TORCH_CHECK(codes.dtype() == torch::kInt32 && codes.dim() == 4 && codes.size(1) == c.H && codes.size(2) == c.W &&
                  codes.size(3) == c.Cin, "codes must be int32 (N, H, W, Cin)");
  auto cc = codes.contiguous();
  if (cc.numel() > 0) {
    const int64_t lo = cc.min().item<int64_t>(), hi = cc.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < (int64_t(1) << c.ba), "codes must be in [0, 2^act_bits), got [", lo, ", ",
                      hi, "]");
  }
  const int64_t N = cc.size(0);
  std::vector<uint64_t> in = c.alloc_input(N);
  const int32_t* J = cc.data_ptr<int32_t>();
  const int64_t HW = c.H * c.W;
  for (int64_t p = 0; p < N * HW; ++p) {
    void* pix = c.pixel(in.data(), p / HW, (p % HW) / c.W, p % c.W);
    for (int64_t ch = 0; ch < c.Cin; ++ch) store_code(c, pix, ch, J[p * c.Cin + ch]);
  }
  auto skj = torch::empty({N, Ho, Wo, O}, torch::kInt64);
  auto sjt = torch::empty({N, Ho, Wo}, torch::kInt64);
  int64_t* K = skj.data_ptr<int64_t>();
  int64_t* S = sjt.data_ptr<int64_t>();
  for_each_output_pixel(c, in.data(), N, [&](int64_t n, int64_t oh, int64_t ow, int64_t, const int64_t* a, int64_t sj) {
    const int64_t px = (n * Ho + oh) * Wo + ow;
    S[px] = sj;
    for (int64_t o = 0; o < O; ++o) K[px * O + o] = a[o];
  });
  return {skj, sjt};
}

// fmaf(y, alpha[c], beta[c]) over (M, C) float32: the BN formula the runtime applies, exposed so
// that the plan can check it against the BatchNorm module it replaces.
torch::Tensor bn_fma(torch::Tensor y, torch::Tensor alpha, torch::Tensor beta) {
  for (const torch::Tensor* t : {&y, &alpha, &beta}) check_cpu(*t, "bn_fma arguments");
  TORCH_CHECK(y.dtype() == torch::kFloat32 && y.dim() == 2, "y must be float32 (M, C)");
  auto yc = y.contiguous(), ac = alpha.contiguous(), bc = beta.contiguous();
  const int64_t M = yc.size(0), C = yc.size(1);
  TORCH_CHECK(ac.numel() == C && bc.numel() == C && ac.dtype() == torch::kFloat32 && bc.dtype() == torch::kFloat32,
              "alpha/beta must be float32 (C,)");
  auto out = torch::empty_like(yc);
  const float *Y = yc.data_ptr<float>(), *A = ac.data_ptr<float>(), *B = bc.data_ptr<float>();
  float* R = out.data_ptr<float>();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < C; ++c) R[i * C + c] = std::fmaf(Y[i * C + c], A[c], B[c]);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Runtime>(m, "Runtime")
      .def(pybind11::init<>())
      .def("set_entry", &Runtime::set_entry)
      .def("add_block", &Runtime::add_block)
      .def_readwrite("chunk_images", &Runtime::chunk_images)
      .def("forward", &Runtime::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("isa", &isa_name, "instruction set this build's popcount loop uses");
  m.def("bn_fma", &bn_fma, "fmaf(y, alpha, beta) per channel (plan checks)");
  m.def("conv_sums", &conv_sums, "integer sums of one packed conv (tests)");
}
