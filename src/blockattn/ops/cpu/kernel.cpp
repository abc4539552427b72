// Block-sparse attention on CPU: FlashAttention-2's tiled online softmax, visiting only the key
// tiles a BlockLayout lists. Work items are scheduled dynamically, longest first, because causal and
// sparse layouts give query blocks very different amounts of work. The forward pass has two
// implementations chosen at run time: on CPUs with AVX-512 (F/BW/VL/DQ) its own register-blocked
// micro-kernels (fwd_avx512.h); elsewhere tiles are small GEMMs through the BLAS torch ships (MKL's
// sgemm_) with AVX2 exponentials, as is the backward pass everywhere. The module is built with AVX2/FMA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

extern "C" {
// Fortran BLAS interface exported by libtorch_cpu (MKL); column-major.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
// MKL's per-thread thread count: tiles are already parallel, so each BLAS call must stay on its thread.
int MKL_Set_Num_Threads_Local(int);
}

namespace {

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

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& counts, int64_t block_q,
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

std::vector<int64_t> longest_first(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

#include "fwd_avx512.h"

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// The forward implementation in use: "avx512" where the CPU has it, else "avx2"; set_isa can force "avx2".
bool g_use_avx512 = cpu_has_avx512();

}  // namespace

std::string isa() { return g_use_avx512 ? "avx512" : "avx2"; }

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512", "isa must be 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(name == "avx2" || cpu_has_avx512(), "this CPU lacks AVX-512 (F/BW/VL/DQ)");
  g_use_avx512 = name == "avx512";
}

// Writes out [B,Hq,Lq,D] and lse [B,Hq,Lq] (every element) for float32 contiguous q [B,Hq,Lq,D], k/v
// [B,Hkv,Lk,D] and the layout's block lists (counts [Bl,Hl,nQ], indices [Bl,Hl,nQ,maxK], mask_ids like
// indices or empty).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& counts,
             const at::Tensor& indices, const at::Tensor& mask_ids, const at::Tensor& tile_masks, int64_t block_q,
             int64_t block_k, bool causal, int64_t left, int64_t right, double scale, at::Tensor& out,
             at::Tensor& lse) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &out, &lse})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "cpu kernel expects contiguous float32");
  for (const at::Tensor* t : {&counts, &indices})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "cpu kernel expects contiguous int32 lists");
  const Problem p = make_problem(q, k, counts, block_q, block_k, causal, left, right, scale, tile_masks);
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  float* LSE = lse.data_ptr<float>();
  const int32_t* cnt = counts.data_ptr<int32_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const int32_t* mid = mask_ids.numel() ? mask_ids.data_ptr<int32_t>() : nullptr;
  const int64_t maxK = indices.size(3), D = p.D, group = p.Hq / p.Hkv;

  const int64_t items = p.B * p.Hq * p.nQ;
  std::vector<int64_t> cost(items);
  for (int64_t it = 0; it < items; ++it) {
    const int64_t qb = it % p.nQ, h = (it / p.nQ) % p.Hq, b = it / (p.nQ * p.Hq);
    cost[it] = cnt[(p.lb(b) * p.layout_h + p.lh(h)) * p.nQ + qb];
  }
  const int64_t threads = at::get_num_threads();
  if (g_use_avx512) {
    std::vector<avx512::Workspace> workspaces(threads);
    run_dynamic(longest_first(cost), [&](int64_t it, int64_t t) {
      avx512::forward_item(p, Q, K, V, cnt, idx, mid, maxK, it, workspaces[t], O, LSE);
    });
    return;
  }
  std::vector<std::vector<float>> scratch(threads);
  const int64_t run = std::max<int64_t>(1, kRunWidth / p.block_k), ldS = run * p.block_k;

  run_dynamic(longest_first(cost), [&](int64_t it, int64_t t) {
    const int64_t qb = it % p.nQ, h = (it / p.nQ) % p.Hq, b = it / (p.nQ * p.Hq);
    const int64_t hk = h / group;
    const int64_t q0 = qb * p.block_q, rows = std::min(p.block_q, p.Lq - q0);
    auto& buf = scratch[t];
    buf.resize(p.block_q * ldS + p.block_q * D + 2 * p.block_q + 2 * ldS * D);
    float* S = buf.data();
    float* acc = S + p.block_q * ldS;
    float* Kbuf = acc + p.block_q * D + 2 * p.block_q;
    float* Vbuf = Kbuf + ldS * D;
    float* m = acc + p.block_q * D;
    float* l = m + p.block_q;
    std::fill(acc, acc + rows * D, 0.0f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.0f);

    const float* Qp = Q + ((b * p.Hq + h) * p.Lq + q0) * D;
    const int64_t list = (p.lb(b) * p.layout_h + p.lh(h)) * p.nQ + qb;
    const int32_t* blocks = idx + list * maxK;
    for (int64_t s = 0, e; s < cnt[list]; s = e) {
      // up to `run` listed key blocks form one wide GEMM (fewer, more efficient BLAS calls); blocks that
      // are not consecutive in memory are first copied side by side into per-thread buffers
      e = std::min<int64_t>(cnt[list], s + run);
      const bool consecutive = blocks[e - 1] - blocks[s] == e - 1 - s;
      const int64_t last_k0 = blocks[e - 1] * p.block_k;
      const int64_t cols = (e - 1 - s) * p.block_k + std::min(p.block_k, p.Lk - last_k0);
      const float* Kp = K + ((b * p.Hkv + hk) * p.Lk + blocks[s] * p.block_k) * D;
      const float* Vp = V + ((b * p.Hkv + hk) * p.Lk + blocks[s] * p.block_k) * D;
      if (!consecutive) {
        for (int64_t tile = s; tile < e; ++tile) {
          const int64_t k0 = blocks[tile] * p.block_k, n = std::min(p.block_k, p.Lk - k0) * D;
          const int64_t src = ((b * p.Hkv + hk) * p.Lk + k0) * D, dst = (tile - s) * p.block_k * D;
          std::copy(K + src, K + src + n, Kbuf + dst);
          std::copy(V + src, V + src + n, Vbuf + dst);
        }
        Kp = Kbuf;
        Vp = Vbuf;
      }
      // S[rows, cols] (row-major, ld ldS) = scale * Q K^T
      gemm('T', 'N', cols, rows, D, p.scale, Kp, D, Qp, D, 0.0f, S, ldS);
      for (int64_t tile = s; tile < e; ++tile) {
        const TileRule rule = p.rule(qb, blocks[tile], mid ? mid[list * maxK + tile] : -1);
        if (rule.full()) continue;
        for (int64_t i = 0; i < rows; ++i) rule.apply(S + i * ldS + (tile - s) * p.block_k, i);
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* row = S + i * ldS;
        const float new_max = std::max(m[i], row_max(row, cols));
        if (new_max == kNegInf) {  // nothing allowed in this row so far
          std::fill(row, row + cols, 0.0f);
          continue;
        }
        const float sum = exp_shift_sum(row, cols, new_max);
        const float correction = std::exp(m[i] - new_max);
        if (correction != 1.0f) scale_row(acc + i * D, D, correction);
        l[i] = l[i] * correction + sum;
        m[i] = new_max;
      }
      // acc[rows, D] += P V
      gemm('N', 'N', D, rows, cols, 1.0f, Vp, D, S, ldS, 1.0f, acc, D);
    }
    float* Op = O + ((b * p.Hq + h) * p.Lq + q0) * D;
    float* Lp = LSE + (b * p.Hq + h) * p.Lq + q0;
    for (int64_t i = 0; i < rows; ++i) {
      if (l[i] > 0.0f) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < D; ++d) Op[i * D + d] = acc[i * D + d] * inv;
        Lp[i] = m[i] + std::log(l[i]);
      } else {  // the layout gives this row no key: zero output, lse = -inf
        std::fill(Op + i * D, Op + (i + 1) * D, 0.0f);
        Lp[i] = kNegInf;
      }
    }
  });
}

// Writes dk, dv (every element) and returns dq. `delta` = rowsum(dout * out) [B,Hq,Lq]; the transposed lists give, per key block, the query
// blocks that list it (q_counts [Bl,Hl,nK], q_indices/q_mask_ids [Bl,Hl,nK,maxQ]). Parallel over
// (batch, kv head, key block): dK and dV are owned by one work item; dQ goes to per-thread buffers.
at::Tensor backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                    const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& q_counts,
                    const at::Tensor& q_indices, const at::Tensor& q_mask_ids, const at::Tensor& tile_masks,
                    int64_t block_q, int64_t block_k, bool causal, int64_t left, int64_t right, double scale,
                    at::Tensor& dk, at::Tensor& dv) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &dout, &lse, &delta, &dk, &dv})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "cpu kernel expects contiguous float32");
  for (const at::Tensor* t : {&q_counts, &q_indices})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "cpu kernel expects contiguous int32 lists");
  const Problem p = make_problem(q, k, q_counts, block_q, block_k, causal, left, right, scale, tile_masks);
  const int64_t D = p.D, group = p.Hq / p.Hkv, maxQ = q_indices.size(3);
  const int64_t threads = at::get_num_threads();
  auto dq_parts = at::zeros({threads, p.B, p.Hq, p.Lq, D}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  const float* dO = dout.data_ptr<float>();
  const float* LSE = lse.data_ptr<float>();
  const float* DELTA = delta.data_ptr<float>();
  float* dQ = dq_parts.data_ptr<float>();
  float* dK = dk.data_ptr<float>();
  float* dV = dv.data_ptr<float>();
  const int32_t* cnt = q_counts.data_ptr<int32_t>();
  const int32_t* idx = q_indices.data_ptr<int32_t>();
  const int32_t* mid = q_mask_ids.numel() ? q_mask_ids.data_ptr<int32_t>() : nullptr;
  const int64_t per_thread = p.B * p.Hq * p.Lq * D;

  const int64_t items = p.B * p.Hkv * p.nK;
  std::vector<int64_t> cost(items, 0);
  for (int64_t it = 0; it < items; ++it) {
    const int64_t kb = it % p.nK, hk = (it / p.nK) % p.Hkv, b = it / (p.nK * p.Hkv);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) cost[it] += cnt[(p.lb(b) * p.layout_h + p.lh(h)) * p.nK + kb];
  }
  std::vector<std::vector<float>> scratch(threads);
  const int64_t run = std::max<int64_t>(1, kRunWidth / p.block_q);

  run_dynamic(longest_first(cost), [&](int64_t it, int64_t t) {
    const int64_t kb = it % p.nK, hk = (it / p.nK) % p.Hkv, b = it / (p.nK * p.Hkv);
    const int64_t k0 = kb * p.block_k, cols = std::min(p.block_k, p.Lk - k0);
    auto& buf = scratch[t];
    buf.resize(2 * run * p.block_q * p.block_k + 2 * p.block_k * D);
    float* P = buf.data();
    float* dS = P + run * p.block_q * p.block_k;
    float* dKacc = dS + run * p.block_q * p.block_k;
    float* dVacc = dKacc + p.block_k * D;
    std::fill(dKacc, dKacc + 2 * p.block_k * D, 0.0f);
    const float* Kp = K + ((b * p.Hkv + hk) * p.Lk + k0) * D;
    const float* Vp = V + ((b * p.Hkv + hk) * p.Lk + k0) * D;

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const int64_t list = (p.lb(b) * p.layout_h + p.lh(h)) * p.nK + kb;
      const int32_t* blocks = idx + list * maxQ;
      for (int64_t s = 0, e; s < cnt[list]; s = e) {
        for (e = s + 1; e < cnt[list] && e - s < run && blocks[e] == blocks[e - 1] + 1; ++e) {}
        const int64_t q0 = blocks[s] * p.block_q, rows = std::min((e - s) * p.block_q, p.Lq - q0);
        const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
        const float* Qp = Q + row0 * D;
        const float* dOp = dO + row0 * D;
        gemm('T', 'N', cols, rows, D, p.scale, Kp, D, Qp, D, 0.0f, P, p.block_k);
        gemm('T', 'N', cols, rows, D, 1.0f, Vp, D, dOp, D, 0.0f, dS, p.block_k);  // dP = dO V^T
        for (int64_t tile = s; tile < e; ++tile) {
          const TileRule rule = p.rule(blocks[tile], kb, mid ? mid[list * maxQ + tile] : -1);
          if (rule.full()) continue;
          const int64_t base = (tile - s) * p.block_q;
          for (int64_t i = 0; i < rule.rows; ++i) rule.apply(P + (base + i) * p.block_k, i);
        }
        for (int64_t i = 0; i < rows; ++i) {
          float* prow = P + i * p.block_k;
          float* drow = dS + i * p.block_k;
          const float row_lse = LSE[row0 + i];
          if (row_lse == kNegInf) {
            std::fill(prow, prow + cols, 0.0f);
            std::fill(drow, drow + cols, 0.0f);
            continue;
          }
          exp_shift_sum(prow, cols, row_lse);
          const float dlt = DELTA[row0 + i];
          for (int64_t j = 0; j < cols; ++j) drow[j] = prow[j] * (drow[j] - dlt);
        }
        gemm('N', 'T', D, cols, rows, 1.0f, dOp, D, P, p.block_k, 1.0f, dVacc, D);        // dV += P^T dO
        gemm('N', 'T', D, cols, rows, p.scale, Qp, D, dS, p.block_k, 1.0f, dKacc, D);     // dK += scale dS^T Q
        gemm('N', 'N', D, rows, cols, p.scale, Kp, D, dS, p.block_k, 1.0f, dQ + t * per_thread + row0 * D, D);
      }
    }
    std::copy(dKacc, dKacc + cols * D, dK + ((b * p.Hkv + hk) * p.Lk + k0) * D);
    std::copy(dVacc, dVacc + cols * D, dV + ((b * p.Hkv + hk) * p.Lk + k0) * D);
  });
  return dq_parts.sum(0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "block-sparse attention forward (float32)");
  m.def("backward", &backward, "block-sparse attention backward (float32)");
  m.def("isa", &isa, "forward implementation in use: 'avx512' or 'avx2'");
  m.def("set_isa", &set_isa, "force the forward implementation ('avx2', or 'avx512' where supported)");
}
