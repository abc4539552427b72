// AVX-512 micro-kernels of the CPU kernel, forward and backward, selected at run time on CPUs that have
// AVX-512 F/BW/VL/DQ (kernel.cpp keeps the AVX2 + MKL path for the others). The backward's two passes
// (dQ per query block, dK/dV per key block) reuse the forward's two products; see their comments below. Compiled for AVX-512 through target pragmas,
// so the module itself stays buildable and loadable on AVX2-only CPUs.
//
// Layout of the work: one work item is a (batch, head, query block); its queries are processed in
// chunks of up to 64 (four 16-float vectors), transposed so that every per-query quantity (running
// max, running sum, correction) is a vector and no horizontal reductions are needed:
//   Qt[d][i]  = Q[i][d] * scale * log2(e)       (packed once per item; exp2 replaces exp)
//   St[j][i]  = sum_d K[j][d] Qt[d][i]           (scores of one key tile, keys as rows)
//   Pt[j][i]  = exp2(St[j][i] - m[i])            (online softmax, in place)
//   Ot[d][i]  = Ot[d][i] * corr[i] + sum_j V[j][d] Pt[j][i]   (the correction is fused into the GEMM)
// Both GEMMs are register-blocked micro-kernels with broadcast operands taken straight from K and V, so
// scattered key tiles need no gathering and no BLAS call is made; the next listed tile's K and V are
// prefetched while the current one is computed (worth ~25% on a 10%-random layout at L=16384).
//
// bfloat16 inputs (CPUs with AVX512-BF16) run the same loop with both products on vdpbf16ps, which
// multiplies pairs of bf16 and accumulates in fp32: Q is packed as pairs along d, K is read in place
// (its rows hold the pairs), V comes packed once per call as pairs along keys ([Lk/2][D][2], VNNI order),
// and the probabilities are rounded to bf16 pairs along keys before PV, as torch's CPU flash attention
// does. Scores, softmax statistics and the output accumulator stay fp32.
#pragma once

#include "common.h"

#include <cstring>
#include <type_traits>

#pragma GCC push_options
// avx512bf16 is enabled for the whole file so the bf16 tile functions inline into the shared chunk loop;
// only those functions use its intrinsics, and they run only where the CPU reports AVX512-BF16.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#pragma GCC diagnostic push
// GCC 12 warns inside its own AVX-512 intrinsics (their _mm512_undefined_ps pass-through operands)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace blockattn_cpu {
namespace avx512 {

constexpr int kLanes = 16;
constexpr int kChunk = 64;  // queries per chunk: ld of Qt, St and Ot

// 2^x for 16 floats: x = n + f, |f| <= 1/2, 2^f by a degree-5 polynomial fitted for minimal relative
// error on [-1/2, 1/2] (7.7e-8, ~2e-7 after float rounding), 2^n by vscalefps. Inputs below -125
// (including -inf, i.e. masked scores, whose NaN intermediates are discarded) give exactly 0, so no
// subnormal ever reaches the GEMMs.
inline __m512 exp2_16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3266991591081023e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675459936261177e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550742521882057e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022121727466583e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// The one micro-kernel behind both products: acc[r][:] += sum_{k < n} A[r * row_step + k * k_step] * B[k][:]
// for R rows, B holding rows of kChunk floats (16 NV lanes used): a broadcast of A times NV vectors of B
// per step. QK^T reads A = K along its rows (k_step 1), PV reads A = V down its columns (row_step 1).
template <int R, int NV>
inline void rank1_steps(const float* __restrict A, int64_t row_step, int64_t k_step, const float* __restrict B,
                        int64_t n, __m512 (&acc)[R][NV]) {
  for (int64_t k = 0; k < n; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = _mm512_loadu_ps(B + k * kChunk + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * row_step + k * k_step]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
}

template <int R, int NV>
inline void zero_rows(__m512 (&acc)[R][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
}

// acc[r][:] = rows[r][:] * corr: the output accumulator rescaled by the online-softmax correction.
template <int R, int NV>
inline void load_scaled_rows(const float* __restrict rows, const __m512* corr, __m512 (&acc)[R][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(rows + r * kChunk + c * kLanes), corr[c]);
}

template <int R, int NV>
inline void store_rows(const __m512 (&acc)[R][NV], float* __restrict out) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + r * kChunk + c * kLanes, acc[r][c]);
}

// St[r][0:16 NV] = sum_d K[r][d] Qt[d][0:16 NV] for R key rows.
template <int R, int NV>
inline void qk_rows(const float* __restrict K, int64_t D, const float* __restrict Qt, float* __restrict St) {
  __m512 acc[R][NV];
  zero_rows<R, NV>(acc);
  rank1_steps<R, NV>(K, D, 1, Qt, D, acc);
  store_rows<R, NV>(acc, St);
}

// Ot[r][:] = Ot[r][:] * corr + sum_{j < cols} V[j][r] Pt[j][:] for R rows of Ot (V already offset to d0).
template <int R, int NV>
inline void pv_rows(const float* __restrict V, int64_t D, const float* __restrict Pt, int64_t cols,
                    const __m512* corr, float* __restrict Ot) {
  __m512 acc[R][NV];
  load_scaled_rows<R, NV>(Ot, corr, acc);
  rank1_steps<R, NV>(V, 1, D, Pt, cols, acc);
  store_rows<R, NV>(acc, Ot);
}

// Micro-tiles of 4 rows x 4 vectors (16 accumulators): measured on Zen 5 against 6x4, 5x4, 7x4 and 4x2
// without a clear winner (4x4 best or tied, and 64 = 16 x 4 leaves no remainder).
constexpr int kQkRows = 4;  // key rows per QK^T micro-tile
constexpr int kPvRows = 4;  // head-dim rows per PV micro-tile

// Prefetches part `i` of `n` of [p, p + bytes) into L1: spread over the micro-kernel calls of one tile,
// the next tile's K and V arrive while this one is computed without a burst of prefetches that would stall.
inline void prefetch_part(const void* p, int64_t bytes, int64_t i, int64_t n) {
  if (!p) return;
  const int64_t lines = (bytes + 63) / 64, begin = lines * i / n, end = lines * (i + 1) / n;
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t line = begin; line < end; ++line) _mm_prefetch(c + line * 64, _MM_HINT_T0);
}

template <int NV>
void qk_tile_f32(const float* K, int64_t D, const float* Qt, float* St, int64_t cols, const float* next,
                 int64_t next_bytes) {
  const int64_t calls = (cols + kQkRows - 1) / kQkRows;
  int64_t j = 0;
  for (; j + kQkRows <= cols; j += kQkRows) {
    prefetch_part(next, next_bytes, j / kQkRows, calls);
    qk_rows<kQkRows, NV>(K + j * D, D, Qt, St + j * kChunk);
  }
  if (j < cols) prefetch_part(next, next_bytes, calls - 1, calls);
  switch (cols - j) {
    case 3: qk_rows<3, NV>(K + j * D, D, Qt, St + j * kChunk); break;
    case 2: qk_rows<2, NV>(K + j * D, D, Qt, St + j * kChunk); break;
    case 1: qk_rows<1, NV>(K + j * D, D, Qt, St + j * kChunk); break;
    default: break;
  }
}

template <int NV>
void pv_tile_f32(const float* V, int64_t D, const float* Pt, int64_t cols, const __m512* corr, float* Ot,
                 const float* next, int64_t next_bytes) {
  const int64_t calls = (D + kPvRows - 1) / kPvRows;
  int64_t d = 0;
  for (; d + kPvRows <= D; d += kPvRows) {
    prefetch_part(next, next_bytes, d / kPvRows, calls);
    pv_rows<kPvRows, NV>(V + d, D, Pt, cols, corr, Ot + d * kChunk);
  }
  if (d < D) prefetch_part(next, next_bytes, calls - 1, calls);
  switch (D - d) {
    case 3: pv_rows<3, NV>(V + d, D, Pt, cols, corr, Ot + d * kChunk); break;
    case 2: pv_rows<2, NV>(V + d, D, Pt, cols, corr, Ot + d * kChunk); break;
    case 1: pv_rows<1, NV>(V + d, D, Pt, cols, corr, Ot + d * kChunk); break;
    default: break;
  }
}

// Sets disallowed scores of one tile to -inf. St is [cols][kChunk]; queries c0 .. c0 + n of the tile's
// query block are the chunk's columns (the rest of the chunk is padding and left alone).
template <int NV>
void mask_tile(const TileRule& rule, int64_t c0, int64_t n, float* St, int32_t* lo, int32_t* hi) {
  for (int64_t i = 0; i < NV * kLanes; ++i) {
    int64_t a = 0, b = rule.cols - 1;
    if (i < n) rule.interval(c0 + i, a, b);
    lo[i] = static_cast<int32_t>(std::max<int64_t>(a, -1));
    hi[i] = static_cast<int32_t>(std::min<int64_t>(b, rule.cols));
  }
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < rule.cols; ++j) {
    const __m512i jv = _mm512_set1_epi32(static_cast<int32_t>(j));
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      const __m512i l = _mm512_loadu_si512(lo + c * kLanes), h = _mm512_loadu_si512(hi + c * kLanes);
      const __mmask16 out = _mm512_cmpgt_epi32_mask(l, jv) | _mm512_cmplt_epi32_mask(h, jv);
      float* s = St + j * kChunk + c * kLanes;
      _mm512_storeu_ps(s, _mm512_mask_mov_ps(_mm512_loadu_ps(s), out, neg_inf));
    }
  }
  if (rule.explicit_mask) {
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* bits = rule.explicit_mask + (c0 + i) * rule.block_k;
      for (int64_t j = 0; j < rule.cols; ++j)
        if (!bits[j]) St[j * kChunk + i] = kNegInf;
    }
  }
}

struct Workspace {
  std::vector<float> storage;
  float *Qt, *Ot, *St, *m, *l;
  int32_t *lo, *hi;
  uint16_t* Pt;  // bf16 path: probabilities as key pairs [ceil(block_k / 2)][kChunk][2]
  float *dOt, *dPt;  // backward: dO (or V) transposed [D][kChunk], dP of one tile [rows][kChunk]
  float* Xt;         // dK/dV pass: dK transposed [D][kChunk]

  // `block_k`: the most rows a tile's score buffers hold (the forward's key block; the dK/dV pass's
  // query block, where queries are the rows).
  void reserve(int64_t D, int64_t block_k) {
    const int64_t need = 4 * D * kChunk + 2 * block_k * kChunk + 4 * kChunk + 16 + (block_k + 1) * kChunk / 2 + 32;
    if (static_cast<int64_t>(storage.size()) < need) storage.resize(need);
    float* base = storage.data();
    base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;  // 64-byte aligned
    Qt = base;
    Ot = Qt + D * kChunk;
    St = Ot + D * kChunk;
    m = St + block_k * kChunk;
    l = m + kChunk;
    lo = reinterpret_cast<int32_t*>(l + kChunk);
    hi = lo + kChunk;
    Pt = reinterpret_cast<uint16_t*>(hi + kChunk + 16);  // 64-byte aligned: kChunk and 16 are multiples of 16
    dOt = reinterpret_cast<float*>(hi + kChunk + 16) + ((block_k + 1) * kChunk / 2 + 15) / 16 * 16;
    dPt = dOt + D * kChunk;
    Xt = dPt + block_k * kChunk;
  }
};

// ---- fp32 tiles: Q pre-scaled and transposed, both products by rank-1 steps

// out[d][i] = X[i][d] * scale for the chunk's n rows, zero-padded to NV vectors.
template <int NV>
inline void pack_transposed(const float* X, int64_t D, int64_t n, float scale, float* out) {
  for (int64_t d = 0; d < D; ++d) {
    float* row = out + d * kChunk;
    for (int64_t i = 0; i < n; ++i) row[i] = X[i * D + d] * scale;
    for (int64_t i = n; i < NV * kLanes; ++i) row[i] = 0.0f;
  }
}

template <int NV>
inline void pack_q(const float* Qp, int64_t D, int64_t n, float qscale, Workspace& w) {
  pack_transposed<NV>(Qp, D, n, qscale, w.Qt);
}

template <int NV>
void qk_tile(const float* K, int64_t D, const Workspace& w, float* St, int64_t cols, float /*qscale: in Qt*/,
             const float* next, int64_t next_bytes) {
  qk_tile_f32<NV>(K, D, w.Qt, St, cols, next, next_bytes);
}

template <int NV>
void pv_tile(const float* V, int64_t D, const float* Pt, int64_t cols, const __m512* corr, Workspace& w,
             const float* next, int64_t next_bytes) {
  pv_tile_f32<NV>(V, D, Pt, cols, corr, w.Ot, next, next_bytes);
}

// ---- bf16 tiles (raw bf16 bits as uint16_t): vdpbf16ps on pairs, fp32 accumulation

inline __m512i bcast_pair(const uint16_t* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_set1_epi32(bits);
}

// Qt2[pair][i][2] = (Q[i][2 pair], Q[i][2 pair + 1]), unscaled (the scale is applied to the fp32 scores,
// so Q is not rounded a second time).
template <int NV>
inline void pack_q(const uint16_t* Qp, int64_t D, int64_t n, float /*qscale*/, Workspace& w) {
  uint16_t* Qt2 = reinterpret_cast<uint16_t*>(w.Qt);
  for (int64_t pair = 0; pair < D / 2; ++pair) {
    uint16_t* row = Qt2 + pair * kChunk * 2;
    for (int64_t i = 0; i < n; ++i) {
      row[2 * i] = Qp[i * D + 2 * pair];
      row[2 * i + 1] = Qp[i * D + 2 * pair + 1];
    }
    for (int64_t i = n; i < NV * kLanes; ++i) row[2 * i] = row[2 * i + 1] = 0;
  }
}

// The bf16 counterpart of rank1_steps: acc[r][:] += sum_{pairs p < n} A-pair(r, p) . B[p][:] by vdpbf16ps,
// B holding rows of kChunk bf16 pairs; the A pair of (r, p) starts at A[r * row_step + p * pair_step].
template <int R, int NV>
inline void pair_steps(const uint16_t* __restrict A, int64_t row_step, int64_t pair_step,
                       const uint16_t* __restrict B, int64_t n, __m512 (&acc)[R][NV]) {
  for (int64_t pair = 0; pair < n; ++pair) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + pair * kChunk * 2 + c * 2 * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)bcast_pair(A + r * row_step + pair * pair_step);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
}

template <int R, int NV>
inline void qk_rows_bf16(const uint16_t* __restrict K, int64_t D, const uint16_t* __restrict Qt2, float qscale,
                         float* __restrict St) {
  __m512 acc[R][NV];
  zero_rows<R, NV>(acc);
  pair_steps<R, NV>(K, D, 2, Qt2, D / 2, acc);
  const __m512 s = _mm512_set1_ps(qscale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(acc[r][c], s);
  store_rows<R, NV>(acc, St);
}

template <int NV>
void qk_tile(const uint16_t* K, int64_t D, const Workspace& w, float* St, int64_t cols, float qscale,
             const uint16_t* next, int64_t next_bytes) {
  const uint16_t* Qt2 = reinterpret_cast<const uint16_t*>(w.Qt);
  const int64_t calls = (cols + kQkRows - 1) / kQkRows;
  int64_t j = 0;
  for (; j + kQkRows <= cols; j += kQkRows) {
    prefetch_part(next, next_bytes, j / kQkRows, calls);
    qk_rows_bf16<kQkRows, NV>(K + j * D, D, Qt2, qscale, St + j * kChunk);
  }
  if (j < cols) prefetch_part(next, next_bytes, calls - 1, calls);
  switch (cols - j) {
    case 3: qk_rows_bf16<3, NV>(K + j * D, D, Qt2, qscale, St + j * kChunk); break;
    case 2: qk_rows_bf16<2, NV>(K + j * D, D, Qt2, qscale, St + j * kChunk); break;
    case 1: qk_rows_bf16<1, NV>(K + j * D, D, Qt2, qscale, St + j * kChunk); break;
    default: break;
  }
}

// Pt2[pair][i][2] = bf16(P[2 pair][i], P[2 pair + 1][i]); an odd last key pairs with 0.
template <int NV>
inline void pack_p(const float* St, int64_t cols, uint16_t* Pt2) {
  // cvtne2ps gives [lo 0..15 | hi 0..15]; this permutation interleaves them into (lo i, hi i) pairs
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(kInterleave);
  for (int64_t pair = 0; pair < (cols + 1) / 2; ++pair) {
    const float* lo = St + 2 * pair * kChunk;
    const bool has_hi = 2 * pair + 1 < cols;
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      const __m512 l = _mm512_loadu_ps(lo + c * kLanes);
      const __m512 h = has_hi ? _mm512_loadu_ps(lo + kChunk + c * kLanes) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(h, l);
      _mm512_storeu_si512(Pt2 + pair * kChunk * 2 + c * 2 * kLanes, _mm512_permutexvar_epi16(order, both));
    }
  }
}

template <int R, int NV>
inline void pv_rows_bf16(const uint16_t* __restrict Vv, int64_t D, const uint16_t* __restrict Pt2, int64_t pairs,
                         const __m512* corr, float* __restrict Ot) {
  __m512 acc[R][NV];
  load_scaled_rows<R, NV>(Ot, corr, acc);
  pair_steps<R, NV>(Vv, 2, 2 * D, Pt2, pairs, acc);
  store_rows<R, NV>(acc, Ot);
}

// Vv: this tile's values as key pairs [pairs][D][2]. Pt (fp32 probabilities) is first rounded to pairs.
template <int NV>
void pv_tile(const uint16_t* Vv, int64_t D, const float* Pt, int64_t cols, const __m512* corr, Workspace& w,
             const uint16_t* next, int64_t next_bytes) {
  pack_p<NV>(Pt, cols, w.Pt);
  const int64_t pairs = (cols + 1) / 2, calls = (D + kPvRows - 1) / kPvRows;
  int64_t d = 0;
  for (; d + kPvRows <= D; d += kPvRows) {
    prefetch_part(next, next_bytes, d / kPvRows, calls);
    pv_rows_bf16<kPvRows, NV>(Vv + 2 * d, D, w.Pt, pairs, corr, w.Ot + d * kChunk);
  }
  if (d < D) prefetch_part(next, next_bytes, calls - 1, calls);
  switch (D - d) {
    case 3: pv_rows_bf16<3, NV>(Vv + 2 * d, D, w.Pt, pairs, corr, w.Ot + d * kChunk); break;
    case 2: pv_rows_bf16<2, NV>(Vv + 2 * d, D, w.Pt, pairs, corr, w.Ot + d * kChunk); break;
    case 1: pv_rows_bf16<1, NV>(Vv + 2 * d, D, w.Pt, pairs, corr, w.Ot + d * kChunk); break;
    default: break;
  }
}

// One chunk of n <= NV*16 queries (rows q0 + c0 ...) of work item (b, h, qb) against its listed key tiles.
template <int NV, typename T>
void chunk_forward(const Problem& p, const T* Qp, const T* Kh, const T* Vh, const int32_t* blocks,
                   const int32_t* mask_ids, int64_t count, int64_t qb, int64_t c0, int64_t n, Workspace& w,
                   float* Op, float* Lp) {
  const int64_t D = p.D;
  const float qscale = p.scale * 1.4426950408889634f;  // scores in log2 units: exp2 instead of exp
  pack_q<NV>(Qp + c0 * D, D, n, qscale, w);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf), zero = _mm512_setzero_ps();
  __m512 m[NV], l[NV];
  for (int c = 0; c < NV; ++c) {
    m[c] = neg_inf;
    l[c] = zero;
  }
  for (int64_t d = 0; d < D; ++d)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(w.Ot + d * kChunk + c * kLanes, zero);

  for (int64_t t = 0; t < count; ++t) {
    const int64_t kb = blocks[t], k0 = kb * p.block_k;
    const int64_t cols = std::min(p.block_k, p.Lk - k0);
    const T* Kp = Kh + k0 * D;
    const T* Vp = Vh + k0 * D;  // bf16: V in key pairs, and k0 even, so the pair block starts at k0 * D too
    float* St = w.St;
    const T *Kn = nullptr, *Vn = nullptr;
    int64_t next_bytes = 0;
    if (t + 1 < count) {  // the next tile's K and V are prefetched while this one is computed
      const int64_t nk0 = blocks[t + 1] * p.block_k;
      Kn = Kh + nk0 * D;
      Vn = Vh + nk0 * D;
      next_bytes = std::min(p.block_k, p.Lk - nk0) * D * static_cast<int64_t>(sizeof(T));
    }
    qk_tile<NV>(Kp, D, w, St, cols, qscale, Kn, next_bytes);
    const TileRule rule = p.rule(qb, kb, mask_ids ? mask_ids[t] : -1);
    if (!rule.full()) mask_tile<NV>(rule, c0, n, St, w.lo, w.hi);
    __m512 mx[NV];
    for (int c = 0; c < NV; ++c) mx[c] = m[c];
    for (int64_t j = 0; j < cols; ++j)
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) mx[c] = _mm512_max_ps(mx[c], _mm512_loadu_ps(St + j * kChunk + c * kLanes));
    __m512 shift[NV], corr[NV], sum[NV];
    for (int c = 0; c < NV; ++c) {
      // rows with nothing allowed yet keep max -inf: shift by 0 so that exp2(-inf - 0) = 0, not NaN
      const __mmask16 empty = _mm512_cmp_ps_mask(mx[c], neg_inf, _CMP_EQ_OQ);
      shift[c] = _mm512_mask_mov_ps(mx[c], empty, zero);
      corr[c] = exp2_16(_mm512_sub_ps(m[c], shift[c]));
      m[c] = mx[c];
      sum[c] = zero;
    }
    for (int64_t j = 0; j < cols; ++j) {
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        float* s = St + j * kChunk + c * kLanes;
        const __m512 e = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(s), shift[c]));
        _mm512_storeu_ps(s, e);
        sum[c] = _mm512_add_ps(sum[c], e);
      }
    }
    for (int c = 0; c < NV; ++c) l[c] = _mm512_fmadd_ps(l[c], corr[c], sum[c]);
    pv_tile<NV>(Vp, D, St, cols, corr, w, Vn, next_bytes);
  }

  for (int c = 0; c < NV; ++c) {
    _mm512_storeu_ps(w.m + c * kLanes, m[c]);
    _mm512_storeu_ps(w.l + c * kLanes, l[c]);
  }
  constexpr float kLn2 = 0.6931471805599453f;
  for (int64_t i = 0; i < n; ++i) {
    float* o = Op + (c0 + i) * D;
    const float li = w.l[i];
    if (li > 0.0f) {
      const float inv = 1.0f / li;
      for (int64_t d = 0; d < D; ++d) o[d] = w.Ot[d * kChunk + i] * inv;
      Lp[c0 + i] = w.m[i] * kLn2 + std::log(li);
    } else {  // the layout gives this row no key: zero output, lse = -inf
      std::fill(o, o + D, 0.0f);
      Lp[c0 + i] = kNegInf;
    }
  }
}

// V is the values as given for float, and packed as key pairs ([B, Hkv, Lk/2, D, 2]) for bf16.
template <typename T>
__attribute__((noinline)) void forward_item(const Problem& p, const T* Q, const T* K, const T* V,
                                            const int32_t* cnt, const int32_t* idx, const int32_t* mid, int64_t maxK,
                                            int64_t it, Workspace& w, float* O, float* LSE) {
  const int64_t qb = it % p.nQ, h = (it / p.nQ) % p.Hq, b = it / (p.nQ * p.Hq);
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t q0 = qb * p.block_q, rows = std::min(p.block_q, p.Lq - q0);
  // bf16's packed V has an even number of key rows per head
  const int64_t v_rows = std::is_same<T, float>::value ? p.Lk : (p.Lk + 1) / 2 * 2;
  const T* Qp = Q + ((b * p.Hq + h) * p.Lq + q0) * p.D;
  const T* Kh = K + (b * p.Hkv + hk) * p.Lk * p.D;
  const T* Vh = V + (b * p.Hkv + hk) * v_rows * p.D;
  float* Op = O + ((b * p.Hq + h) * p.Lq + q0) * p.D;
  float* Lp = LSE + (b * p.Hq + h) * p.Lq + q0;
  const int64_t list = (p.lb(b) * p.layout_h + p.lh(h)) * p.nQ + qb;
  const int32_t* blocks = idx + list * maxK;
  const int32_t* mask_ids = mid ? mid + list * maxK : nullptr;
  w.reserve(p.D, p.block_k);
  for (int64_t c0 = 0; c0 < rows; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, rows - c0);
    switch ((n + kLanes - 1) / kLanes) {
      case 1: chunk_forward<1>(p, Qp, Kh, Vh, blocks, mask_ids, cnt[list], qb, c0, n, w, Op, Lp); break;
      case 2: chunk_forward<2>(p, Qp, Kh, Vh, blocks, mask_ids, cnt[list], qb, c0, n, w, Op, Lp); break;
      case 3: chunk_forward<3>(p, Qp, Kh, Vh, blocks, mask_ids, cnt[list], qb, c0, n, w, Op, Lp); break;
      default: chunk_forward<4>(p, Qp, Kh, Vh, blocks, mask_ids, cnt[list], qb, c0, n, w, Op, Lp); break;
    }
  }
}

// ---- backward, dQ pass (fp32): one owner per query row, the forward's chunk layout and micro-kernels.
//   St = K Qt (log2 units), P = exp2(St - lse log2 e), dPt = V dOt, dSt = P (dPt - delta),
//   dQt[d][i] += sum_j K[j][d] dSt[j][i] (the PV micro-kernel with K for V and no rescale), dQ = scale dQt^T.
template <int NV>
void chunk_dq(const Problem& p, const float* Qp, const float* dOp, const float* Kh, const float* Vh,
              const float* lse, const float* delta, const int32_t* blocks, const int32_t* mask_ids, int64_t count,
              int64_t qb, int64_t c0, int64_t n, Workspace& w, float* dQp) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t D = p.D;
  pack_transposed<NV>(Qp + c0 * D, D, n, p.scale * kLog2e, w.Qt);
  pack_transposed<NV>(dOp + c0 * D, D, n, 1.0f, w.dOt);
  __m512 shift[NV], dlt[NV], one[NV];
  for (int c = 0; c < NV; ++c) {
    alignas(64) float s[kLanes], d[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const int64_t row = c * kLanes + i;
      // rows with no key (lse = -inf) and padding lanes: shift by +inf so that every P is exp2(-inf) = 0
      s[i] = row < n && lse[c0 + row] != kNegInf ? lse[c0 + row] * kLog2e : -kNegInf;
      d[i] = row < n ? delta[c0 + row] : 0.0f;
    }
    shift[c] = _mm512_load_ps(s);
    dlt[c] = _mm512_load_ps(d);
    one[c] = _mm512_set1_ps(1.0f);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(w.Ot + d * kChunk + c * kLanes, _mm512_setzero_ps());
  for (int64_t t = 0; t < count; ++t) {
    const int64_t kb = blocks[t], k0 = kb * p.block_k, cols = std::min(p.block_k, p.Lk - k0);
    const float* Kp = Kh + k0 * D;
    const float* Vp = Vh + k0 * D;
    qk_tile_f32<NV>(Kp, D, w.Qt, w.St, cols, nullptr, 0);
    const TileRule rule = p.rule(qb, kb, mask_ids ? mask_ids[t] : -1);
    if (!rule.full()) mask_tile<NV>(rule, c0, n, w.St, w.lo, w.hi);
    qk_tile_f32<NV>(Vp, D, w.dOt, w.dPt, cols, nullptr, 0);
    for (int64_t j = 0; j < cols; ++j) {
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        float* s = w.St + j * kChunk + c * kLanes;
        const __m512 prob = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(s), shift[c]));
        const __m512 dp = _mm512_loadu_ps(w.dPt + j * kChunk + c * kLanes);
        _mm512_storeu_ps(s, _mm512_mul_ps(prob, _mm512_sub_ps(dp, dlt[c])));
      }
    }
    pv_tile_f32<NV>(Kp, D, w.St, cols, one, w.Ot, nullptr, 0);
  }
  for (int64_t i = 0; i < n; ++i) {
    float* out = dQp + (c0 + i) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = w.Ot[d * kChunk + i] * p.scale;
  }
}

// dQ of work item (b, h, qb) over its forward list: dq, q, dout [B,Hq,Lq,D], lse, delta [B,Hq,Lq].
__attribute__((noinline)) inline void dq_item(const Problem& p, const float* Q, const float* dO, const float* K,
                                              const float* V, const float* LSE, const float* DELTA,
                                              const int32_t* cnt, const int32_t* idx, const int32_t* mid,
                                              int64_t maxK, int64_t it, Workspace& w, float* dQ) {
  const int64_t qb = it % p.nQ, h = (it / p.nQ) % p.Hq, b = it / (p.nQ * p.Hq);
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t q0 = qb * p.block_q, rows = std::min(p.block_q, p.Lq - q0);
  const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
  const float* Kh = K + (b * p.Hkv + hk) * p.Lk * p.D;
  const float* Vh = V + (b * p.Hkv + hk) * p.Lk * p.D;
  const int64_t list = (p.lb(b) * p.layout_h + p.lh(h)) * p.nQ + qb;
  const int32_t* blocks = idx + list * maxK;
  const int32_t* mask_ids = mid ? mid + list * maxK : nullptr;
  w.reserve(p.D, p.block_k);
  const float *Qp = Q + row0 * p.D, *dOp = dO + row0 * p.D, *lse = LSE + row0, *delta = DELTA + row0;
  float* dQp = dQ + row0 * p.D;
  for (int64_t c0 = 0; c0 < rows; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, rows - c0), count = cnt[list];
    switch ((n + kLanes - 1) / kLanes) {
      case 1: chunk_dq<1>(p, Qp, dOp, Kh, Vh, lse, delta, blocks, mask_ids, count, qb, c0, n, w, dQp); break;
      case 2: chunk_dq<2>(p, Qp, dOp, Kh, Vh, lse, delta, blocks, mask_ids, count, qb, c0, n, w, dQp); break;
      case 3: chunk_dq<3>(p, Qp, dOp, Kh, Vh, lse, delta, blocks, mask_ids, count, qb, c0, n, w, dQp); break;
      default: chunk_dq<4>(p, Qp, dOp, Kh, Vh, lse, delta, blocks, mask_ids, count, qb, c0, n, w, dQp); break;
    }
  }
}

// ---- backward, dK/dV pass (fp32): one owner per key row. The same products with the roles of queries
// and keys swapped: the lanes are up to 64 keys of one key block, the rows its listed queries.
//   Kt[d][j] = K[j][d] scale log2 e, Vt[d][j] = V[j][d]            (packed once per key chunk)
//   S[i][j] = sum_d Q[i][d] Kt[d][j], dP[i][j] = sum_d dO[i][d] Vt[d][j]      (the QK^T micro-kernel)
//   P = exp2(S - lse_i log2 e), dS = P (dP - delta_i)
//   dVt[d][j] += sum_i dO[i][d] P[i][j], dKt[d][j] += sum_i Q[i][d] dS[i][j]  (the PV micro-kernel)
// Lanes past the chunk's keys hold garbage that is never written out.
template <int NV>
void chunk_dkdv(const Problem& p, const float* Kc, const float* Vc, int64_t kb, int64_t c0, int64_t n, int64_t b,
                int64_t hk, const float* Q, const float* dO, const float* LSE, const float* DELTA, const int32_t* cnt,
                const int32_t* idx, const int32_t* mid, int64_t maxQ, Workspace& w, float* dKc, float* dVc) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t D = p.D, group = p.Hq / p.Hkv;
  pack_transposed<NV>(Kc, D, n, p.scale * kLog2e, w.Qt);
  pack_transposed<NV>(Vc, D, n, 1.0f, w.dOt);
  const __m512 zero = _mm512_setzero_ps(), neg_inf = _mm512_set1_ps(kNegInf);
  __m512 one[NV], lane_key[NV];
  for (int c = 0; c < NV; ++c) {
    one[c] = _mm512_set1_ps(1.0f);
    alignas(64) float keys[kLanes];
    for (int i = 0; i < kLanes; ++i) keys[i] = static_cast<float>(c0 + c * kLanes + i);
    lane_key[c] = _mm512_load_ps(keys);  // key column of each lane within the tile
  }
  for (int64_t d = 0; d < D; ++d)
    for (int c = 0; c < NV; ++c) {
      _mm512_storeu_ps(w.Ot + d * kChunk + c * kLanes, zero);
      _mm512_storeu_ps(w.Xt + d * kChunk + c * kLanes, zero);
    }
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t list = (p.lb(b) * p.layout_h + p.lh(h)) * p.nK + kb;
    const int32_t* blocks = idx + list * maxQ;
    for (int64_t t = 0; t < cnt[list]; ++t) {
      const int64_t qb = blocks[t], q0 = qb * p.block_q, rows = std::min(p.block_q, p.Lq - q0);
      const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
      const float* Qp = Q + row0 * D;
      const float* dOp = dO + row0 * D;
      qk_tile_f32<NV>(Qp, D, w.Qt, w.St, rows, nullptr, 0);
      qk_tile_f32<NV>(dOp, D, w.dOt, w.dPt, rows, nullptr, 0);
      const TileRule rule = p.rule(qb, kb, mid ? mid[list * maxQ + t] : -1);
      const bool full = rule.full();
      for (int64_t i = 0; i < rows; ++i) {
        const float row_lse = LSE[row0 + i];
        float* srow = w.St + i * kChunk;
        float* drow = w.dPt + i * kChunk;
        if (row_lse == kNegInf) {  // the row attends to nothing: no probability, no gradient
          for (int c = 0; c < NV; ++c) {
            _mm512_storeu_ps(srow + c * kLanes, zero);
            _mm512_storeu_ps(drow + c * kLanes, zero);
          }
          continue;
        }
        const __m512 shift = _mm512_set1_ps(row_lse * kLog2e), dlt = _mm512_set1_ps(DELTA[row0 + i]);
        __m512 lo = _mm512_set1_ps(0.0f), hi = _mm512_set1_ps(static_cast<float>(rule.cols - 1));
        if (!full) {
          int64_t a, z;
          rule.interval(i, a, z);
          lo = _mm512_set1_ps(static_cast<float>(a));
          hi = _mm512_set1_ps(static_cast<float>(z));
        }
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) {
          __m512 sc = _mm512_loadu_ps(srow + c * kLanes);
          if (!full) {
            const __mmask16 out = _mm512_cmp_ps_mask(lane_key[c], lo, _CMP_LT_OQ) |
                                  _mm512_cmp_ps_mask(lane_key[c], hi, _CMP_GT_OQ);
            sc = _mm512_mask_mov_ps(sc, out, neg_inf);
          }
          const __m512 prob = exp2_16(_mm512_sub_ps(sc, shift));
          _mm512_storeu_ps(srow + c * kLanes, prob);
          const __m512 dp = _mm512_loadu_ps(drow + c * kLanes);
          _mm512_storeu_ps(drow + c * kLanes, _mm512_mul_ps(prob, _mm512_sub_ps(dp, dlt)));
        }
        if (rule.explicit_mask) {
          const uint8_t* bits = rule.explicit_mask + i * rule.block_k + c0;
          for (int64_t j = 0; j < n; ++j)
            if (!bits[j]) srow[j] = drow[j] = 0.0f;
        }
      }
      pv_tile_f32<NV>(dOp, D, w.St, rows, one, w.Ot, nullptr, 0);   // dVt += dO^T P
      pv_tile_f32<NV>(Qp, D, w.dPt, rows, one, w.Xt, nullptr, 0);   // dKt += Q^T dS
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < D; ++d) {
      dKc[j * D + d] = w.Xt[d * kChunk + j] * p.scale;
      dVc[j * D + d] = w.Ot[d * kChunk + j];
    }
  }
}

// dK and dV of work item (b, kv head, key block) over the transposed lists (q_counts, q_indices, q_mask_ids).
__attribute__((noinline)) inline void dkdv_item(const Problem& p, const float* Q, const float* dO, const float* K,
                                                const float* V, const float* LSE, const float* DELTA,
                                                const int32_t* cnt, const int32_t* idx, const int32_t* mid,
                                                int64_t maxQ, int64_t it, Workspace& w, float* dK, float* dV) {
  const int64_t kb = it % p.nK, hk = (it / p.nK) % p.Hkv, b = it / (p.nK * p.Hkv);
  const int64_t k0 = kb * p.block_k, cols = std::min(p.block_k, p.Lk - k0);
  const int64_t base = ((b * p.Hkv + hk) * p.Lk + k0) * p.D;
  w.reserve(p.D, std::max(p.block_q, p.block_k));
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, cols - c0), at = base + c0 * p.D;
    switch ((n + kLanes - 1) / kLanes) {
      case 1: chunk_dkdv<1>(p, K + at, V + at, kb, c0, n, b, hk, Q, dO, LSE, DELTA, cnt, idx, mid, maxQ, w, dK + at, dV + at); break;
      case 2: chunk_dkdv<2>(p, K + at, V + at, kb, c0, n, b, hk, Q, dO, LSE, DELTA, cnt, idx, mid, maxQ, w, dK + at, dV + at); break;
      case 3: chunk_dkdv<3>(p, K + at, V + at, kb, c0, n, b, hk, Q, dO, LSE, DELTA, cnt, idx, mid, maxQ, w, dK + at, dV + at); break;
      default: chunk_dkdv<4>(p, K + at, V + at, kb, c0, n, b, hk, Q, dO, LSE, DELTA, cnt, idx, mid, maxQ, w, dK + at, dV + at); break;
    }
  }
}

}  // namespace avx512
}  // namespace blockattn_cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options
