// Shared by the CPU kernel's translation unit and its AVX-512 micro-kernels (avx512.h): the BLAS entry
// points torch ships, AVX2 exponentials and row helpers, the token rule of a tile, the problem
// description and the dynamic scheduler. Everything lives in namespace blockattn_cpu.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

extern "C" {
// Fortran BLAS interface exported by libtorch_cpu (MKL); column-major.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
// MKL's per-thread thread count: tiles are already parallel, so each BLAS call must stay on its thread.
int MKL_Set_Num_Threads_Local(int);
}

namespace blockattn_cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Consecutive listed blocks are merged into GEMMs up to this many tokens wide.
constexpr int64_t kRunWidth = 512;

// Column-major GEMM C = alpha * op(A) op(B) + beta * C.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two constants so r is exact),
// exp(r) by a degree-6 Taylor polynomial (relative error ~2e-7 on that interval), 2^n through the
// exponent bits. Inputs below ln(FLT_MIN) (including -inf, i.e. masked scores) give exactly 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37626f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // n in [-126, 128): split 2^n = 2^(n/2) * 2^(n - n/2) so both factors are normal floats
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 b = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  return _mm256_blendv_ps(_mm256_mul_ps(_mm256_mul_ps(p, a), b), _mm256_setzero_ps(), underflow);
}

inline float row_max(const float* x, int n) {
  int j = 0;
  __m256 best = _mm256_set1_ps(kNegInf);
  for (; j + 8 <= n; j += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  float m = *std::max_element(lanes, lanes + 8);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - shift); returns the sum.
inline float exp_shift_sum(float* x, int n, float shift) {
  int j = 0;
  __m256 total = _mm256_setzero_ps();
  const __m256 s = _mm256_set1_ps(shift);
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    _mm256_storeu_ps(x + j, e);
    total = _mm256_add_ps(total, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  float sum = std::accumulate(lanes, lanes + 8, 0.0f);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

inline void scale_row(float* x, int n, float factor) {
  int j = 0;
  const __m256 f = _mm256_set1_ps(factor);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), f));
  for (; j < n; ++j) x[j] *= factor;
}

// The token rule of one tile: analytic constraints (causal / window, bottom-right aligned) plus an
// optional explicit bit mask. `apply` sets disallowed scores to -inf; `full` says nothing needs masking.
struct TileRule {
  int64_t q0, k0, rows, cols, offset;
  bool causal;
  int64_t left, right;  // < 0: no window
  const uint8_t* explicit_mask;  // [block_q, block_k] or nullptr
  int64_t block_k;

  // allowed key columns of row i: [lo, hi] in tile coordinates
  inline void interval(int64_t i, int64_t& lo, int64_t& hi) const {
    const int64_t aligned = q0 + i + offset;
    lo = 0;
    hi = cols - 1;
    if (causal) hi = std::min(hi, aligned - k0);
    if (left >= 0) {
      lo = std::max(lo, aligned - left - k0);
      hi = std::min(hi, aligned + right - k0);
    }
  }

  bool full() const {
    if (explicit_mask) return false;
    int64_t lo, hi;
    interval(0, lo, hi);
    if (lo != 0 || hi != cols - 1) return false;
    interval(rows - 1, lo, hi);
    return lo == 0 && hi == cols - 1;
  }

  inline void apply(float* row, int64_t i) const {
    int64_t lo, hi;
    interval(i, lo, hi);
    for (int64_t j = 0; j < cols; ++j)
      if (j < lo || j > hi) row[j] = kNegInf;
    if (explicit_mask) {
      const uint8_t* bits = explicit_mask + i * block_k;
      for (int64_t j = 0; j < cols; ++j)
        if (!bits[j]) row[j] = kNegInf;
    }
  }
};

struct Problem {
  int64_t B, Hq, Hkv, Lq, Lk, D, block_q, block_k, nQ, nK;
  int64_t layout_b, layout_h;  // 1 or B / Hq: the layout broadcasts
  bool causal;
  int64_t left, right;
  float scale;
  const uint8_t* tile_masks;

  int64_t lb(int64_t b) const { return layout_b == 1 ? 0 : b; }
  int64_t lh(int64_t h) const { return layout_h == 1 ? 0 : h; }

  TileRule rule(int64_t qb, int64_t kb, int32_t mask_id) const {
    const int64_t q0 = qb * block_q, k0 = kb * block_k;
    return TileRule{q0, k0, std::min(block_q, Lq - q0), std::min(block_k, Lk - k0), Lk - Lq, causal, left, right,
                    mask_id >= 0 ? tile_masks + mask_id * block_q * block_k : nullptr, block_k};
  }
};

inline Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& counts, int64_t block_q,
                     int64_t block_k, bool causal, int64_t left, int64_t right, double scale,
                     const at::Tensor& tile_masks) {
  Problem p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.block_q = block_q;
  p.block_k = block_k;
  p.nQ = (p.Lq + block_q - 1) / block_q;
  p.nK = (p.Lk + block_k - 1) / block_k;
  p.layout_b = counts.size(0);
  p.layout_h = counts.size(1);
  p.causal = causal;
  p.left = left;
  p.right = right;
  p.scale = static_cast<float>(scale);
  p.tile_masks = tile_masks.numel() ? tile_masks.data_ptr<uint8_t>() : nullptr;
  return p;
}

// Runs `work(item, thread)` over items in the given order, handing them out dynamically.
template <typename F>
void run_dynamic(const std::vector<int64_t>& order, F work) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(order.size(), 1));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const int previous = MKL_Set_Num_Threads_Local(1);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = next++; i < static_cast<int64_t>(order.size()); i = next++) work(order[i], t);
    }
    MKL_Set_Num_Threads_Local(previous);
  });
}

inline std::vector<int64_t> longest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Work per (batch, head, query block) item: the number of key tiles its list holds.
inline std::vector<int64_t> query_block_costs(const Problem& p, const int32_t* cnt) {
  std::vector<int64_t> cost(p.B * p.Hq * p.nQ);
  for (int64_t it = 0; it < static_cast<int64_t>(cost.size()); ++it) {
    const int64_t qb = it % p.nQ, h = (it / p.nQ) % p.Hq, b = it / (p.nQ * p.Hq);
    cost[it] = cnt[(p.lb(b) * p.layout_h + p.lh(h)) * p.nQ + qb];
  }
  return cost;
}

}  // namespace blockattn_cpu
