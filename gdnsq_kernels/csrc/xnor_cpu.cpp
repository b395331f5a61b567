// Packed-bit GEMM on the CPU: C[m, n] = k - 2*popcount(A_m XOR B_n) (XNOR form) or
// popcount(A_m AND B_n) (AND form), over uint64 words.
//
// Inputs are the int32 words of pack_bits (bits past k already cleared by the caller), read as
// uint64 pairs plus a trailing 32-bit word when the count is odd (no padding copy). Rows of A are taken four at a time so each loaded
// word of B serves four dot products; the inner loop over words is a plain popcount reduction
// that compilers vectorise (vpopcntq with AVX-512 VPOPCNTDQ) or run as scalar popcnt.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// The entry points trust nothing the Python wrappers checked already (last line of defence):
// every tensor must be a CPU tensor, since its data pointer is read as host memory.
void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

template <bool XNOR>
inline uint64_t combine(uint64_t a, uint64_t b) {
  return XNOR ? (a ^ b) : (a & b);
}

// One uint64 from two consecutive int32 words (little-endian: word 2w is the low half, so bit
// order is unchanged). memcpy keeps the unaligned load well-defined; it compiles to a plain load.
inline uint64_t load64(const uint32_t* p, int64_t w) {
  uint64_t x;
  std::memcpy(&x, p + 2 * w, sizeof(x));
  return x;
}

template <bool XNOR>
inline int64_t dot(const uint32_t* a, const uint32_t* b, int64_t W64, bool tail, int64_t W32) {
  int64_t s = 0;
  for (int64_t w = 0; w < W64; ++w) s += __builtin_popcountll(combine<XNOR>(load64(a, w), load64(b, w)));
  if (tail) s += __builtin_popcount(static_cast<uint32_t>(combine<XNOR>(a[W32 - 1], b[W32 - 1])));
  return s;
}

template <bool XNOR>
void gemm_rows(const uint32_t* A, const uint32_t* B, int32_t* C, int64_t m0, int64_t m1,
               int64_t n0, int64_t n1, int64_t N, int64_t W32, int32_t k) {
  const int64_t W64 = W32 / 2;
  const bool tail = (W32 & 1) != 0;
  auto store = [&](int64_t m, int64_t n, int64_t s) {
    C[m * N + n] = XNOR ? k - 2 * static_cast<int32_t>(s) : static_cast<int32_t>(s);
  };
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) {
    const uint32_t* a0 = A + (m + 0) * W32;
    const uint32_t* a1 = A + (m + 1) * W32;
    const uint32_t* a2 = A + (m + 2) * W32;
    const uint32_t* a3 = A + (m + 3) * W32;
    for (int64_t n = n0; n < n1; ++n) {
      const uint32_t* b = B + n * W32;
      int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t w = 0; w < W64; ++w) {
        const uint64_t bw = load64(b, w);
        s0 += __builtin_popcountll(combine<XNOR>(load64(a0, w), bw));
        s1 += __builtin_popcountll(combine<XNOR>(load64(a1, w), bw));
        s2 += __builtin_popcountll(combine<XNOR>(load64(a2, w), bw));
        s3 += __builtin_popcountll(combine<XNOR>(load64(a3, w), bw));
      }
      if (tail) {
        const uint32_t bt = b[W32 - 1];
        s0 += __builtin_popcount(static_cast<uint32_t>(combine<XNOR>(a0[W32 - 1], bt)));
        s1 += __builtin_popcount(static_cast<uint32_t>(combine<XNOR>(a1[W32 - 1], bt)));
        s2 += __builtin_popcount(static_cast<uint32_t>(combine<XNOR>(a2[W32 - 1], bt)));
        s3 += __builtin_popcount(static_cast<uint32_t>(combine<XNOR>(a3[W32 - 1], bt)));
      }
      store(m + 0, n, s0);
      store(m + 1, n, s1);
      store(m + 2, n, s2);
      store(m + 3, n, s3);
    }
  }
  for (; m < m1; ++m) {
    const uint32_t* a = A + m * W32;
    for (int64_t n = n0; n < n1; ++n) store(m, n, dot<XNOR>(a, B + n * W32, W64, tail, W32));
  }
}

torch::Tensor packed_gemm(torch::Tensor a, torch::Tensor b, int64_t k, bool xnor) {
  check_cpu(a, "packed_gemm: a");
  check_cpu(b, "packed_gemm: b");
  TORCH_CHECK(a.dtype() == torch::kInt32 && b.dtype() == torch::kInt32, "packed_gemm: int32 words expected");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "packed_gemm: (M, W) and (N, W) expected");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "packed_gemm: contiguous inputs expected");
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  // k sizes the XNOR result (k - 2*popcount) and is stored in int32 like the result itself: it
  // must fit the words given and the int32 range, never be truncated.
  TORCH_CHECK_VALUE(k >= 0 && k <= 32 * W && (k + 31) / 32 == W, "packed_gemm: k=", k, " does not match ", W,
                    " words per row");
  TORCH_CHECK_VALUE(k <= std::numeric_limits<int32_t>::max(), "packed_gemm: k=", k,
                    " exceeds the int32 range of the result");
  auto c = torch::empty({M, N}, a.options());
  const uint32_t* A = reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>());
  const uint32_t* B = reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>());
  int32_t* C = c.data_ptr<int32_t>();
  const int32_t kk = static_cast<int32_t>(k);
  // Tiles of 16 rows x 64 columns: B's 64 rows (64*W words) stay in L1/L2 across a row tile.
  const int64_t TM = 16, TN = 64;
  const int64_t tiles_m = (M + TM - 1) / TM, tiles_n = (N + TN - 1) / TN;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tm = t / tiles_n, tn = t % tiles_n;
      const int64_t m0 = tm * TM, m1 = std::min(M, m0 + TM);
      const int64_t n0 = tn * TN, n1 = std::min(N, n0 + TN);
      if (xnor) {
        gemm_rows<true>(A, B, C, m0, m1, n0, n1, N, W, kk);
      } else {
        gemm_rows<false>(A, B, C, m0, m1, n0, n1, N, W, kk);
      }
    }
  });
  return c;
}

// Fused float64 epilogue of binary_conv2d, written once as float32 NCHW:
//   out[n, o, l] = kj[n, l, o]*ss[o] + cst[o, l] + kj[n, l, O]*msa[o]
// kj: int32 (N, L, O+1) popcount GEMM of the patches against the weight rows plus an all-ones
// row (column O = sum(j) per position); cst: float64 (O, L). One image's kj block (L*(O+1)
// words) stays in cache while its O output planes are written.
torch::Tensor conv_epilogue(torch::Tensor kj, torch::Tensor cst, torch::Tensor ss, torch::Tensor msa) {
  check_cpu(kj, "conv_epilogue: kj");
  check_cpu(cst, "conv_epilogue: cst");
  check_cpu(ss, "conv_epilogue: ss");
  check_cpu(msa, "conv_epilogue: msa");
  TORCH_CHECK(kj.dtype() == torch::kInt32 && kj.dim() == 3 && kj.is_contiguous() && kj.size(2) >= 1,
              "conv_epilogue: kj");
  const int64_t N = kj.size(0), L = kj.size(1), O = kj.size(2) - 1;
  TORCH_CHECK(cst.dtype() == torch::kFloat64 && cst.is_contiguous() && cst.numel() == O * L, "conv_epilogue: cst");
  TORCH_CHECK(ss.dtype() == torch::kFloat64 && msa.dtype() == torch::kFloat64 && ss.numel() == O && msa.numel() == O,
              "conv_epilogue: ss/msa");
  auto ssc = ss.contiguous(), msac = msa.contiguous();
  auto out = torch::empty({N, O, L}, kj.options().dtype(torch::kFloat32));
  const int32_t* K = kj.data_ptr<int32_t>();
  const double* C = cst.data_ptr<double>();
  const double* S = ssc.data_ptr<double>();
  const double* MS = msac.data_ptr<double>();
  float* Y = out.data_ptr<float>();
  const int64_t R = O + 1;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int32_t* kn = K + n * L * R;
      for (int64_t o = 0; o < O; ++o) {
        const double* c = C + o * L;
        const double s = S[o], ms = MS[o];
        float* y = Y + (n * O + o) * L;
        for (int64_t l = 0; l < L; ++l) {
          double t = static_cast<double>(kn[l * R + o]) * s;
          t = t + c[l];
          t = t + static_cast<double>(kn[l * R + O]) * ms;
          y[l] = static_cast<float>(t);
        }
      }
    }
  });
  return out;
}

// Fused float64 epilogue of binary_linear: out[m, o] = kj[m, o]*ss[o] + cst[o] + jsum[m]*msa[o].
torch::Tensor linear_epilogue(torch::Tensor kj, torch::Tensor jsum, torch::Tensor ss, torch::Tensor msa,
                              torch::Tensor cst) {
  check_cpu(kj, "linear_epilogue: kj");
  check_cpu(jsum, "linear_epilogue: jsum");
  check_cpu(ss, "linear_epilogue: ss");
  check_cpu(msa, "linear_epilogue: msa");
  check_cpu(cst, "linear_epilogue: cst");
  TORCH_CHECK(kj.dtype() == torch::kInt32 && kj.dim() == 2 && kj.is_contiguous(), "linear_epilogue: kj");
  const int64_t M = kj.size(0), O = kj.size(1);
  TORCH_CHECK(jsum.dtype() == torch::kInt32 && jsum.numel() == M, "linear_epilogue: jsum");
  TORCH_CHECK(ss.dtype() == torch::kFloat64 && msa.dtype() == torch::kFloat64 && cst.dtype() == torch::kFloat64 &&
                  ss.numel() == O && msa.numel() == O && cst.numel() == O,
              "linear_epilogue: ss/msa/cst");
  auto jc = jsum.contiguous(), ssc = ss.contiguous(), msac = msa.contiguous(), cc = cst.contiguous();
  auto out = torch::empty({M, O}, kj.options().dtype(torch::kFloat32));
  const int32_t* K = kj.data_ptr<int32_t>();
  const int32_t* J = jc.data_ptr<int32_t>();
  const double* S = ssc.data_ptr<double>();
  const double* MS = msac.data_ptr<double>();
  const double* C = cc.data_ptr<double>();
  float* Y = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const double js = static_cast<double>(J[m]);
      for (int64_t o = 0; o < O; ++o) {
        double t = static_cast<double>(K[m * O + o]) * S[o];
        t = t + C[o];
        t = t + js * MS[o];
        Y[m * O + o] = static_cast<float>(t);
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_gemm", &packed_gemm, "XNOR/AND popcount GEMM over uint64 words (CPU)");
  m.def("conv_epilogue", &conv_epilogue, "binary_conv2d float64 epilogue -> float32 NCHW (CPU)");
  m.def("linear_epilogue", &linear_epilogue, "binary_linear float64 epilogue -> float32 (CPU)");
}
