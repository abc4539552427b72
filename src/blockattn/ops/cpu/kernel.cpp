// Block-sparse attention on CPU: FlashAttention-2's tiled online softmax, visiting only the key
// tiles a BlockLayout lists. Work items are scheduled dynamically, longest first, because causal and
// sparse layouts give query blocks very different amounts of work. Forward and backward have two
// implementations chosen at run time: on CPUs with AVX-512 (F/BW/VL/DQ) register-blocked micro-kernels
// (avx512.h; bf16 on AVX512-BF16); elsewhere tiles are small GEMMs through the BLAS torch ships (MKL's
// sgemm_) with AVX2 exponentials. The module is built with AVX2/FMA.
#include <string>

#include "common.h"
#include "avx512.h"

namespace blockattn_cpu {
namespace {

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}

// The forward implementation in use: "avx512" where the CPU has it, else "avx2"; set_isa can force "avx2".
bool g_use_avx512 = cpu_has_avx512();

// Every (batch, head, query block) item, longest list first, on the AVX-512 forward.
template <typename T>
void avx512_forward(const Problem& p, const T* Q, const T* K, const T* V, const at::Tensor& counts,
                    const at::Tensor& indices, const at::Tensor& mask_ids, float* O, float* LSE) {
  const int32_t* cnt = counts.data_ptr<int32_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const int32_t* mid = mask_ids.numel() ? mask_ids.data_ptr<int32_t>() : nullptr;
  const int64_t maxK = indices.size(3);
  std::vector<avx512::Workspace> workspaces(at::get_num_threads());
  run_dynamic(longest_first(query_block_costs(p, cnt)), [&](int64_t it, int64_t t) {
    avx512::forward_item<T>(p, Q, K, V, cnt, idx, mid, maxK, it, workspaces[t], O, LSE);
  });
}

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
  if (g_use_avx512) {
    avx512_forward<float>(p, Q, K, V, counts, indices, mask_ids, O, LSE);
    return;
  }
  const int32_t* cnt = counts.data_ptr<int32_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const int32_t* mid = mask_ids.numel() ? mask_ids.data_ptr<int32_t>() : nullptr;
  const int64_t maxK = indices.size(3), D = p.D, group = p.Hq / p.Hkv;
  std::vector<std::vector<float>> scratch(at::get_num_threads());
  const int64_t run = std::max<int64_t>(1, kRunWidth / p.block_k), ldS = run * p.block_k;

  run_dynamic(longest_first(query_block_costs(p, cnt)), [&](int64_t it, int64_t t) {
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

// The bf16 forward on AVX512-BF16 (avx512.h): q [B,Hq,Lq,D] and k [B,Hkv,Lk,D] contiguous bf16,
// v_pairs the values as key pairs [B,Hkv,ceil(Lk/2),D,2] bf16 (zero-padded), D and block_k even; out
// [B,Hq,Lq,D] and lse [B,Hq,Lq] float32, every element written.
void forward_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_pairs, const at::Tensor& counts,
                  const at::Tensor& indices, const at::Tensor& mask_ids, const at::Tensor& tile_masks,
                  int64_t block_q, int64_t block_k, bool causal, int64_t left, int64_t right, double scale,
                  at::Tensor& out, at::Tensor& lse) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "this CPU lacks AVX512-BF16");
  for (const at::Tensor* t : {&q, &k, &v_pairs})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous(), "bf16 forward expects contiguous bf16");
  for (const at::Tensor* t : {&out, &lse})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "bf16 forward writes contiguous float32");
  for (const at::Tensor* t : {&counts, &indices})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "cpu kernel expects contiguous int32 lists");
  TORCH_CHECK(q.size(3) % 2 == 0 && block_k % 2 == 0, "bf16 forward needs an even head dim and block_k");
  TORCH_CHECK(v_pairs.dim() == 5 && v_pairs.size(2) == (k.size(2) + 1) / 2 && v_pairs.size(4) == 2,
              "v_pairs must be [B, Hkv, ceil(Lk/2), D, 2]");
  const Problem p = make_problem(q, k, counts, block_q, block_k, causal, left, right, scale, tile_masks);
  const auto* Q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* K = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* V = reinterpret_cast<const uint16_t*>(v_pairs.data_ptr());
  avx512_forward<uint16_t>(p, Q, K, V, counts, indices, mask_ids, out.data_ptr<float>(), lse.data_ptr<float>());
}

bool has_avx512_bf16() { return cpu_has_avx512_bf16(); }

namespace {

// P = exp(scale QK^T - lse) and dS = P * (dO V^T - delta) for `rows` queries from row0 against `cols`
// consecutive keys from Kp / Vp (row-major, ld `ld`); `mask_rows(P)` applies the tiles' token rules to
// the scores first. Rows that attend to nothing (lse = -inf) get P = dS = 0.
template <typename MaskRows>
inline void probabilities_and_score_grads(const Problem& p, const float* Qp, const float* dOp, const float* Kp,
                                          const float* Vp, const float* LSE, const float* DELTA, int64_t row0,
                                          int64_t rows, int64_t cols, int64_t ld, float* P, float* dS,
                                          MaskRows mask_rows) {
  const int D = static_cast<int>(p.D);
  gemm('T', 'N', cols, rows, D, p.scale, Kp, D, Qp, D, 0.0f, P, ld);
  gemm('T', 'N', cols, rows, D, 1.0f, Vp, D, dOp, D, 0.0f, dS, ld);  // dP = dO V^T
  mask_rows(P);
  for (int64_t i = 0; i < rows; ++i) {
    float* prow = P + i * ld;
    float* drow = dS + i * ld;
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
}

}  // namespace

// Writes dq, dk, dv (every element). `delta` = rowsum(dout * out) - dlse [B,Hq,Lq]. Two passes, each
// with one owner per output row, so no per-thread copies of any gradient (memory O(L), as FlashAttention-2):
// over (batch, kv head, key block) with the transposed lists (q_counts [Bl,Hl,nK], q_indices/q_mask_ids
// [Bl,Hl,nK,maxQ]) for dK and dV, then over (batch, head, query block) with the forward lists (counts,
// indices, mask_ids) for dQ; the second pass recomputes P and dS, as the Triton backward does. On AVX-512
// CPUs both passes run the forward's micro-kernels (avx512.h), elsewhere MKL tiles.
void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
              const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& q_counts,
              const at::Tensor& q_indices, const at::Tensor& q_mask_ids, const at::Tensor& counts,
              const at::Tensor& indices, const at::Tensor& mask_ids, const at::Tensor& tile_masks, int64_t block_q,
              int64_t block_k, bool causal, int64_t left, int64_t right, double scale, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv) {
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&q, &k, &v, &dout, &lse, &delta, &dq, &dk, &dv})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "cpu kernel expects contiguous float32");
  for (const at::Tensor* t : {&q_counts, &q_indices, &counts, &indices})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "cpu kernel expects contiguous int32 lists");
  const Problem p = make_problem(q, k, q_counts, block_q, block_k, causal, left, right, scale, tile_masks);
  const int64_t D = p.D, group = p.Hq / p.Hkv, maxQ = q_indices.size(3), maxK = indices.size(3);
  const int64_t threads = at::get_num_threads();
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  const float* dO = dout.data_ptr<float>();
  const float* LSE = lse.data_ptr<float>();
  const float* DELTA = delta.data_ptr<float>();
  float* dQ = dq.data_ptr<float>();
  float* dK = dk.data_ptr<float>();
  float* dV = dv.data_ptr<float>();
  std::vector<std::vector<float>> scratch(threads);

  // ---- pass 1: dK, dV per key block
  {
    const int32_t* cnt = q_counts.data_ptr<int32_t>();
    const int32_t* idx = q_indices.data_ptr<int32_t>();
    const int32_t* mid = q_mask_ids.numel() ? q_mask_ids.data_ptr<int32_t>() : nullptr;
    const int64_t items = p.B * p.Hkv * p.nK;
    std::vector<int64_t> cost(items, 0);
    for (int64_t it = 0; it < items; ++it) {
      const int64_t kb = it % p.nK, hk = (it / p.nK) % p.Hkv, b = it / (p.nK * p.Hkv);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        cost[it] += cnt[(p.lb(b) * p.layout_h + p.lh(h)) * p.nK + kb];
    }
    if (g_use_avx512) {
      std::vector<avx512::Workspace> workspaces(threads);
      run_dynamic(longest_first(cost), [&](int64_t it, int64_t t) {
        avx512::dkdv_item(p, Q, dO, K, V, LSE, DELTA, cnt, idx, mid, maxQ, it, workspaces[t], dK, dV);
      });
    } else {
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
            probabilities_and_score_grads(p, Qp, dOp, Kp, Vp, LSE, DELTA, row0, rows, cols, p.block_k, P, dS,
                                          [&](float* scores) {
              for (int64_t tile = s; tile < e; ++tile) {
                const TileRule rule = p.rule(blocks[tile], kb, mid ? mid[list * maxQ + tile] : -1);
                if (rule.full()) continue;
                const int64_t base = (tile - s) * p.block_q;
                for (int64_t i = 0; i < rule.rows; ++i) rule.apply(scores + (base + i) * p.block_k, i);
              }
            });
            gemm('N', 'T', D, cols, rows, 1.0f, dOp, D, P, p.block_k, 1.0f, dVacc, D);     // dV += P^T dO
            gemm('N', 'T', D, cols, rows, p.scale, Qp, D, dS, p.block_k, 1.0f, dKacc, D);  // dK += scale dS^T Q
          }
        }
        std::copy(dKacc, dKacc + cols * D, dK + ((b * p.Hkv + hk) * p.Lk + k0) * D);
        std::copy(dVacc, dVacc + cols * D, dV + ((b * p.Hkv + hk) * p.Lk + k0) * D);
      });
    }
  }

  // ---- pass 2: dQ per query block, over runs of consecutive listed key blocks
  {
    const int32_t* cnt = counts.data_ptr<int32_t>();
    const int32_t* idx = indices.data_ptr<int32_t>();
    const int32_t* mid = mask_ids.numel() ? mask_ids.data_ptr<int32_t>() : nullptr;
    if (g_use_avx512) {
      std::vector<avx512::Workspace> workspaces(threads);
      run_dynamic(longest_first(query_block_costs(p, cnt)), [&](int64_t it, int64_t t) {
        avx512::dq_item(p, Q, dO, K, V, LSE, DELTA, cnt, idx, mid, maxK, it, workspaces[t], dQ);
      });
      return;
    }
    const int64_t run = std::max<int64_t>(1, kRunWidth / p.block_k), ld = run * p.block_k;
    run_dynamic(longest_first(query_block_costs(p, cnt)), [&](int64_t it, int64_t t) {
      const int64_t qb = it % p.nQ, h = (it / p.nQ) % p.Hq, b = it / (p.nQ * p.Hq);
      const int64_t hk = h / group, q0 = qb * p.block_q, rows = std::min(p.block_q, p.Lq - q0);
      const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
      auto& buf = scratch[t];
      buf.resize(2 * p.block_q * ld + p.block_q * D);
      float* P = buf.data();
      float* dS = P + p.block_q * ld;
      float* dQacc = dS + p.block_q * ld;
      std::fill(dQacc, dQacc + rows * D, 0.0f);
      const int64_t list = (p.lb(b) * p.layout_h + p.lh(h)) * p.nQ + qb;
      const int32_t* blocks = idx + list * maxK;
      for (int64_t s = 0, e; s < cnt[list]; s = e) {
        for (e = s + 1; e < cnt[list] && e - s < run && blocks[e] == blocks[e - 1] + 1; ++e) {}
        const int64_t k0 = blocks[s] * p.block_k, cols = std::min((e - s) * p.block_k, p.Lk - k0);
        const float* Kp = K + ((b * p.Hkv + hk) * p.Lk + k0) * D;
        const float* Vp = V + ((b * p.Hkv + hk) * p.Lk + k0) * D;
        probabilities_and_score_grads(p, Q + row0 * D, dO + row0 * D, Kp, Vp, LSE, DELTA, row0, rows, cols, ld,
                                      P, dS, [&](float* scores) {
          for (int64_t tile = s; tile < e; ++tile) {
            const TileRule rule = p.rule(qb, blocks[tile], mid ? mid[list * maxK + tile] : -1);
            if (rule.full()) continue;
            for (int64_t i = 0; i < rows; ++i) rule.apply(scores + i * ld + (tile - s) * p.block_k, i);
          }
        });
        gemm('N', 'N', D, rows, cols, p.scale, Kp, D, dS, ld, 1.0f, dQacc, D);  // dQ += scale dS K
      }
      std::copy(dQacc, dQacc + rows * D, dQ + row0 * D);
    });
  }
}

}  // namespace blockattn_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace blockattn_cpu;
  m.def("forward", &forward, "block-sparse attention forward (float32)");
  m.def("backward", &backward, "block-sparse attention backward (float32)");
  m.def("forward_bf16", &forward_bf16, "block-sparse attention forward, bf16 inputs on AVX512-BF16");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether the CPU has AVX512-BF16 (and AVX-512)");
  m.def("isa", &isa, "forward implementation in use: 'avx512' or 'avx2'");
  m.def("set_isa", &set_isa, "force the forward implementation ('avx2', or 'avx512' where supported)");
}
