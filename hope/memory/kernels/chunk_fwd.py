"""Forward Triton kernels of the chunked memory update (derivation in README.md next to this file).

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk of the rule, NT tiles,
BT/BK/BV block sizes along time / key / value. Inputs are [B, T, H, ·]; intermediate buffers are
head-major [B, H, T, ·] fp32; tile-start states are [B, H, NT, K, V] fp32 and hold Sᵀ (M below).

Per tile of n ≤ BT tokens with start state M and chunk-start state M_c (equal unless the chunk spans
several tiles), with a_t = log α_t, g_t = Σ_{j≤t} a_j and g⁻_t = g_t − a_t (sums inside the tile):

    A[t, i] = β_t e^{g⁻_t − g_i} k_tᵀ k_i   (i < t),        T = (I + A)⁻¹           (UT transform)
    U  = T diag(η) V,   W_c = T diag(η) K,   W_b = T diag(β e^{g⁻}) K                (prepare kernel)
    W  = U − W_c M_c − W_b M                      rows w_t: M_t = α_t M_{t−1} + k_t w_tᵀ (state kernel)
    M' = e^{g_n} M + Kᵀ diag(e^{g_n − g}) W                                         (state kernel)
    O  = diag(e^{g}) Q M + (Q Kᵀ ⊙ D) W,   D[t, i] = e^{g_t − g_i} (i ≤ t)          (output kernel)

which is eq. 93 of arXiv:2512.24695 (DGD with the ℓ2 objective, docs/design.md §3) written for M = Sᵀ.
"""

import torch
import triton
import triton.language as tl

from .common import (
    Inputs,
    Tiling,
    block_cols,
    buf_ptrs,
    causal_decayed,
    dot_precision,
    fp32,
    gate_offsets,
    gram,
    launch,
    loop_blocks,
    state_block,
    state_block_v,
    store_state,
    tile_args,
    tile_decays,
    tile_rows,
    tile_state,
    token_ptrs,
    unit_lower_inverse,
)


@triton.jit
def _prepare_kernel(
    k, v, eta, alpha, beta, g_buf, tm_buf, u_buf, wc_buf, wb_buf,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per tile: decays g, the UT transform T and the state-free parts U, W_c, W_b of the pseudo-values."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    _, _, _, r, row_ok, rows = tile_rows(i_t, T, C, L, NSUB, BT)  # rows: [BT] token index
    p_gate = gate_offsets(i_b, i_h, T, H, rows)  # [BT]
    a = tl.where(row_ok, tl.log(tl.load(alpha + p_gate, mask=row_ok, other=1.0).to(tl.float32)), 0.0)  # [BT]
    g = tl.cumsum(a, 0)  # [BT]
    g_prev = g - a  # [BT]
    b_eta = tl.load(eta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]
    b_beta = tl.load(beta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]

    p_k = token_ptrs(k, i_b, i_h, T, H, K, rows)  # [BT, 1]
    kk = gram(p_k, p_k, row_ok, K, BT, BK, PREC)  # K Kᵀ, [BT, BT]
    strict = (r[:, None] > r[None, :]) & row_ok[:, None]
    decay = tl.exp(tl.where(strict, g_prev[:, None] - g[None, :], 0.0))  # [BT, BT], ≤ 1 where used
    tm = unit_lower_inverse(tl.where(strict, b_beta[:, None] * decay * kk, 0.0), BT, PREC)  # [BT, BT]

    head = i_bh.to(tl.int64) * T
    tl.store(g_buf + head + rows, g, mask=row_ok)
    tl.store(buf_ptrs(tm_buf, head, rows, BT, r), tm, mask=row_ok[:, None])
    tm_eta = tm * b_eta[None, :]  # T diag(η), [BT, BT]
    tm_beta = tm * (b_beta * tl.exp(g_prev))[None, :]  # T diag(β e^{g⁻}), [BT, BT]
    p_v = token_ptrs(v, i_b, i_h, T, H, V, rows)  # [BT, 1]
    for i_v in range(tl.cdiv(V, BV)):
        cv, m_tv = block_cols(i_v, BV, V, row_ok)
        b_v = tl.load(p_v + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        tl.store(buf_ptrs(u_buf, head, rows, V, cv), tl.dot(tm_eta, b_v, input_precision=PREC), mask=m_tv)
    for i_k in range(tl.cdiv(K, BK)):
        ck, m_tk = block_cols(i_k, BK, K, row_ok)
        b_k = tl.load(p_k + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        p_w = (head + rows)[:, None] * K + ck[None, :]  # [BT, BK]
        if MULTI:
            tl.store(wc_buf + p_w, tl.dot(tm_eta, b_k, input_precision=PREC), mask=m_tk)
            tl.store(wb_buf + p_w, tl.dot(tm_beta, b_k, input_precision=PREC), mask=m_tk)
        else:  # M_c = M: only the sum W_c + W_b is ever used
            tl.store(wc_buf + p_w, tl.dot(tm_eta + tm_beta, b_k, input_precision=PREC), mask=m_tk)


@triton.jit
def _state_fwd_kernel(
    k, g_buf, u_buf, wc_buf, wb_buf, h0, h_buf, w_buf, ht,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MULTI: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Sequential over tiles: store each tile-start state, the pseudo-values W, and carry M to the next tile."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ck, cv, m_kv, p_kv, m = state_block(h0, i_v, i_bh, K, V, BK, BV, HAS_H0)  # M [BK, BV]
    m_c = m
    head = i_bh.to(tl.int64) * T
    p_k = k + i_b.to(tl.int64) * T * H * K + i_h * K
    for i_t in range(NT):
        start, n, i_s, r, row_ok, rows = tile_rows(i_t, T, C, L, NSUB, BT)
        m_tk = row_ok[:, None] & (ck < K)[None, :]
        m_tv = row_ok[:, None] & (cv < V)[None, :]
        tl.store(tile_state(h_buf, i_bh, i_t, NT, K, V) + p_kv, m, mask=m_kv)
        b_u = tl.load(buf_ptrs(u_buf, head, rows, V, cv), mask=m_tv, other=0.0)  # [BT, BV]
        b_wc = tl.load(buf_ptrs(wc_buf, head, rows, K, ck), mask=m_tk, other=0.0)  # [BT, BK]
        if MULTI:
            m_c = tl.where(i_s == 0, m, m_c)  # a new chunk: its gradients are taken at this state
            b_wb = tl.load(buf_ptrs(wb_buf, head, rows, K, ck), mask=m_tk, other=0.0)  # [BT, BK]
            b_w = b_u - tl.dot(b_wc, m_c, input_precision=PREC) - tl.dot(b_wb, m, input_precision=PREC)
        else:
            b_w = b_u - tl.dot(b_wc, m, input_precision=PREC)  # [BT, BV]
        tl.store(buf_ptrs(w_buf, head, rows, V, cv), b_w, mask=m_tv)
        g, g_last = tile_decays(g_buf, head, start, n, rows, row_ok)  # [BT], []
        b_k = tl.load(p_k + rows[:, None] * (H * K) + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_k *= tl.exp(g_last - g)[:, None]
        m = m * tl.exp(g_last) + tl.dot(tl.trans(b_k), b_w, input_precision=PREC)  # [BK, BV]
    store_state(ht, m, i_bh, p_kv, m_kv, K, V, STORE_HT)


@triton.jit
def _output_kernel(
    q, k, g_buf, h_buf, w_buf, o,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per tile, in parallel: O = diag(e^g) Q M + (Q Kᵀ ⊙ D) W (read after write, so D includes the diagonal)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    _, _, _, r, row_ok, rows = tile_rows(i_t, T, C, L, NSUB, BT)
    cv, m_tv = block_cols(i_v, BV, V, row_ok)
    p_qk = token_ptrs(0, i_b, i_h, T, H, K, rows)  # [BT, 1]
    p_h = tile_state(h_buf, i_bh, i_t, NT, K, V)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    qm = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        ck, m_tk = block_cols(i_k, BK, K, row_ok)
        b_q = tl.load(q + p_qk + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_k = tl.load(k + p_qk + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_h = tl.load(p_h + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
        qk += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BT, BT]
        qm += tl.dot(b_q, b_h, input_precision=PREC)  # [BT, BV]
    head = i_bh.to(tl.int64) * T
    g = tl.load(g_buf + head + rows, mask=row_ok, other=0.0)  # [BT]
    p = causal_decayed(qk, g, r, row_ok)  # [BT, BT]
    b_w = tl.load(buf_ptrs(w_buf, head, rows, V, cv), mask=m_tv, other=0.0)  # [BT, BV]
    b_o = qm * tl.exp(g)[:, None] + tl.dot(p, b_w, input_precision=PREC)  # [BT, BV]
    p_o = token_ptrs(o, i_b, i_h, T, H, V, rows) + cv[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_tv)


def forward_states(x: Inputs, tiling: Tiling, output_final_state: bool) -> dict[str, torch.Tensor | None]:
    """Run the prepare and state kernels; return g, T, W_c, W_b, tile-start states h, pseudo-values W, final state.

    Used by the forward pass and again by the backward pass, which recomputes these instead of saving them.
    """
    batch, seq_len, heads, key_dim, value_dim = x.dims
    n_tiles, block_t, bh = tiling.n_tiles, tiling.block_t, batch * heads
    g, tm = fp32(x, batch, heads, seq_len), fp32(x, batch, heads, seq_len, block_t)
    u, wc = fp32(x, batch, heads, seq_len, value_dim), fp32(x, batch, heads, seq_len, key_dim)
    wb = fp32(x, batch, heads, seq_len, key_dim) if tiling.multi else wc
    prec, tiles = dot_precision(x.k.dtype), tile_args(x, tiling)
    bk, bv = loop_blocks(key_dim, value_dim)
    launch(_prepare_kernel, (n_tiles, bh), x.k, x.v, x.eta, x.alpha, x.beta, g, tm, u, wc, wb, *tiles,
           block_t=block_t, BK=bk, BV=bv, MULTI=tiling.multi, PREC=prec)  # fmt: skip
    h, w = fp32(x, batch, heads, n_tiles, key_dim, value_dim), fp32(x, batch, heads, seq_len, value_dim)
    final = fp32(x, batch, heads, key_dim, value_dim) if output_final_state else None
    bk, bv = state_block_v(key_dim, value_dim)
    launch(_state_fwd_kernel, (triton.cdiv(value_dim, bv), bh), x.k, g, u, wc, wb, x.initial_state, h, w, final,
           *tiles, n_tiles, block_t=block_t, sequential=True, BK=bk, BV=bv, MULTI=tiling.multi,
           HAS_H0=x.initial_state is not None, STORE_HT=output_final_state, PREC=prec)  # fmt: skip
    return dict(g=g, tm=tm, wc=wc, wb=wb, h=h, w=w, final=final)


def chunk_fwd(x: Inputs, tiling: Tiling, output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs o [B, T, H, V] (dtype of v) and, if asked, the final state [B, H, K, V] fp32."""
    batch, _, heads, key_dim, value_dim = x.dims
    fwd = forward_states(x, tiling, output_final_state)
    o = torch.empty(x.v.shape, device=x.v.device, dtype=x.v.dtype)
    bk, bv = loop_blocks(key_dim, value_dim)
    launch(_output_kernel, (triton.cdiv(value_dim, bv), tiling.n_tiles, batch * heads), x.q, x.k, fwd["g"],
           fwd["h"], fwd["w"], o, *tile_args(x, tiling), tiling.n_tiles, block_t=tiling.block_t, BK=bk, BV=bv,
           PREC=dot_precision(x.q.dtype))  # fmt: skip
    return o, fwd["final"]
