// Packed-bit GEMM on the CPU: C[m, n] = k - 2*popcount(A_m XOR B_n) (XNOR form) or
// popcount(A_m AND B_n) (AND form), over uint64 words.
//
// Inputs are int64 tensors holding the uint64 bit patterns (two int32 words of pack_bits each,
// bits past k already cleared by the caller). Rows of A are taken four at a time so each loaded
// word of B serves four dot products; the inner loop over words is a plain popcount reduction
// that compilers vectorise (vpopcntq with AVX-512 VPOPCNTDQ) or run as scalar popcnt.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace {

template <bool XNOR>
inline uint64_t combine(uint64_t a, uint64_t b) {
  return XNOR ? (a ^ b) : (a & b);
}

template <bool XNOR>
void gemm_rows(const uint64_t* A, const uint64_t* B, int32_t* C, int64_t m0, int64_t m1,
               int64_t n0, int64_t n1, int64_t N, int64_t W, int32_t k) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) {
    const uint64_t* a0 = A + (m + 0) * W;
    const uint64_t* a1 = A + (m + 1) * W;
    const uint64_t* a2 = A + (m + 2) * W;
    const uint64_t* a3 = A + (m + 3) * W;
    for (int64_t n = n0; n < n1; ++n) {
      const uint64_t* b = B + n * W;
      int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t w = 0; w < W; ++w) {
        const uint64_t bw = b[w];
        s0 += __builtin_popcountll(combine<XNOR>(a0[w], bw));
        s1 += __builtin_popcountll(combine<XNOR>(a1[w], bw));
        s2 += __builtin_popcountll(combine<XNOR>(a2[w], bw));
        s3 += __builtin_popcountll(combine<XNOR>(a3[w], bw));
      }
      C[(m + 0) * N + n] = XNOR ? k - 2 * static_cast<int32_t>(s0) : static_cast<int32_t>(s0);
      C[(m + 1) * N + n] = XNOR ? k - 2 * static_cast<int32_t>(s1) : static_cast<int32_t>(s1);
      C[(m + 2) * N + n] = XNOR ? k - 2 * static_cast<int32_t>(s2) : static_cast<int32_t>(s2);
      C[(m + 3) * N + n] = XNOR ? k - 2 * static_cast<int32_t>(s3) : static_cast<int32_t>(s3);
    }
  }
  for (; m < m1; ++m) {
    const uint64_t* a = A + m * W;
    for (int64_t n = n0; n < n1; ++n) {
      const uint64_t* b = B + n * W;
      int64_t s = 0;
      for (int64_t w = 0; w < W; ++w) s += __builtin_popcountll(combine<XNOR>(a[w], b[w]));
      C[m * N + n] = XNOR ? k - 2 * static_cast<int32_t>(s) : static_cast<int32_t>(s);
    }
  }
}

torch::Tensor packed_gemm(torch::Tensor a, torch::Tensor b, int64_t k, bool xnor) {
  TORCH_CHECK(a.dtype() == torch::kInt64 && b.dtype() == torch::kInt64, "packed_gemm: int64 words expected");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "packed_gemm: (M, W) and (N, W) expected");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "packed_gemm: contiguous inputs expected");
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  auto c = torch::empty({M, N}, a.options().dtype(torch::kInt32));
  const uint64_t* A = reinterpret_cast<const uint64_t*>(a.data_ptr<int64_t>());
  const uint64_t* B = reinterpret_cast<const uint64_t*>(b.data_ptr<int64_t>());
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_gemm", &packed_gemm, "XNOR/AND popcount GEMM over uint64 words (CPU)");
}
