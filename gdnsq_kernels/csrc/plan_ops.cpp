// Element-wise kernels of the deploy plan (gdnsq/deploy/plan.py): the passes around the exact
// integer GEMMs of csrc/int_ops.cpp.
//
//  * quantize:        float32 [M, C] (NHWC rows or linear rows) -> uint8 activation codes
//                     round((clamp(x, lo, hi) - lo) / s), plus the per-group channel sums of the
//                     codes (int32 [M, G]) that the epilogue's S_j term needs.
//  * box_sum:         int32 NHWC per-pixel group sums -> the sums over each output's window
//                     (S_j of a convolution: zero padding, stride, dilation).
//  * epilogue_float:  int32 sums [M, O] -> float32 [M, O], the deployed layer's epilogue
//                     a[o] * S_kj + b[o] * S_j + c[p, o] in float64, rounded once.
//  * epilogue_codes:  the same value y, then the next layer's codes through per-channel float32
//                     thresholds (count of thresholds y reaches), plus their group sums.
//  * channel_sums, pack_bits: group sums of uint8 codes; 0/1 codes -> int64 words (popcount GEMM).
//
// Exactness: the float operations are those of the PyTorch reference, one IEEE operation each:
// the build passes -ffp-contract=off (no FMA contraction) and no fast-math. The quantizer's
// division is a true division (no reciprocal), rounding is to nearest even (the default mode).
// NaN inputs give code 0 (the reference's NaN code is undefined). Two epilogue orders:
//   order 0 (the int / bitplane paths, _DeployedBase._epilogue): (a*S_kj + b*S_j) + c
//   order 1 (the binary ops, gdnsq_kernels.binary):              (a*S_kj + c) + b*S_j
// Threads: at::parallel_for over rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int64_t dim) {
  if (!t.device().is_cpu()) throw pybind11::value_error(std::string("plan_ops: ") + name + " must be a CPU tensor");
  if (t.scalar_type() != dtype)
    throw pybind11::type_error(std::string("plan_ops: ") + name + " must be " + c10::toString(dtype) + ", got " +
                               c10::toString(t.scalar_type()));
  if (t.dim() != dim)
    throw pybind11::value_error(std::string("plan_ops: ") + name + " must be " + std::to_string(dim) + "-D, got " +
                                std::to_string(t.dim()) + "-D");
  if (!t.is_contiguous()) throw pybind11::value_error(std::string("plan_ops: ") + name + " must be contiguous");
}

void require(bool ok, const std::string& what) {
  if (!ok) throw pybind11::value_error("plan_ops: " + what);
}

// Rows per parallel_for task: at least ~16K elements per task.
inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)); }

// One code: max(x, lo) (NaN -> lo), min(., hi), (v - lo) / s, round half to even.
inline uint8_t code_of(float x, float lo, float hi, float s) {
  float v = x > lo ? x : lo;
  v = v < hi ? v : hi;
  return static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint((v - lo) / s)));
}

void quantize_row(const float* x, uint8_t* q, int64_t C, float lo, float hi, float s) {
  int64_t c = 0;
#if defined(__AVX512F__)
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), vs = _mm512_set1_ps(s);
  for (; c + 16 <= C; c += 16) {
    __m512 v = _mm512_max_ps(_mm512_loadu_ps(x + c), vlo);  // NaN in x -> lo (second operand)
    v = _mm512_min_ps(v, vhi);
    v = _mm512_div_ps(_mm512_sub_ps(v, vlo), vs);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
#elif defined(__AVX2__)
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), vs = _mm256_set1_ps(s);
  alignas(32) int32_t buf[8];
  for (; c + 8 <= C; c += 8) {
    __m256 v = _mm256_max_ps(_mm256_loadu_ps(x + c), vlo);
    v = _mm256_min_ps(v, vhi);
    v = _mm256_div_ps(_mm256_sub_ps(v, vlo), vs);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), _mm256_cvtps_epi32(v));
    for (int i = 0; i < 8; ++i) q[c + i] = static_cast<uint8_t>(buf[i]);
  }
#endif
  for (; c < C; ++c) q[c] = code_of(x[c], lo, hi, s);
}

inline void group_sums(const uint8_t* q, int64_t C, int64_t G, int32_t* out) {
  const int64_t Cg = C / G;
  for (int64_t g = 0; g < G; ++g) {
    int32_t acc = 0;
    for (int64_t c = 0; c < Cg; ++c) acc += q[g * Cg + c];
    out[g] = acc;
  }
}

// x: float32 [M, C]; returns (codes uint8 [M, C], group sums int32 [M, G]); G = 0: no sums.
std::vector<torch::Tensor> quantize(torch::Tensor x, double s, double lo, double hi, int64_t G) {
  check(x, "x", torch::kFloat32, 2);
  const int64_t M = x.size(0), C = x.size(1);
  require(G >= 0 && (G == 0 || C % G == 0), "groups must divide the channels");
  auto codes = torch::empty({M, C}, torch::kUInt8);
  auto sums = torch::empty({M, G}, torch::kInt32);
  const float fs = static_cast<float>(s), flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = codes.data_ptr<uint8_t>();
  int32_t* sp = sums.data_ptr<int32_t>();
  // the codes are element-wise: blocks of whole rows as one flat run (short rows vectorize too)
  at::parallel_for(0, M, grain_rows(C), [&](int64_t m0, int64_t m1) {
    quantize_row(xp + m0 * C, qp + m0 * C, (m1 - m0) * C, flo, fhi, fs);
    if (G)
      for (int64_t m = m0; m < m1; ++m) group_sums(qp + m * C, C, G, sp + m * G);
  });
  return {codes, sums};
}

std::vector<int64_t> pair_arg(const std::vector<int64_t>& v, const char* name) {
  require(v.size() == 2, std::string(name) + " needs 2 entries");
  return v;
}

// s: int32 [N, H, W, G] per-pixel sums; returns int32 [N, Ho, Wo, G]: the sum over each output's
// window (taps outside the image add 0). Separable (integer sums: any order is exact): a
// horizontal pass per input row into [N, H, Wo, G], then a vertical pass.
torch::Tensor box_sum(torch::Tensor s, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                      std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  check(s, "s", torch::kInt32, 4);
  pair_arg(kernel, "kernel"); pair_arg(stride, "stride"); pair_arg(padding, "padding"); pair_arg(dilation, "dilation");
  const int64_t N = s.size(0), H = s.size(1), W = s.size(2), G = s.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1],
                dh = dilation[0], dw = dilation[1];
  require(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0, "bad window geometry");
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  require(Ho > 0 && Wo > 0, "the (padded) input is smaller than the window");
  auto tmp = torch::empty({N, H, Wo, G}, torch::kInt32);
  auto out = torch::empty({N, Ho, Wo, G}, torch::kInt32);
  const int32_t* sp = s.data_ptr<int32_t>();
  int32_t* tp = tmp.data_ptr<int32_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t row_out = Wo * G;
  at::parallel_for(0, N * H, grain_rows(row_out * kw), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* __restrict__ in = sp + r * W * G;
      int32_t* __restrict__ o = tp + r * row_out;
      for (int64_t ow = 0; ow < Wo; ++ow) {
        int32_t* __restrict__ ov = o + ow * G;
        for (int64_t g = 0; g < G; ++g) ov[g] = 0;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t iw = ow * sw - pw + j * dw;
          if (iw < 0 || iw >= W) continue;
          const int32_t* __restrict__ v = in + iw * G;
          for (int64_t g = 0; g < G; ++g) ov[g] += v[g];
        }
      }
    }
  });
  at::parallel_for(0, N * Ho, grain_rows(row_out * kh), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / Ho, oh = r % Ho;
      int32_t* __restrict__ o = op + r * row_out;
      for (int64_t c = 0; c < row_out; ++c) o[c] = 0;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * sh - ph + i * dh;
        if (ih < 0 || ih >= H) continue;
        const int32_t* __restrict__ v = tp + (n * H + ih) * row_out;
        for (int64_t c = 0; c < row_out; ++c) o[c] += v[c];
      }
    }
  });
  return out;
}

struct Epi {
  const int32_t* acc;
  const int32_t* sj;
  const double* a;
  const double* b;
  const double* cst;
  int64_t M, O, G, P;
  int64_t order;
};

void check_epilogue(const torch::Tensor& acc, const torch::Tensor& sj, const torch::Tensor& a, const torch::Tensor& b,
                    const torch::Tensor& cst, int64_t order) {
  check(acc, "acc", torch::kInt32, 2);
  check(sj, "sj", torch::kInt32, 2);
  check(a, "a", torch::kFloat64, 1);
  check(b, "b", torch::kFloat64, 1);
  check(cst, "cst", torch::kFloat64, 2);
  const int64_t M = acc.size(0), O = acc.size(1), G = sj.size(1), P = cst.size(0);
  require(sj.size(0) == M && G > 0 && O % G == 0, "sj must be [M, G] with G dividing O");
  require(a.size(0) == O && b.size(0) == O && cst.size(1) == O, "a, b must be [O], cst [P, O]");
  require(P > 0 && M % P == 0, "cst's positions P must divide the rows M");
  require(order == 0 || order == 1, "order must be 0 or 1");
}

Epi make_epi(const torch::Tensor& acc, const torch::Tensor& sj, const torch::Tensor& a, const torch::Tensor& b,
             const torch::Tensor& cst, int64_t order) {
  return Epi{acc.data_ptr<int32_t>(), sj.data_ptr<int32_t>(), a.data_ptr<double>(), b.data_ptr<double>(),
             cst.data_ptr<double>(), acc.size(0), acc.size(1), sj.size(1), cst.size(0), order};
}

// y[o] of row m, rounded once to float32 (separate multiplies and adds: no FMA, see the header).
// Local restrict pointers so that the compiler vectorizes the channel loops.
inline void epilogue_row(const Epi& e, int64_t m, float* __restrict__ y) {
  const int64_t O = e.O, G = e.G;
  const int32_t* __restrict__ acc = e.acc + m * O;
  const int32_t* __restrict__ sj = e.sj + m * G;
  const double* __restrict__ c = e.cst + (m % e.P) * O;
  const double* __restrict__ a = e.a;
  const double* __restrict__ b = e.b;
  if (G == 1) {
    const double s = static_cast<double>(sj[0]);
    if (e.order == 0) {
      for (int64_t o = 0; o < O; ++o) {
        const double t = a[o] * static_cast<double>(acc[o]);
        const double u = b[o] * s;
        y[o] = static_cast<float>((t + u) + c[o]);
      }
    } else {
      for (int64_t o = 0; o < O; ++o) {
        const double t = a[o] * static_cast<double>(acc[o]);
        const double u = b[o] * s;
        y[o] = static_cast<float>((t + c[o]) + u);
      }
    }
    return;
  }
  const int64_t Og = O / G;
  if (Og == 1) {  // depthwise: one S_j per channel
    for (int64_t o = 0; o < O; ++o) {
      const double t = a[o] * static_cast<double>(acc[o]);
      const double u = b[o] * static_cast<double>(sj[o]);
      y[o] = static_cast<float>(e.order == 0 ? (t + u) + c[o] : (t + c[o]) + u);
    }
    return;
  }
  for (int64_t o = 0; o < O; ++o) {
    const double t = a[o] * static_cast<double>(acc[o]);
    const double u = b[o] * static_cast<double>(sj[o / Og]);
    y[o] = static_cast<float>(e.order == 0 ? (t + u) + c[o] : (t + c[o]) + u);
  }
}

torch::Tensor epilogue_float(torch::Tensor acc, torch::Tensor sj, torch::Tensor a, torch::Tensor b, torch::Tensor cst,
                             int64_t order) {
  check_epilogue(acc, sj, a, b, cst, order);
  const Epi e = make_epi(acc, sj, a, b, cst, order);
  auto out = torch::empty({e.M, e.O}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, e.M, grain_rows(e.O), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) epilogue_row(e, m, op + m * e.O);
  });
  return out;
}

// thr: float32 [L, O] = direction[o] * threshold[l][o] (levels on the rows: the count runs over
// contiguous channels); sign: float32 [O] = direction (+1 / -1). code = #{l : sign*y >= thr[l]}.
std::vector<torch::Tensor> epilogue_codes(torch::Tensor acc, torch::Tensor sj, torch::Tensor a, torch::Tensor b,
                                          torch::Tensor cst, int64_t order, torch::Tensor thr, torch::Tensor sign,
                                          int64_t G2) {
  check_epilogue(acc, sj, a, b, cst, order);
  check(thr, "thr", torch::kFloat32, 2);
  check(sign, "sign", torch::kFloat32, 1);
  const Epi e = make_epi(acc, sj, a, b, cst, order);
  const int64_t L = thr.size(0);
  require(thr.size(1) == e.O && sign.size(0) == e.O, "thr must be [L, O], sign [O]");
  require(L >= 1 && L <= 255, "thr must have 1..255 levels");
  require(G2 >= 0 && (G2 == 0 || e.O % G2 == 0), "groups must divide the channels");
  auto codes = torch::empty({e.M, e.O}, torch::kUInt8);
  auto sums = torch::empty({e.M, G2}, torch::kInt32);
  const float* tp = thr.data_ptr<float>();
  const float* sg = sign.data_ptr<float>();
  uint8_t* qp = codes.data_ptr<uint8_t>();
  int32_t* sp = sums.data_ptr<int32_t>();
  // Blocks of rb rows: y of the block, then the threshold count over the flat block against
  // thresholds tiled rb times (short rows vectorize too).
  const int64_t O = e.O, rb = std::max<int64_t>(1, 256 / O), width = rb * O;
  std::vector<float> tiled(L * width), sign_t(width);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t r = 0; r < rb; ++r) std::memcpy(&tiled[l * width + r * O], tp + l * O, O * sizeof(float));
  for (int64_t r = 0; r < rb; ++r) std::memcpy(&sign_t[r * O], sg, O * sizeof(float));
  const int64_t blocks = (e.M + rb - 1) / rb;
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain_rows(width * (L + 4))), [&](int64_t b0, int64_t b1) {
    std::vector<float> y(width);
    std::vector<int32_t> cnt(width);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * rb, rows = std::min<int64_t>(rb, e.M - m0), n = rows * O;
      float* __restrict__ yv = y.data();
      int32_t* __restrict__ cv = cnt.data();
      const float* __restrict__ sgv = sign_t.data();
      for (int64_t r = 0; r < rows; ++r) epilogue_row(e, m0 + r, yv + r * O);
      for (int64_t i = 0; i < n; ++i) {
        yv[i] *= sgv[i];  // exact (a sign change)
        cv[i] = 0;
      }
      for (int64_t l = 0; l < L; ++l) {
        const float* __restrict__ t = tiled.data() + l * width;
        for (int64_t i = 0; i < n; ++i) cv[i] += yv[i] >= t[i] ? 1 : 0;  // NaN thresholds: never
      }
      uint8_t* __restrict__ q = qp + m0 * O;
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<uint8_t>(cv[i]);
      if (G2)
        for (int64_t r = 0; r < rows; ++r) group_sums(q + r * O, O, G2, sp + (m0 + r) * G2);
    }
  });
  return {codes, sums};
}

torch::Tensor channel_sums(torch::Tensor codes, int64_t G) {
  check(codes, "codes", torch::kUInt8, 2);
  const int64_t M = codes.size(0), C = codes.size(1);
  require(G > 0 && C % G == 0, "groups must divide the channels");
  auto out = torch::empty({M, G}, torch::kInt32);
  const uint8_t* qp = codes.data_ptr<uint8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, M, grain_rows(C), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) group_sums(qp + m * C, C, G, op + m * G);
  });
  return out;
}

// codes: uint8 [M, K] of 0/1 -> int64 [M, ceil(K/64)], bit b of word i = element 64 i + b
// (the layout of int_ops.popcount_linear); only bit 0 of each code is read.
torch::Tensor pack_bits(torch::Tensor codes) {
  check(codes, "codes", torch::kUInt8, 2);
  const int64_t M = codes.size(0), K = codes.size(1), Wd = (K + 63) / 64;
  auto out = torch::empty({M, Wd}, torch::kInt64);
  const uint8_t* qp = codes.data_ptr<uint8_t>();
  uint64_t* op = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, M, grain_rows(K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t w = 0; w < Wd; ++w) {
        uint64_t v = 0;
        const int64_t k0 = 64 * w, k1 = std::min<int64_t>(K, k0 + 64);
        for (int64_t k = k0; k < k1; ++k) v |= static_cast<uint64_t>(qp[m * K + k] & 1) << (k - k0);
        op[m * Wd + w] = v;
      }
  });
  return out;
}

const char* isa_name() {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  return "avx512vnni";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("isa", &isa_name, "vector instruction set of this build");
  m.def("quantize", &quantize, "float32 [M, C] -> (uint8 codes [M, C], int32 group sums [M, G])", nogil);
  m.def("box_sum", &box_sum, "window sums of int32 NHWC per-pixel sums", nogil);
  m.def("epilogue_float", &epilogue_float, "int32 sums -> float32 deployed-layer output", nogil);
  m.def("epilogue_codes", &epilogue_codes, "int32 sums -> next layer's uint8 codes through thresholds", nogil);
  m.def("channel_sums", &channel_sums, "group sums of uint8 codes", nogil);
  m.def("pack_bits", &pack_bits, "0/1 uint8 codes -> int64 bit words", nogil);
}
