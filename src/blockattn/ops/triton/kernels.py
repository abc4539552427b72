"""Triton kernels: forward, and the two backward passes (dK/dV over key blocks, dQ over query blocks).

One program per (query block, batch x head) in forward and dQ, one per (key block, batch x kv head)
in dK/dV; each walks only the blocks its layout list names. Tile = the layout's blocks.
"""
import triton
import triton.language as tl


@triton.jit
def _token_rule(q_pos, k_pos, q_len, k_len, offset, mask_id, tile_masks, BLOCK_Q: tl.constexpr,
                BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, left, right,
                HAS_MASKS: tl.constexpr, WORD: tl.constexpr):
    """bool [BLOCK_Q, BLOCK_K]: which (query, key) pairs of the tile the layout allows."""
    aligned = q_pos[:, None] + offset
    keep = (q_pos[:, None] < q_len) & (k_pos[None, :] < k_len)
    if CAUSAL:
        keep = keep & (k_pos[None, :] <= aligned)
    if WINDOW:
        keep = keep & (k_pos[None, :] >= aligned - left) & (k_pos[None, :] <= aligned + right)
    if HAS_MASKS:
        # tile masks arrive packed, WORD bits per int32 word: a [BLOCK_Q, BLOCK_K] tensor of 64-bit
        # addresses for a bool tile spills registers at 128x128, a [BLOCK_Q, BLOCK_K / WORD] one does not;
        # tiles without an explicit mask (id -1) read tile 0 and ignore it
        WORDS: tl.constexpr = BLOCK_K // WORD
        words = tl.load(tile_masks + tl.maximum(mask_id, 0).to(tl.int64) * (BLOCK_Q * WORDS)
                        + tl.arange(0, BLOCK_Q)[:, None] * WORDS + tl.arange(0, WORDS)[None, :])
        bits = tl.reshape((words[:, :, None] >> tl.arange(0, WORD)[None, None, :]) & 1, (BLOCK_Q, BLOCK_K))
        keep = keep & ((bits != 0) | (mask_id < 0))
    return keep


@triton.jit
def _rows(ptr, rows, pos, length, d, D: tl.constexpr):
    """[BLOCK, BLOCK_D] rows `rows` of a [*, D] tensor; positions past `length` and lanes past D read 0."""
    return tl.load(ptr + rows[:, None] * D + d[None, :], mask=(pos[:, None] < length) & (d[None, :] < D), other=0.0)


@triton.jit
def _list_entry(layout_b, layout_h, b, h, n, block):
    """Index of (b, h, block)'s list in a layout stored over [B|1, H|1, n]."""
    return (tl.where(layout_b > 1, b, 0) * layout_h + tl.where(layout_h > 1, h, 0)) * n + block


@triton.jit
def _listed_tile(indices, mask_ids, list_id, width, t, HAS_MASKS: tl.constexpr):
    """The t-th block a list names, and its explicit tile mask id (-1: none)."""
    block = tl.load(indices + list_id * width + t)
    mask_id = -1
    if HAS_MASKS:
        mask_id = tl.load(mask_ids + list_id * width + t)
    return block, mask_id


@triton.jit
def _query_program(counts, heads_q, heads_kv, layout_b, layout_h, n_q, q_len, BLOCK_Q: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """What a (query block, batch x head) program works on: b, kv head, its list and count, query
    positions, lanes and row offsets."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads_q
    h = bh % heads_q
    hk = h // (heads_q // heads_kv)
    list_id = _list_entry(layout_b, layout_h, b, h, n_q, qb)
    count = tl.load(counts + list_id)
    q_pos = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return b, hk, list_id, count, q_pos, tl.arange(0, BLOCK_D), (bh * q_len + q_pos).to(tl.int64)


@triton.jit
def _probabilities(q, k, lse, q_pos, k_pos, q_len, k_len, offset, scale, mask_id, tile_masks, left, right,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   HAS_MASKS: tl.constexpr, WORD: tl.constexpr, PRECISION: tl.constexpr):
    """Backward: the forward's softmax probabilities of a tile, recomputed from the saved lse."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    keep = _token_rule(q_pos, k_pos, q_len, k_len, offset, mask_id, tile_masks, BLOCK_Q, BLOCK_K, CAUSAL,
                       WINDOW, left, right, HAS_MASKS, WORD)
    keep = keep & (lse[:, None] != float("-inf"))
    return tl.where(keep, tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None]), 0.0)


@triton.jit
def forward_kernel(Q, K, V, Out, Lse, counts, indices, mask_ids, tile_masks,
                   heads_q, heads_kv, layout_b, layout_h, n_q, max_k, q_len, k_len, offset, scale, left, right,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASKS: tl.constexpr, WORD: tl.constexpr,
                   PRECISION: tl.constexpr):
    b, hk, list_id, count, q_pos, d, q_rows = _query_program(counts, heads_q, heads_kv, layout_b, layout_h, n_q,
                                                             q_len, BLOCK_Q, BLOCK_D)
    q = _rows(Q, q_rows, q_pos, q_len, d, D)

    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for t in range(0, count):
        kb, mask_id = _listed_tile(indices, mask_ids, list_id, max_k, t, HAS_MASKS)
        k_pos = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_rows = ((b * heads_kv + hk) * k_len + k_pos).to(tl.int64)
        k = _rows(K, k_rows, k_pos, k_len, d, D)
        v = _rows(V, k_rows, k_pos, k_len, d, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        keep = _token_rule(q_pos, k_pos, q_len, k_len, offset, mask_id, tile_masks, BLOCK_Q, BLOCK_K, CAUSAL,
                           WINDOW, left, right, HAS_MASKS, WORD)
        s = tl.where(keep, s, float("-inf"))
        new_m = tl.maximum(m, tl.max(s, 1))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        p = tl.exp(s - safe_m[:, None])
        correction = tl.exp(m - safe_m)
        l = l * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = new_m
    nonempty = l > 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    tl.store(Out + q_rows[:, None] * D + d[None, :], out.to(Out.dtype.element_ty),
             mask=(q_pos[:, None] < q_len) & (d[None, :] < D))
    tl.store(Lse + q_rows, lse, mask=q_pos < q_len)


@triton.jit
def backward_dkdv_kernel(Q, K, V, dO, Lse, Delta, dK, dV, q_counts, q_indices, q_mask_ids, tile_masks,
                         heads_q, heads_kv, layout_b, layout_h, n_k, max_q, q_len, k_len, offset, scale, left, right,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                         CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASKS: tl.constexpr,
                         WORD: tl.constexpr, PRECISION: tl.constexpr):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // heads_kv
    hk = bhk % heads_kv
    group = heads_q // heads_kv
    k_pos = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    k_rows = (bhk * k_len + k_pos).to(tl.int64)
    in_k = (k_pos[:, None] < k_len) & (d[None, :] < D)
    k = _rows(K, k_rows, k_pos, k_len, d, D)
    v = _rows(V, k_rows, k_pos, k_len, d, D)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for h in range(hk * group, (hk + 1) * group):
        list_id = _list_entry(layout_b, layout_h, b, h, n_k, kb)
        count = tl.load(q_counts + list_id)
        for t in range(0, count):
            qb, mask_id = _listed_tile(q_indices, q_mask_ids, list_id, max_q, t, HAS_MASKS)
            q_pos = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            q_rows = ((b * heads_q + h) * q_len + q_pos).to(tl.int64)
            q = _rows(Q, q_rows, q_pos, q_len, d, D)
            do = _rows(dO, q_rows, q_pos, q_len, d, D)
            lse = tl.load(Lse + q_rows, mask=q_pos < q_len, other=float("-inf"))
            delta = tl.load(Delta + q_rows, mask=q_pos < q_len, other=0.0)
            p = _probabilities(q, k, lse, q_pos, k_pos, q_len, k_len, offset, scale, mask_id, tile_masks, left,
                               right, BLOCK_Q, BLOCK_K, CAUSAL, WINDOW, HAS_MASKS, WORD, PRECISION)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
    tl.store(dK + k_rows[:, None] * D + d[None, :], dk.to(dK.dtype.element_ty), mask=in_k)
    tl.store(dV + k_rows[:, None] * D + d[None, :], dv.to(dV.dtype.element_ty), mask=in_k)


@triton.jit
def backward_dq_kernel(Q, K, V, dO, Lse, Delta, dQ, counts, indices, mask_ids, tile_masks,
                       heads_q, heads_kv, layout_b, layout_h, n_q, max_k, q_len, k_len, offset, scale, left, right,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                       CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASKS: tl.constexpr, WORD: tl.constexpr,
                       PRECISION: tl.constexpr):
    b, hk, list_id, count, q_pos, d, q_rows = _query_program(counts, heads_q, heads_kv, layout_b, layout_h, n_q,
                                                             q_len, BLOCK_Q, BLOCK_D)
    in_q = (q_pos[:, None] < q_len) & (d[None, :] < D)
    q = _rows(Q, q_rows, q_pos, q_len, d, D)
    do = _rows(dO, q_rows, q_pos, q_len, d, D)
    lse = tl.load(Lse + q_rows, mask=q_pos < q_len, other=float("-inf"))
    delta = tl.load(Delta + q_rows, mask=q_pos < q_len, other=0.0)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for t in range(0, count):
        kb, mask_id = _listed_tile(indices, mask_ids, list_id, max_k, t, HAS_MASKS)
        k_pos = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_rows = ((b * heads_kv + hk) * k_len + k_pos).to(tl.int64)
        k = _rows(K, k_rows, k_pos, k_len, d, D)
        v = _rows(V, k_rows, k_pos, k_len, d, D)
        p = _probabilities(q, k, lse, q_pos, k_pos, q_len, k_len, offset, scale, mask_id, tile_masks, left,
                           right, BLOCK_Q, BLOCK_K, CAUSAL, WINDOW, HAS_MASKS, WORD, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
    tl.store(dQ + q_rows[:, None] * D + d[None, :], dq.to(dQ.dtype.element_ty), mask=in_q)
