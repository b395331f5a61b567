// Exact integer kernels for the deploy plan: convolution and GEMM of uint8 activation codes x
// int8 weight codes with int32 sums, and the 1-bit popcount GEMM.
//
// The integer sums are exact (no rounding anywhere): the caller guarantees, and the entry
// points check, that K * 255 * 128 < 2^31 for a reduction length K, so no int32 sum can wrap.
// Integer addition is associative, so every build, tile shape and thread count gives the same
// result bit for bit.
//
// Weights arrive packed (gdnsq_kernels/int_ops.py packs them once, in plain torch):
//  * dense / grouped conv and linear: int8 [G][T][Cq][Np][4]: group g, tap t = i*kw + j,
//    input channels 4q..4q+3 of the group, output channel o of the group (Np = Og rounded up to
//    16, padded with 0), the 4 input channels innermost: 16 output channels x 4 input channels
//    is one 64-byte vpdpbusd operand. Input channels past Cg are 0.
//  * depthwise (groups == C_in == C_out): int8 [T][C16], C16 = C rounded up to 16, padded with 0.
//    (Tried: vpdpbusd on 64-channel code vectors with 4 weight rotations, each keeping one byte
//    of every 4-byte lane: half the instructions on paper, but 1.3-3x slower on Zen 4 than
//    vpdpwssd on widened codes, and 64-channel padding wastes work at 32 / 144 channels.)
//  * popcount GEMM: int64 [W][N8] words (N8 = N rounded up to 8), bits past k cleared.
//  * popcount conv: int64 [K][O8] words, K per-tap or tight rows (see popcount_conv2d), bits of
//    a tap past C (per tap) / past T*C (tight) cleared.
// Activations are NHWC uint8 (a linear layer's [M, K] is an NHWC image of height 1, width M).
// When the conv pads, or a group's channels are not a multiple of 4, the input is first copied
// into a padded buffer: border = pad_code (the code of a zero activation), each group's
// channels rounded up to a multiple of 4 (4-byte loads never cross into another group).
//
// Builds (chosen at build time by the -m flags gdnsq_kernels/int_ops.py passes):
//  * AVX-512 VNNI: vpdpbusd, 4 blocks of 16 output channels x up to 6 output pixels (or
//    3 x 8, 2 x 12, 1 x 16) per register tile; VPOPCNTDQ popcount GEMM; vpdpwssd depthwise.
//  * AVX2 (also the avx512 build without VNNI): vpmaddubsw + vpmaddwd, 16 output channels x 4
//    pixels per tile; vpmaddwd depthwise. vpmaddubsw saturates its int16 pair sums; they stay
//    exact when every activation code is <= 127 (2 * 127 * 128 < 2^15), which the driver checks
//    per call: with a larger code the conv runs the generic loops instead.
//  * generic (scalar build, and the fallback above): plain integer loops.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GDNSQ_INT_VNNI 1
#endif
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define GDNSQ_INT_VPOPCNT 1
#endif
#if defined(__AVX2__)
#define GDNSQ_INT_AVX2 1
#endif

namespace {

const char* isa_name() {
#if defined(GDNSQ_INT_VNNI)
  return "avx512_vnni";
#elif defined(GDNSQ_INT_VPOPCNT)
  return "avx512_vpopcntdq";
#elif defined(GDNSQ_INT_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// The largest reduction length whose int32 sums cannot wrap: K * 255 * 128 <= 2^31 - 1.
constexpr int64_t kMaxExactK = 2147483647LL / (255 * 128);

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ------------------------------------------------------------------------------ geometry

struct ConvGeom {
  int64_t N, H, W, C;               // input NHWC
  int64_t O, kh, kw, Cg, G, Og;     // weight [O][kh][kw][Cg], G groups of Og output channels
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo, T, Cq, Np;        // T = kh*kw taps; dense packing: Cq = ceil(Cg/4), Np = ceil16(Og)
  bool depthwise;
};

// The activations as the kernels read them: input pixel (n, ih, iw) of the padded image at
// base + ((n * Hp + ih) * Wp + iw) * pix_stride, group g's channels from g * group_stride.
struct Source {
  const uint8_t* base;
  int64_t Hp, Wp, pix_stride, group_stride;
  std::unique_ptr<uint8_t[]> storage;  // the padded copy, when one was made
};

// Direct view of x when no tap can leave the image or its group; else the padded copy
// described in the file comment (depthwise: channels rounded up to 16 for whole-vector loads).
Source make_source(const uint8_t* x, const ConvGeom& g, uint8_t pad_code) {
  Source s;
  const bool padded = g.ph > 0 || g.pw > 0;
  const int64_t cgroup = g.depthwise ? g.C : g.Cq * 4;
  const int64_t pix = g.depthwise ? (g.C + 15) / 16 * 16 : g.G * cgroup;
  if (!padded && (g.depthwise ? g.C % 16 == 0 : g.Cg % 4 == 0)) {
    s.base = x;
    s.Hp = g.H;
    s.Wp = g.W;
    s.pix_stride = g.C;
    s.group_stride = g.depthwise ? 0 : g.Cg;
    return s;
  }
  s.Hp = g.H + 2 * g.ph;
  s.Wp = g.W + 2 * g.pw;
  s.pix_stride = pix;
  s.group_stride = g.depthwise ? 0 : cgroup;
  s.storage.reset(new uint8_t[g.N * s.Hp * s.Wp * pix]);  // every byte is written below
  uint8_t* dst = s.storage.get();
  const int64_t C = g.C, row_bytes = s.Wp * pix;
  const bool whole_rows = pix == C;  // no channel padding: an image row is one copy
  at::parallel_for(0, g.N * s.Hp, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.Hp, ih = r % s.Hp - g.ph;
      uint8_t* d = dst + r * row_bytes;
      if (ih < 0 || ih >= g.H) {
        std::memset(d, pad_code, row_bytes);
        continue;
      }
      const uint8_t* src = x + (n * g.H + ih) * g.W * C;
      if (whole_rows) {
        std::memset(d, pad_code, g.pw * pix);
        std::memcpy(d + g.pw * pix, src, g.W * C);
        std::memset(d + (g.pw + g.W) * pix, pad_code, g.pw * pix);
        continue;
      }
      // channels past a group's Cg (they meet zero weights) and the border hold pad_code
      std::memset(d, pad_code, row_bytes);
      const int64_t groups = g.depthwise ? 1 : g.G, len = g.depthwise ? C : g.Cg;
      for (int64_t iw = 0; iw < g.W; ++iw)
        for (int64_t grp = 0; grp < groups; ++grp)
          std::memcpy(d + (iw + g.pw) * pix + grp * s.group_stride, src + iw * C + grp * len, len);
    }
  });
  s.base = dst;
  return s;
}

// Byte offset of each tap (i, j) from the window's top-left input pixel.
std::vector<int64_t> tap_offsets(const ConvGeom& g, const Source& s) {
  std::vector<int64_t> off(g.T);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) off[i * g.kw + j] = (i * g.dh * s.Wp + j * g.dw) * s.pix_stride;
  return off;
}

// Window addresses (+ `offset`) of the P output pixels f0 .. f0+P-1 in flat order
// f = (n * Ho + oh) * Wo + ow; pixels past the first `rows` repeat the last one (a tail tile
// computes them and does not store them). One division per tile, not per pixel.
inline void windows(const ConvGeom& g, const Source& s, int64_t f0, int64_t rows, int P, int64_t offset,
                    const uint8_t** a) {
  const int64_t hw = g.Ho * g.Wo;
  int64_t n = f0 / hw, oh = (f0 % hw) / g.Wo, ow = f0 % g.Wo;
  for (int p = 0; p < P; ++p) {
    if (p >= rows) {
      a[p] = a[rows - 1];
      continue;
    }
    a[p] = s.base + ((n * s.Hp + oh * g.sh) * s.Wp + ow * g.sw) * s.pix_stride + offset;
    if (++ow == g.Wo) {
      ow = 0;
      if (++oh == g.Ho) {
        oh = 0;
        ++n;
      }
    }
  }
}

// ------------------------------------------------------------------------------ dense tiles
//
// A tile: P output pixels (window addresses a[p], group offset applied) x NB blocks of 16 output
// channels starting at column ob0 of the group. w points at the packed weights of tap 0,
// q 0, channel ob0 of the group; out at output pixel 0 of the tile, column ob0 (row stride ldo).
// Only the first `rows` pixels and `cols` columns are stored (tails).

struct TileArgs {
  const int64_t* tap_off;
  int64_t T, Cq, Np, ldo;
  const int8_t* w;
  int32_t* out;
  int64_t rows, cols;
};

template <int P>
void tile_generic(const uint8_t* const* a, const TileArgs& t) {
  int32_t acc[P][16] = {};
  for (int64_t tap = 0; tap < t.T; ++tap) {
    const int8_t* wt = t.w + tap * t.Cq * t.Np * 4;
    for (int64_t q = 0; q < t.Cq; ++q) {
      const int8_t* wq = wt + q * t.Np * 4;
      for (int p = 0; p < P; ++p) {
        const uint8_t* x = a[p] + t.tap_off[tap] + 4 * q;
        const int32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        for (int o = 0; o < 16; ++o)
          acc[p][o] += x0 * wq[4 * o] + x1 * wq[4 * o + 1] + x2 * wq[4 * o + 2] + x3 * wq[4 * o + 3];
      }
    }
  }
  for (int64_t p = 0; p < t.rows; ++p)
    for (int64_t o = 0; o < std::min<int64_t>(16, t.cols); ++o) t.out[p * t.ldo + o] = acc[p][o];
}

#if defined(GDNSQ_INT_VNNI)
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1));
}

template <int NB, int P>
void tile_vnni(const uint8_t* const* a, const TileArgs& t) {
  __m512i acc[P][NB];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int nb = 0; nb < NB; ++nb) acc[p][nb] = _mm512_setzero_si512();
  for (int64_t tap = 0; tap < t.T; ++tap) {
    const uint8_t* x[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) x[p] = a[p] + t.tap_off[tap];
    const int8_t* wt = t.w + tap * t.Cq * t.Np * 4;
    for (int64_t q = 0; q < t.Cq; ++q) {
      __m512i w[NB];
#pragma GCC unroll 4
      for (int nb = 0; nb < NB; ++nb) w[nb] = _mm512_loadu_si512(wt + (q * t.Np + 16 * nb) * 4);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const __m512i xb = _mm512_set1_epi32(load_u32(x[p] + 4 * q));
#pragma GCC unroll 4
        for (int nb = 0; nb < NB; ++nb) acc[p][nb] = _mm512_dpbusd_epi32(acc[p][nb], xb, w[nb]);
      }
    }
  }
  for (int64_t p = 0; p < t.rows; ++p)
#pragma GCC unroll 4
    for (int nb = 0; nb < NB; ++nb)
      _mm512_mask_storeu_epi32(t.out + p * t.ldo + 16 * nb, first_lanes(t.cols - 16 * nb), acc[p][nb]);
}
#endif

#if defined(GDNSQ_INT_AVX2)
// 16 output channels (two 8-lane halves) x P pixels; exact only for activation codes <= 127.
template <int P>
void tile_avx2(const uint8_t* const* a, const TileArgs& t) {
  __m256i acc[P][2];
  for (int p = 0; p < P; ++p) acc[p][0] = acc[p][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t tap = 0; tap < t.T; ++tap) {
    const uint8_t* x[P];
    for (int p = 0; p < P; ++p) x[p] = a[p] + t.tap_off[tap];
    const int8_t* wt = t.w + tap * t.Cq * t.Np * 4;
    for (int64_t q = 0; q < t.Cq; ++q) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + q * t.Np * 4));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + q * t.Np * 4 + 32));
      for (int p = 0; p < P; ++p) {
        const __m256i xb = _mm256_set1_epi32(load_u32(x[p] + 4 * q));
        acc[p][0] = _mm256_add_epi32(acc[p][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));
        acc[p][1] = _mm256_add_epi32(acc[p][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));
      }
    }
  }
  alignas(32) int32_t buf[16];
  for (int64_t p = 0; p < t.rows; ++p) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), acc[p][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf + 8), acc[p][1]);
    std::memcpy(t.out + p * t.ldo, buf, sizeof(int32_t) * std::min<int64_t>(16, t.cols));
  }
}
#endif

// Which tile kernel a dense conv runs, and its shape: `blocks` 16-channel blocks per column
// chunk, `pixels` output pixels per tile.
enum class Kernel { kGeneric, kAvx2, kVnni };
struct TileShape {
  Kernel kernel;
  int blocks, pixels;
};

TileShape choose_tile(int64_t Np, bool codes_fit_int16) {
#if defined(GDNSQ_INT_VNNI)
  (void)codes_fit_int16;
  // 24 of the 32 zmm registers hold accumulators, NB hold weights, one the broadcast codes
  switch (std::min<int64_t>(4, Np / 16)) {
    case 4: return {Kernel::kVnni, 4, 6};
    case 3: return {Kernel::kVnni, 3, 8};
    case 2: return {Kernel::kVnni, 2, 12};
    default: return {Kernel::kVnni, 1, 16};
  }
#elif defined(GDNSQ_INT_AVX2)
  (void)Np;
  if (codes_fit_int16) return {Kernel::kAvx2, 1, 4};
  return {Kernel::kGeneric, 1, 4};
#else
  (void)Np;
  (void)codes_fit_int16;
  return {Kernel::kGeneric, 1, 4};
#endif
}

// Runs the tile kernel for `nb` blocks (<= shape.blocks) of P = shape.pixels pixels.
template <int P>
void run_tile_p(Kernel kernel, int nb, const uint8_t* const* a, const TileArgs& t) {
#if defined(GDNSQ_INT_VNNI)
  if (kernel == Kernel::kVnni) {
    switch (nb) {
      case 4: if constexpr (4 * P <= 24) { tile_vnni<4, P>(a, t); return; } break;
      case 3: if constexpr (3 * P <= 24) { tile_vnni<3, P>(a, t); return; } break;
      case 2: if constexpr (2 * P <= 24) { tile_vnni<2, P>(a, t); return; } break;
      default: tile_vnni<1, P>(a, t); return;
    }
    TORCH_CHECK(false, "int_ops: no VNNI tile for ", nb, " blocks x ", P, " pixels");
  }
#endif
#if defined(GDNSQ_INT_AVX2)
  if (kernel == Kernel::kAvx2) {
    if constexpr (P <= 4) {
      tile_avx2<P>(a, t);
      return;
    }
    TORCH_CHECK(false, "int_ops: no AVX2 tile for ", P, " pixels");
  }
#endif
  (void)kernel;
  (void)nb;
  if constexpr (P <= 4) {
    tile_generic<P>(a, t);
    return;
  }
  TORCH_CHECK(false, "int_ops: no generic tile for ", P, " pixels");
}

void run_tile(const TileShape& shape, int pixels, int nb, const uint8_t* const* a, const TileArgs& t) {
  switch (pixels) {
    case 1: run_tile_p<1>(shape.kernel, nb, a, t); break;
    case 2: run_tile_p<2>(shape.kernel, nb, a, t); break;
    case 4: run_tile_p<4>(shape.kernel, nb, a, t); break;
    case 6: run_tile_p<6>(shape.kernel, nb, a, t); break;
    case 8: run_tile_p<8>(shape.kernel, nb, a, t); break;
    case 12: run_tile_p<12>(shape.kernel, nb, a, t); break;
    case 16: run_tile_p<16>(shape.kernel, nb, a, t); break;
    default: TORCH_CHECK(false, "int_ops: unexpected tile of ", pixels, " pixels");
  }
}

#if defined(GDNSQ_INT_AVX2) && !defined(GDNSQ_INT_VNNI)
// Largest activation code the kernels will read (pad_code included when the conv pads).
uint8_t max_code(const uint8_t* x, int64_t n, const ConvGeom& g, uint8_t pad_code) {
  uint8_t m = (g.ph > 0 || g.pw > 0) ? pad_code : 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
#endif

// Work (multiply-adds) a thread should at least get before a loop is split across threads.
constexpr int64_t kMinMacsPerThread = 1 << 17;

// The pixel tiles of a loop over `npix` output pixels (rows): full tiles of P, then the
// remainder as tiles of 8, 4, 2, 1 smaller than P (a tail tile computes only real pixels: a
// 1-row GEMM or a 7x7 map does not pay for P rows). Tile i starts at start(i), size(i) rows.
struct PixelTiles {
  int64_t full, P;
  int64_t tail_start[4];
  int tail_size[4];
  int ntail = 0;
  PixelTiles(int64_t npix, int P_) : full(npix / P_), P(P_) {
    int64_t f = full * P, rem = npix - f;
    for (int s : {8, 4, 2, 1})
      if (s < P && rem >= s) {
        tail_start[ntail] = f;
        tail_size[ntail++] = s;
        f += s;
        rem -= s;
      }
  }
  int64_t count() const { return full + ntail; }
  int64_t start(int64_t i) const { return i < full ? i * P : tail_start[i - full]; }
  int size(int64_t i) const { return i < full ? static_cast<int>(P) : tail_size[i - full]; }
};

void dense_conv(const uint8_t* x, const ConvGeom& g, const int8_t* wpk, uint8_t pad_code, int32_t* out) {
  bool fits_int16 = true;  // only the AVX2 tile cares
#if defined(GDNSQ_INT_AVX2) && !defined(GDNSQ_INT_VNNI)
  fits_int16 = max_code(x, g.N * g.H * g.W * g.C, g, pad_code) <= 127;
#endif
  const TileShape shape = choose_tile(g.Np, fits_int16);
  const Source src = make_source(x, g, pad_code);
  const std::vector<int64_t> tap_off = tap_offsets(g, src);
  const int64_t npix = g.N * g.Ho * g.Wo;
  const int64_t chunk_cols = 16 * shape.blocks;
  const int64_t chunks_per_group = (g.Np + chunk_cols - 1) / chunk_cols;
  const PixelTiles pt(npix, shape.pixels);
  const int64_t tiles = pt.count();
  const int64_t items = g.G * chunks_per_group * tiles;
  const int64_t item_macs = shape.pixels * chunk_cols * g.T * g.Cq * 4;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / std::max<int64_t>(1, item_macs));
  // items are column-chunk major: a thread's contiguous range reuses one chunk's weights
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    const uint8_t* a[16];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t chunk = item / tiles, tile = item % tiles;
      const int64_t grp = chunk / chunks_per_group, ob0 = (chunk % chunks_per_group) * chunk_cols;
      const int64_t f0 = pt.start(tile);
      const int pixels = pt.size(tile);
      windows(g, src, f0, pixels, pixels, grp * src.group_stride, a);
      TileArgs t;
      t.tap_off = tap_off.data();
      t.T = g.T;
      t.Cq = g.Cq;
      t.Np = g.Np;
      t.ldo = g.O;
      t.w = wpk + grp * g.T * g.Cq * g.Np * 4 + ob0 * 4;
      t.out = out + f0 * g.O + grp * g.Og + ob0;
      t.rows = pixels;
      t.cols = std::min<int64_t>(chunk_cols, g.Og - ob0);
      const int nb = static_cast<int>(std::min<int64_t>(shape.blocks, (g.Np - ob0) / 16));
      run_tile(shape, pixels, nb, a, t);
    }
  });
}

// ------------------------------------------------------------------------------ depthwise

// P output pixels (windows a[p]) x 16 channels from c0: sum over taps of x * w, w the weights
// widened to int32 ([T][C16]).
template <int P>
inline void depthwise_tile(const uint8_t* const* a, const int64_t* tap_off, int64_t T, const int32_t* w,
                           int64_t C16, int64_t c0, int32_t* out, int64_t ldo, int64_t rows, int64_t cols) {
#if defined(GDNSQ_INT_VNNI)
  __m512i acc[P];
  for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_si512();
  for (int64_t tap = 0; tap < T; ++tap) {
    // int32 lanes: a sign-extended weight, a zero-extended code (high int16 half 0), so
    // vpdpwssd adds code * weight + 0 * (high half of the weight) exactly
    const __m512i wv = _mm512_loadu_si512(w + tap * C16 + c0);
    for (int p = 0; p < P; ++p) {
      const __m512i xv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a[p] + tap_off[tap] + c0)));
      acc[p] = _mm512_dpwssd_epi32(acc[p], xv, wv);
    }
  }
  for (int64_t p = 0; p < rows; ++p) _mm512_mask_storeu_epi32(out + p * ldo, first_lanes(cols), acc[p]);
#elif defined(GDNSQ_INT_AVX2)
  __m256i acc[P][2];
  for (int p = 0; p < P; ++p) acc[p][0] = acc[p][1] = _mm256_setzero_si256();
  for (int64_t tap = 0; tap < T; ++tap) {
    // the same lanes as above, 8 channels per register; vpmaddwd gives code * weight + 0
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + tap * C16 + c0));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + tap * C16 + c0 + 8));
    for (int p = 0; p < P; ++p) {
      const uint8_t* xt = a[p] + tap_off[tap] + c0;
      const __m256i x0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xt)));
      const __m256i x1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xt + 8)));
      acc[p][0] = _mm256_add_epi32(acc[p][0], _mm256_madd_epi16(x0, w0));
      acc[p][1] = _mm256_add_epi32(acc[p][1], _mm256_madd_epi16(x1, w1));
    }
  }
  alignas(32) int32_t buf[16];
  for (int64_t p = 0; p < rows; ++p) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), acc[p][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf + 8), acc[p][1]);
    std::memcpy(out + p * ldo, buf, sizeof(int32_t) * std::min<int64_t>(16, cols));
  }
#else
  int32_t acc[P][16] = {};
  for (int64_t tap = 0; tap < T; ++tap) {
    const int32_t* wt = w + tap * C16 + c0;
    for (int p = 0; p < P; ++p) {
      const uint8_t* xt = a[p] + tap_off[tap] + c0;
      for (int c = 0; c < 16; ++c) acc[p][c] += int32_t(xt[c]) * wt[c];
    }
  }
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t c = 0; c < std::min<int64_t>(16, cols); ++c) out[p * ldo + c] = acc[p][c];
#endif
}

void depthwise_conv(const uint8_t* x, const ConvGeom& g, const int8_t* wpk, uint8_t pad_code, int32_t* out) {
#if defined(GDNSQ_INT_VNNI)
  constexpr int P = 8;  // 8 accumulators + 1 weight + 1 code register of 32
#else
  constexpr int P = 4;  // AVX2: 8 accumulators + 2 weights + codes of 16 registers
#endif
  const Source src = make_source(x, g, pad_code);
  const std::vector<int64_t> tap_off = tap_offsets(g, src);
  const int64_t C = g.C, C16 = (C + 15) / 16 * 16;
  const std::vector<int32_t> w(wpk, wpk + g.T * C16);  // widened once per call (T * C16 values)
  const int64_t npix = g.N * g.Ho * g.Wo, tiles = (npix + P - 1) / P;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / (P * C16 * g.T));
  at::parallel_for(0, tiles, grain, [&](int64_t i0, int64_t i1) {
    const uint8_t* a[P];
    for (int64_t tile = i0; tile < i1; ++tile) {
      const int64_t f0 = tile * P, rows = std::min<int64_t>(P, npix - f0);
      windows(g, src, f0, rows, P, 0, a);
      for (int64_t c0 = 0; c0 < C; c0 += 16)
        depthwise_tile<P>(a, tap_off.data(), g.T, w.data(), C16, c0, out + f0 * C + c0, C, rows, C - c0);
    }
  });
}

// ------------------------------------------------------------------------------ entry points

void check_cpu_contiguous(const torch::Tensor& t, const char* name, c10::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "int_ops: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "int_ops: ", name, " must be ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, "int_ops: ", name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "int_ops: ", name, " must be contiguous");
}

int64_t packed_weight_numel(const ConvGeom& g) {
  return g.depthwise ? g.T * ((g.C + 15) / 16 * 16) : g.G * g.T * g.Cq * g.Np * 4;
}

// x: uint8 [N, H, W, C] codes; w_packed: int8 packed weights (file comment) of the weight shape
// w_shape = (O, kh, kw, C / groups). Returns int32 [N, Ho, Wo, O].
torch::Tensor conv2d(torch::Tensor x, torch::Tensor w_packed, std::vector<int64_t> w_shape, std::vector<int64_t> stride,
                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, int64_t pad_code) {
  check_cpu_contiguous(x, "x", torch::kUInt8, 4);
  check_cpu_contiguous(w_packed, "w_packed", torch::kInt8, 1);
  TORCH_CHECK(w_shape.size() == 4 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "int_ops: w_shape needs 4 entries, stride/padding/dilation 2");
  ConvGeom g;
  g.N = x.size(0); g.H = x.size(1); g.W = x.size(2); g.C = x.size(3);
  g.O = w_shape[0]; g.kh = w_shape[1]; g.kw = w_shape[2]; g.Cg = w_shape[3]; g.G = groups;
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1]; g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(g.O > 0 && g.kh > 0 && g.kw > 0 && g.Cg > 0 && g.G > 0, "int_ops: weight shape and groups must be positive");
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
              "int_ops: stride and dilation must be >= 1, padding >= 0");
  TORCH_CHECK(g.C == g.G * g.Cg && g.O % g.G == 0, "int_ops: C_in = groups * w_shape[3] and C_out % groups == 0 needed");
  TORCH_CHECK(pad_code >= 0 && pad_code <= 255, "int_ops: pad_code must be in [0, 255]");
  g.Og = g.O / g.G;
  g.T = g.kh * g.kw;
  TORCH_CHECK(g.T * g.Cg <= kMaxExactK, "int_ops: reduction length kh*kw*C_in/groups = ", g.T * g.Cg,
              " exceeds ", kMaxExactK, " (int32 sums could wrap)");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "int_ops: the (padded) input is smaller than the kernel");
  g.Cq = (g.Cg + 3) / 4;
  g.Np = (g.Og + 15) / 16 * 16;
  g.depthwise = g.Cg == 1 && g.Og == 1 && g.G > 1;
  TORCH_CHECK(w_packed.numel() == packed_weight_numel(g), "int_ops: w_packed has ", w_packed.numel(),
              " elements, the packing of this weight shape has ", packed_weight_numel(g));
  auto out = torch::empty({g.N, g.Ho, g.Wo, g.O}, torch::kInt32);
  if (out.numel() == 0) return out;
  const uint8_t* xp = x.data_ptr<uint8_t>();
  const int8_t* wp = w_packed.data_ptr<int8_t>();
  if (g.depthwise)
    depthwise_conv(xp, g, wp, static_cast<uint8_t>(pad_code), out.data_ptr<int32_t>());
  else
    dense_conv(xp, g, wp, static_cast<uint8_t>(pad_code), out.data_ptr<int32_t>());
  return out;
}

// x: uint8 [M, K]; w_packed: the dense packing of an int8 [N, K] weight. Returns int32 [M, N].
torch::Tensor linear(torch::Tensor x, torch::Tensor w_packed, int64_t n) {
  check_cpu_contiguous(x, "x", torch::kUInt8, 2);
  if (x.size(0) == 0) return torch::empty({0, n}, torch::kInt32);
  auto out = conv2d(x.view({1, 1, x.size(0), x.size(1)}), w_packed, {n, 1, 1, x.size(1)}, {1, 1}, {0, 0}, {1, 1}, 1, 0);
  return out.view({x.size(0), n});
}

// ------------------------------------------------------------------------------ popcount GEMM / conv

inline int popcount64(uint64_t v) { return __builtin_popcountll(v); }

// Where a popcount tile reads its P rows of words: row p's word k = t * CW + q (tap t, word q
// of the tap) is x[p][tap_off[t] + q]. A GEMM (and an im2col'd conv) is T = 1, tap_off = {0}.
struct PcRows {
  const int64_t* tap_off;
  int64_t T, CW;
};

// AND popcounts of P rows x 8*NB columns from the [K][O8] weights w (column 0 of the tile):
// out[p * ldo + c] = sum_k popcount(x_p[k] & w[k][c]); only the first `cols` columns are stored.
template <int NB, int P>
void popcount_tile(const uint64_t* const* x, const PcRows& r, const uint64_t* w, int64_t O8, int32_t* out,
                   int64_t ldo, int64_t cols) {
#if defined(GDNSQ_INT_VPOPCNT)
  __m512i acc[P][NB];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int nb = 0; nb < NB; ++nb) acc[p][nb] = _mm512_setzero_si512();
  for (int64_t t = 0; t < r.T; ++t) {
    const uint64_t* xt[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) xt[p] = x[p] + r.tap_off[t];
    const uint64_t* wt = w + t * r.CW * O8;
    for (int64_t q = 0; q < r.CW; ++q) {
      __m512i wv[NB];
#pragma GCC unroll 4
      for (int nb = 0; nb < NB; ++nb) wv[nb] = _mm512_loadu_si512(wt + q * O8 + 8 * nb);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const __m512i xb = _mm512_set1_epi64(static_cast<long long>(xt[p][q]));
#pragma GCC unroll 4
        for (int nb = 0; nb < NB; ++nb)
          acc[p][nb] = _mm512_add_epi64(acc[p][nb], _mm512_popcnt_epi64(_mm512_and_si512(xb, wv[nb])));
      }
    }
  }
  int32_t buf[8];  // (masked 256-bit stores would need AVX-512VL, which the avx512 build lacks)
  for (int p = 0; p < P; ++p)
    for (int nb = 0; nb < NB; ++nb) {
      const int64_t c = std::min<int64_t>(8, cols - 8 * nb);
      if (c <= 0) break;
      int32_t* dst = out + p * ldo + 8 * nb;
      if (c == 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi64_epi32(acc[p][nb]));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf), _mm512_cvtepi64_epi32(acc[p][nb]));
        std::memcpy(dst, buf, sizeof(int32_t) * c);
      }
    }
#else
  int32_t acc[P][8 * NB] = {};
  for (int64_t t = 0; t < r.T; ++t) {
    const uint64_t* wt = w + t * r.CW * O8;
    for (int64_t q = 0; q < r.CW; ++q) {
      const uint64_t* wk = wt + q * O8;
      for (int p = 0; p < P; ++p) {
        const uint64_t xv = x[p][r.tap_off[t] + q];
        if (xv == 0) continue;  // 1-bit activations are often sparse (and padded rows are 0)
        for (int c = 0; c < 8 * NB; ++c) acc[p][c] += popcount64(xv & wk[c]);
      }
    }
  }
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < std::min<int64_t>(8 * NB, cols); ++c) out[p * ldo + c] = acc[p][c];
#endif
}

// Tile shape of the popcount kernels: NB blocks of 8 columns x P rows (24 of the 32 zmm
// registers hold accumulators, NB the weights, one the broadcast word).
inline int pc_blocks(int64_t O8) { return static_cast<int>(std::min<int64_t>(4, O8 / 8)); }
inline int pc_pixels(int nb) { return nb == 4 ? 6 : nb == 3 ? 8 : nb == 2 ? 12 : 16; }

template <int NB>
void popcount_tile_nb(int P, const uint64_t* const* x, const PcRows& r, const uint64_t* w, int64_t O8, int32_t* out,
                      int64_t ldo, int64_t cols) {
  // P is the tile height of the widest chunk (or a tail size): NB * P <= 24 holds for every chunk
  switch (P) {
    case 1: popcount_tile<NB, 1>(x, r, w, O8, out, ldo, cols); return;
    case 2: popcount_tile<NB, 2>(x, r, w, O8, out, ldo, cols); return;
    case 4: popcount_tile<NB, 4>(x, r, w, O8, out, ldo, cols); return;
    case 6: if constexpr (NB * 6 <= 24) { popcount_tile<NB, 6>(x, r, w, O8, out, ldo, cols); return; } break;
    case 8: if constexpr (NB * 8 <= 24) { popcount_tile<NB, 8>(x, r, w, O8, out, ldo, cols); return; } break;
    case 12: if constexpr (NB * 12 <= 24) { popcount_tile<NB, 12>(x, r, w, O8, out, ldo, cols); return; } break;
    case 16: if constexpr (NB * 16 <= 24) { popcount_tile<NB, 16>(x, r, w, O8, out, ldo, cols); return; } break;
    default: break;
  }
  TORCH_CHECK(false, "int_ops: no popcount tile for ", NB, " blocks x ", P, " rows");
}

// All output columns of P rows: chunks of 8*nb columns (the last chunk may hold fewer blocks).
void popcount_rows(int P, const uint64_t* const* x, const PcRows& r, const uint64_t* w, int64_t n, int64_t O8,
                   int32_t* out, int64_t ldo) {
  const int nbmax = pc_blocks(O8);
  for (int64_t c0 = 0; c0 < n; c0 += 8 * nbmax) {
    const int nb = static_cast<int>(std::min<int64_t>(nbmax, (O8 - c0) / 8));
    const int64_t cols = std::min<int64_t>(8 * nb, n - c0);
    switch (nb) {
      case 4: popcount_tile_nb<4>(P, x, r, w + c0, O8, out + c0, ldo, cols); break;
      case 3: popcount_tile_nb<3>(P, x, r, w + c0, O8, out + c0, ldo, cols); break;
      case 2: popcount_tile_nb<2>(P, x, r, w + c0, O8, out + c0, ldo, cols); break;
      default: popcount_tile_nb<1>(P, x, r, w + c0, O8, out + c0, ldo, cols); break;
    }
  }
}

// Work (bit AND-popcounts) a thread should at least get before a loop is split.
constexpr int64_t kMinBitOpsPerThread = int64_t(1) << 22;

// x_bits: int64 [M, Wd] (bit b of word i = element 64 i + b); w_packed: int64 [Wd * N8] (file
// comment). AND form: sum_b x_b w_b over the k valid bits; XNOR form: sum_b (2 x_b - 1)(2 w_b - 1)
// = k - 2 * (|x| + |w| - 2 * AND). Bits of x past k are ignored.
torch::Tensor popcount_linear(torch::Tensor x_bits, torch::Tensor w_packed, int64_t n, int64_t k, bool xnor) {
  check_cpu_contiguous(x_bits, "x_bits", torch::kInt64, 2);
  check_cpu_contiguous(w_packed, "w_packed", torch::kInt64, 1);
  TORCH_CHECK(k > 0 && n > 0, "int_ops: k and n must be positive");
  TORCH_CHECK(k <= 2147483647LL, "int_ops: k must be < 2^31 (int32 sums)");
  const int64_t M = x_bits.size(0), Wd = x_bits.size(1), N8 = (n + 7) / 8 * 8;
  TORCH_CHECK(Wd == (k + 63) / 64, "int_ops: x_bits has ", Wd, " words per row, k = ", k, " needs ", (k + 63) / 64);
  TORCH_CHECK(w_packed.numel() == Wd * N8, "int_ops: w_packed has ", w_packed.numel(), " words, expected ", Wd * N8);
  auto out = torch::empty({M, n}, torch::kInt32);
  if (M == 0) return out;
  const uint64_t* W = reinterpret_cast<const uint64_t*>(w_packed.data_ptr<int64_t>());
  const uint64_t* X = reinterpret_cast<const uint64_t*>(x_bits.data_ptr<int64_t>());
  const int64_t rem = k - 64 * (Wd - 1);
  const uint64_t last_mask = rem == 64 ? ~uint64_t(0) : ((uint64_t(1) << rem) - 1);
  // the AND with the cleared weight bits ignores x's bits past k; only the XNOR form's |x|
  // needs them masked (below), so x is never copied
  const int64_t zero_off = 0;
  const PcRows rows_of{&zero_off, 1, Wd};
  const PixelTiles pt(M, pc_pixels(pc_blocks(N8)));
  int32_t* O = out.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, kMinBitOpsPerThread / (pt.P * N8 * Wd * 64));
  at::parallel_for(0, pt.count(), grain, [&](int64_t i0, int64_t i1) {
    const uint64_t* x[16];
    for (int64_t tile = i0; tile < i1; ++tile) {
      const int64_t m0 = pt.start(tile);
      const int P = pt.size(tile);
      for (int p = 0; p < P; ++p) x[p] = X + (m0 + p) * Wd;
      popcount_rows(P, x, rows_of, W, n, N8, O + m0 * n, n);
    }
  });
  if (xnor) {
    std::vector<int64_t> pw(n, 0);
    for (int64_t i = 0; i < Wd; ++i)
      for (int64_t c = 0; c < n; ++c) pw[c] += popcount64(W[i * N8 + c]);
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        int64_t px = 0;
        for (int64_t i = 0; i < Wd; ++i) px += popcount64(X[m * Wd + i] & (i == Wd - 1 ? last_mask : ~uint64_t(0)));
        for (int64_t c = 0; c < n; ++c) O[m * n + c] = static_cast<int32_t>(k - 2 * (px + pw[c] - 2 * int64_t(O[m * n + c])));
      }
    });
  }
  return out;
}

// ---- 1-bit convolution on channel-packed NHWC words
//
// Input: int64 [N, H, W, CW], CW = ceil(C/64), bit c % 64 of word c / 64 = channel c (bits
// past C are ignored). Weights [K][O8] words (file comment), in one of two row layouts:
//  * per tap (C a multiple of 64, or no saving below): K = T * CW, word t * CW + q = channels
//    64q.. of tap t. The kernel reads the words in place from the (zero-padded) image: no copy
//    per pixel.
//  * tight: K = ceil(T * C / 64), bit t * C + c = channel c of tap t (an implicit im2col row
//    without per-tap padding: a 16-channel 3x3 conv reads 3 words per pixel instead of 9). The
//    rows of a pixel tile are built in a thread-local buffer (padded taps are 0 bits).
// The layout is chosen at packing time (int_ops.pack_popcount_conv_weight) and passed as `tight`.

// OR the first `nbits` bits of src into dst at bit offset `off` (dst zeroed by the caller).
inline void insert_bits(uint64_t* dst, const uint64_t* src, int64_t nbits, int64_t off) {
  const int64_t nw = (nbits + 63) / 64, w0 = off >> 6, sh = off & 63;
  for (int64_t i = 0; i < nw; ++i) {
    const int64_t len = std::min<int64_t>(64, nbits - 64 * i);
    const uint64_t v = len == 64 ? src[i] : src[i] & ((uint64_t(1) << len) - 1);
    dst[w0 + i] |= v << sh;
    if (sh != 0 && sh + len > 64) dst[w0 + i + 1] |= v >> (64 - sh);
  }
}

// The 64 bits of src starting at bit `pos` (src must hold one word past them).
inline uint64_t bits_at(const uint64_t* src, int64_t pos) {
  const int64_t w = pos >> 6, sh = pos & 63;
  return sh == 0 ? src[w] : (src[w] >> sh) | (src[w + 1] << (64 - sh));
}

struct PcGeom {
  int64_t N, H, W, C, CW, O, O8, kh, kw, T, sh, sw, ph, pw, dh, dw, Ho, Wo, K;
  bool tight;
};

// x_bits: int64 [N, H, W, CW]; w_packed: int64 [K * O8]; w_shape (O, kh, kw, C). Returns
// {int32 [N, Ho, Wo, O] AND sums, int32 [N, Ho, Wo] S (the set input bits under each window)
// when with_sums, else an empty tensor}.
std::vector<torch::Tensor> popcount_conv2d(torch::Tensor x_bits, torch::Tensor w_packed, std::vector<int64_t> w_shape,
                                           std::vector<int64_t> stride, std::vector<int64_t> padding,
                                           std::vector<int64_t> dilation, bool tight, bool with_sums) {
  check_cpu_contiguous(x_bits, "x_bits", torch::kInt64, 4);
  check_cpu_contiguous(w_packed, "w_packed", torch::kInt64, 1);
  TORCH_CHECK(w_shape.size() == 4 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "int_ops: w_shape needs 4 entries, stride/padding/dilation 2");
  PcGeom g;
  g.N = x_bits.size(0); g.H = x_bits.size(1); g.W = x_bits.size(2); g.CW = x_bits.size(3);
  g.O = w_shape[0]; g.kh = w_shape[1]; g.kw = w_shape[2]; g.C = w_shape[3];
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1]; g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(g.O > 0 && g.kh > 0 && g.kw > 0 && g.C > 0, "int_ops: weight shape must be positive");
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
              "int_ops: stride and dilation must be >= 1, padding >= 0");
  TORCH_CHECK(g.CW == (g.C + 63) / 64, "int_ops: x_bits has ", g.CW, " words per pixel, C = ", g.C, " needs ",
              (g.C + 63) / 64);
  g.T = g.kh * g.kw;
  TORCH_CHECK(g.T * g.C <= 2147483647LL, "int_ops: kh*kw*C must be < 2^31 (int32 sums)");
  TORCH_CHECK(g.H + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.W + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "int_ops: the (padded) input is smaller than the kernel");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.O8 = (g.O + 7) / 8 * 8;
  g.tight = tight;
  g.K = tight ? (g.T * g.C + 63) / 64 : g.T * g.CW;
  TORCH_CHECK(w_packed.numel() == g.K * g.O8, "int_ops: w_packed has ", w_packed.numel(), " words, the ",
              tight ? "tight" : "per-tap", " packing of this weight shape has ", g.K * g.O8);
  auto out = torch::empty({g.N, g.Ho, g.Wo, g.O}, torch::kInt32);
  auto sums = with_sums ? torch::empty({g.N, g.Ho, g.Wo}, torch::kInt32) : torch::empty({0}, torch::kInt32);
  const int64_t npix = g.N * g.Ho * g.Wo;
  if (npix == 0) return {out, sums};
  const uint64_t* X = reinterpret_cast<const uint64_t*>(x_bits.data_ptr<int64_t>());
  const uint64_t* Wt = reinterpret_cast<const uint64_t*>(w_packed.data_ptr<int64_t>());
  int32_t* O = out.data_ptr<int32_t>();
  int32_t* S = with_sums ? sums.data_ptr<int32_t>() : nullptr;
  const int64_t rem = g.C - 64 * (g.CW - 1);
  const uint64_t last_mask = rem == 64 ? ~uint64_t(0) : ((uint64_t(1) << rem) - 1);

  // per-tap layout: the image zero-padded (a padded tap reads 0 words), else read in place
  std::unique_ptr<uint64_t[]> padded;
  const uint64_t* base = X;
  int64_t Hp = g.H, Wp = g.W;
  if (!g.tight && (g.ph > 0 || g.pw > 0)) {
    Hp = g.H + 2 * g.ph;
    Wp = g.W + 2 * g.pw;
    padded.reset(new uint64_t[g.N * Hp * Wp * g.CW]);
    uint64_t* dst = padded.get();
    at::parallel_for(0, g.N * Hp, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Hp, ih = r % Hp - g.ph;
        uint64_t* d = dst + r * Wp * g.CW;
        std::memset(d, 0, sizeof(uint64_t) * Wp * g.CW);
        if (ih >= 0 && ih < g.H)
          std::memcpy(d + g.pw * g.CW, X + (n * g.H + ih) * g.W * g.CW, sizeof(uint64_t) * g.W * g.CW);
      }
    });
    base = dst;
  }
  std::vector<int64_t> tap_off(g.tight ? 1 : g.T, 0);
  if (!g.tight)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) tap_off[i * g.kw + j] = (i * g.dh * Wp + j * g.dw) * g.CW;
  const PcRows rows_of{tap_off.data(), g.tight ? 1 : g.T, g.tight ? g.K : g.CW};

  // tight rows without horizontal dilation: each input row as one bit stream (pixel iw's C bits
  // at bit (iw + pw) * C, pw zero pixels on either side, one spare word), so that a kernel row
  // of a window is one run of kw * C bits: kh bit-range copies per pixel instead of kh * kw
  // per-tap inserts (a 16-channel 3x3 conv: 3 one-word copies; the 3-channel 7x7 stem: 7)
  const bool streams = g.tight && g.dw == 1;
  const int64_t SW = streams ? ((g.W + 2 * g.pw) * g.C + 63) / 64 + 1 : 0;
  std::unique_ptr<uint64_t[]> stream_buf;
  if (streams) {
    stream_buf.reset(new uint64_t[g.N * g.H * SW]);
    uint64_t* dst = stream_buf.get();
    at::parallel_for(0, g.N * g.H, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint64_t* d = dst + r * SW;
        std::memset(d, 0, sizeof(uint64_t) * SW);
        const uint64_t* src = X + r * g.W * g.CW;
        if (g.C == 64 * g.CW && g.pw * g.C % 64 == 0) {
          std::memcpy(d + g.pw * g.C / 64, src, sizeof(uint64_t) * g.W * g.CW);
          continue;
        }
        for (int64_t iw = 0; iw < g.W; ++iw) insert_bits(d, src + iw * g.CW, g.C, (iw + g.pw) * g.C);
      }
    });
  }
  const uint64_t* SB = stream_buf.get();

  const PixelTiles pt(npix, pc_pixels(pc_blocks(g.O8)));
  const int64_t grain = std::max<int64_t>(1, kMinBitOpsPerThread / (pt.P * g.O8 * g.K * 64));
  const int64_t hw = g.Ho * g.Wo;
  at::parallel_for(0, pt.count(), grain, [&](int64_t i0, int64_t i1) {
    const uint64_t* x[16];
    std::vector<uint64_t> rowbuf(g.tight ? 16 * g.K : 0);  // one per thread, not per tile
    for (int64_t tile = i0; tile < i1; ++tile) {
      const int64_t f0 = pt.start(tile);
      const int P = pt.size(tile);
      for (int p = 0; p < P; ++p) {
        const int64_t f = f0 + p, n = f / hw, oh = (f % hw) / g.Wo, ow = f % g.Wo;
        if (g.tight) {
          // the implicit im2col row of pixel f: tap t's C bits at bit t * C, 0 outside the image
          uint64_t* row = rowbuf.data() + p * g.K;
          if (streams) {
            // the row written front to back, 64 bits at a time (no memset, no read-modify-write):
            // kernel row i is the run of kw*C bits of input row ih from bit ow*sw*C, or zeros
            const int64_t run = g.kw * g.C;
            uint64_t cur = 0;
            int fill = 0;  // valid low bits of cur
            int64_t wi = 0;
            for (int64_t i = 0; i < g.kh; ++i) {
              const int64_t ih = oh * g.sh - g.ph + i * g.dh;
              const bool inside = ih >= 0 && ih < g.H;
              const uint64_t* src = SB + (n * g.H + (inside ? ih : 0)) * SW;
              for (int64_t b = 0; b < run; b += 64) {
                const int len = static_cast<int>(std::min<int64_t>(64, run - b));
                uint64_t v = inside ? bits_at(src, ow * g.sw * g.C + b) : 0;
                if (len < 64) v &= (uint64_t(1) << len) - 1;
                cur |= v << fill;
                if (fill + len >= 64) {
                  row[wi++] = cur;
                  cur = fill ? v >> (64 - fill) : 0;
                  fill = fill + len - 64;
                } else {
                  fill += len;
                }
              }
            }
            if (fill > 0) row[wi++] = cur;
          } else {
            std::memset(row, 0, sizeof(uint64_t) * g.K);
          }
          for (int64_t i = 0; i < (streams ? 0 : g.kh); ++i) {
            const int64_t ih = oh * g.sh - g.ph + i * g.dh;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t j = 0; j < g.kw; ++j) {
              const int64_t iw = ow * g.sw - g.pw + j * g.dw;
              if (iw < 0 || iw >= g.W) continue;
              insert_bits(row, X + ((n * g.H + ih) * g.W + iw) * g.CW, g.C, (i * g.kw + j) * g.C);
            }
          }
          x[p] = row;
          if (S) {
            int64_t sj = 0;
            for (int64_t k = 0; k < g.K; ++k) sj += popcount64(row[k]);
            S[f] = static_cast<int32_t>(sj);
          }
        } else {
          x[p] = base + ((n * Hp + oh * g.sh) * Wp + ow * g.sw) * g.CW;
          if (S) {
            int64_t sj = 0;
            for (int64_t t = 0; t < g.T; ++t) {
              const uint64_t* px = x[p] + tap_off[t];
              for (int64_t q = 0; q + 1 < g.CW; ++q) sj += popcount64(px[q]);
              sj += popcount64(px[g.CW - 1] & last_mask);
            }
            S[f] = static_cast<int32_t>(sj);
          }
        }
      }
      popcount_rows(P, x, rows_of, Wt, g.O, g.O8, O + f0 * g.O, g.O);
    }
  });
  return {out, sums};
}

// codes: uint8 [R, C] -> int64 [R, ceil(C/64)]: bit c % 64 of word c / 64 = (codes[r, c] != 0).
torch::Tensor pack_channel_bits(torch::Tensor codes) {
  check_cpu_contiguous(codes, "codes", torch::kUInt8, 2);
  const int64_t R = codes.size(0), C = codes.size(1), CW = (C + 63) / 64;
  auto out = torch::empty({R, CW}, torch::kInt64);
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* s = src + r * C;
      for (int64_t q = 0; q < CW; ++q) {
        const int64_t len = std::min<int64_t>(64, C - 64 * q);
        const uint8_t* b = s + 64 * q;
        uint64_t word = 0;
#if defined(__AVX512BW__)
        // one vptestmb per 64 channels: the mask of the nonzero bytes is the word
        const __mmask64 valid = len == 64 ? ~__mmask64(0) : ((__mmask64(1) << len) - 1);
        const __m512i v = _mm512_maskz_loadu_epi8(valid, b);
        word = _mm512_test_epi8_mask(v, v);
#elif defined(GDNSQ_INT_AVX2)
        int64_t c = 0;
        for (; c + 32 <= len; c += 32) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c));
          const uint32_t zero = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
          word |= uint64_t(~zero) << c;
        }
        for (; c < len; ++c) word |= uint64_t(b[c] != 0) << c;
#else
        for (int64_t c = 0; c < len; ++c) word |= uint64_t(b[c] != 0) << c;
#endif
        dst[r * CW + q] = word;
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa_name, "instruction set of this build");
  m.def("max_exact_k", []() { return kMaxExactK; }, "longest reduction whose int32 sums cannot wrap");
  m.def("conv2d", &conv2d, "exact int32 conv of uint8 NHWC codes x packed int8 weights",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("linear", &linear, "exact int32 GEMM of uint8 [M, K] codes x packed int8 [N, K] weights",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("popcount_linear", &popcount_linear, "1-bit popcount GEMM (AND or XNOR form), int32",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("popcount_conv2d", &popcount_conv2d, "1-bit AND-popcount conv of channel-packed NHWC words, int32",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("pack_channel_bits", &pack_channel_bits, "uint8 codes [R, C] -> int64 [R, ceil(C/64)] nonzero bits",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
