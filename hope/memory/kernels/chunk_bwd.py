"""Backward Triton kernels of the chunked memory update (derivation in README.md next to this file).

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk of the rule, NT tiles,
BT/BK/BV block sizes along time / key / value. Symbols as in chunk_fwd.py: per tile, start
state M, chunk-start state M_c, end state M', decays g, g⁻, UT transform T, pseudo-values W = T R with

    R = diag(η)(V − K M_c) − diag(β e^{g⁻}) K M,       P = Q Kᵀ ⊙ D.

Given dO and dM' (the gradient flowing into the tile's end state), reverse mode gives

    dW  = Pᵀ dO + diag(e^{g_n − g}) K dM'                       (local kernel + state kernel)
    dM  = e^{g_n} dM' + Qᵀ diag(e^g) dO − W_bᵀ dW,   dM_c = −W_cᵀ dW          (state kernel)
    dR  = Tᵀ dW,   dA = −dR Wᵀ (strictly lower part),   dV = diag(η) dR      (tile kernel)
    dQ  = diag(e^g) dO Mᵀ + (dO Wᵀ ⊙ D) K                                      (dq/dk kernel)
    dK  = (dO Wᵀ ⊙ D)ᵀ Q + diag(e^{g_n − g}) W dM'ᵀ + dG K + dGᵀ K
          − diag(η) dR M_cᵀ − diag(β e^{g⁻}) dR Mᵀ,          dG = dA ⊙ β_t e^{g⁻_t − g_i}
plus the gate gradients of the tile kernel. Only the inputs are saved by the forward pass: the tile-start
states and W are recomputed here (chunk_fwd.forward_states), which keeps saved memory O(T (K + V)).
"""

import torch
import triton
import triton.language as tl

from .chunk_fwd import forward_states
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
)


@triton.jit
def _local_dw_kernel(
    q, k, g_buf, do, dw_buf,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per tile, in parallel: the part Pᵀ dO of dW that does not depend on later tiles."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    _, _, _, r, row_ok, rows = tile_rows(i_t, T, C, L, NSUB, BT)
    cv, m_tv = block_cols(i_v, BV, V, row_ok)
    p_qk = token_ptrs(0, i_b, i_h, T, H, K, rows)  # [BT, 1]
    qk = gram(q + p_qk, k + p_qk, row_ok, K, BT, BK, PREC)  # Q Kᵀ, [BT, BT]
    head = i_bh.to(tl.int64) * T
    g = tl.load(g_buf + head + rows, mask=row_ok, other=0.0)  # [BT]
    p = causal_decayed(qk, g, r, row_ok)  # [BT, BT]
    b_do = tl.load(token_ptrs(do, i_b, i_h, T, H, V, rows) + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_dw = tl.dot(tl.trans(p), b_do, input_precision=PREC)  # [BT, BV]
    tl.store(buf_ptrs(dw_buf, head, rows, V, cv), b_dw, mask=m_tv)


@triton.jit
def _state_bwd_kernel(
    q, k, g_buf, wc_buf, wb_buf, do, dht, dh_buf, dw_buf, dh0,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MULTI: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Sequential over tiles, last to first: store dM' of each tile, complete dW, carry dM to the previous tile."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ck, cv, m_kv, p_kv, dm = state_block(dht, i_v, i_bh, K, V, BK, BV, HAS_DHT)  # dM [BK, BV]
    dm_c = tl.zeros([BK, BV], dtype=tl.float32)  # gradient owed to the current chunk's start state
    head = i_bh.to(tl.int64) * T
    p_qk = i_b.to(tl.int64) * T * H * K + i_h * K
    p_do = do + i_b.to(tl.int64) * T * H * V + i_h * V
    for i_rev in range(NT):
        i_t = NT - 1 - i_rev
        start, n, i_s, r, row_ok, rows = tile_rows(i_t, T, C, L, NSUB, BT)
        m_tk = row_ok[:, None] & (ck < K)[None, :]
        m_tv = row_ok[:, None] & (cv < V)[None, :]
        tl.store(tile_state(dh_buf, i_bh, i_t, NT, K, V) + p_kv, dm, mask=m_kv)
        g, g_last = tile_decays(g_buf, head, start, n, rows, row_ok)  # [BT], []
        b_k = tl.load(k + p_qk + rows[:, None] * (H * K) + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_q = tl.load(q + p_qk + rows[:, None] * (H * K) + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_do = tl.load(p_do + rows[:, None] * (H * V) + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)
        p_dw = buf_ptrs(dw_buf, head, rows, V, cv)
        b_dw = tl.load(p_dw, mask=m_tv, other=0.0)  # [BT, BV]
        b_dw += tl.dot(b_k * tl.exp(g_last - g)[:, None], dm, input_precision=PREC)
        tl.store(p_dw, b_dw, mask=m_tv)
        b_wc = tl.load(buf_ptrs(wc_buf, head, rows, K, ck), mask=m_tk, other=0.0)  # [BT, BK]
        dm = dm * tl.exp(g_last) + tl.dot(tl.trans(b_q * tl.exp(g)[:, None]), b_do, input_precision=PREC)
        if MULTI:
            b_wb = tl.load(buf_ptrs(wb_buf, head, rows, K, ck), mask=m_tk, other=0.0)  # [BT, BK]
            dm -= tl.dot(tl.trans(b_wb), b_dw, input_precision=PREC)
            dm_c -= tl.dot(tl.trans(b_wc), b_dw, input_precision=PREC)
            dm += tl.where(i_s == 0, dm_c, 0.0)  # first tile of the chunk: its start state is M_c
            dm_c = tl.where(i_s == 0, 0.0, dm_c)
        else:  # M_c = M, and W_c + W_b is stored in wc_buf
            dm -= tl.dot(tl.trans(b_wc), b_dw, input_precision=PREC)  # [BK, BV]
    store_state(dh0, dm, i_bh, p_kv, m_kv, K, V, STORE_DH0)


@triton.jit
def _log_alpha_grad(s_o, s_a, g, g_prev, g_last, b_beta, terms, n, BT: tl.constexpr):
    """d(log α_t) inside one tile, collecting every place the decays appear (README.md, "Backward").

    dg_t is the gradient of g_t = Σ_{j≤t} a_j and dg⁻_t that of g⁻_t = Σ_{j<t} a_j, so d a_j = Σ_{t≥j} dg_t +
    Σ_{t>j} dg⁻_t. s_o = dS ⊙ QKᵀ (the decays D of P), s_a = dG ⊙ KKᵀ (the decays inside A); ``terms`` holds
    the row sums Σ_v dO ⊙ QM, Σ_v dR ⊙ KM, Σ_v (K dM') ⊙ W and the scalar ⟨dM', M⟩.
    """
    do_qm, dr_km, kdm_w, frob = terms
    r = tl.arange(0, BT)
    w_end = tl.where(r < n, tl.exp(g_last - g) * kdm_w, 0.0)  # from e^{g_n − g_i} in M'
    dg = tl.sum(s_o, 1) - tl.sum(s_o, 0) - tl.sum(s_a, 0) + tl.exp(g) * do_qm - w_end
    dg += tl.where(r == n - 1, tl.exp(g_last) * frob + tl.sum(w_end, 0), 0.0)  # from e^{g_n} in M'
    dgp = tl.sum(s_a, 1) - b_beta * tl.exp(g_prev) * dr_km  # from A and from e^{g⁻} in R
    return tl.cumsum(dg, 0, reverse=True) + tl.cumsum(dgp, 0, reverse=True) - dgp


@triton.jit
def _tile_grads_kernel(
    q, k, v, eta, alpha, beta, do, g_buf, tm_buf, w_buf, dw_buf, h_buf, dh_buf,
    dv, ds_buf, dgk_buf, deta, dalpha, dbeta,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per tile, in parallel: dV, the gate gradients, and the [BT, BT] factors dS = dO Wᵀ ⊙ D and dG for dq/dk."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    start, n, i_s, r, row_ok, rows = tile_rows(i_t, T, C, L, NSUB, BT)
    head = i_bh.to(tl.int64) * T
    p_gate = gate_offsets(i_b, i_h, T, H, rows)  # [BT]
    b_alpha = tl.load(alpha + p_gate, mask=row_ok, other=1.0).to(tl.float32)  # [BT]
    b_eta = tl.load(eta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]
    b_beta = tl.load(beta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]
    g, g_last = tile_decays(g_buf, head, start, n, rows, row_ok)  # [BT], []
    g_prev = g - tl.log(b_alpha)  # [BT]
    tm = tl.load(buf_ptrs(tm_buf, head, rows, BT, r), mask=row_ok[:, None], other=0.0)  # [BT, BT]
    p_s = tile_state(h_buf, i_bh, i_t, NT, K, V)  # tile-start state M
    p_c = h_buf + (i_bh.to(tl.int64) * NT + i_t - i_s) * K * V  # chunk-start state M_c
    p_dh = tile_state(dh_buf, i_bh, i_t, NT, K, V)  # dM'
    p_qk = token_ptrs(0, i_b, i_h, T, H, K, rows)  # [BT, 1]
    p_v = token_ptrs(0, i_b, i_h, T, H, V, rows)  # [BT, 1]

    dow = tl.zeros([BT, BT], dtype=tl.float32)  # dO Wᵀ
    drw = tl.zeros([BT, BT], dtype=tl.float32)  # dR Wᵀ
    d_eta = tl.zeros([BT], dtype=tl.float32)  # Σ_v dR ⊙ (V − K M_c)
    dr_km = tl.zeros([BT], dtype=tl.float32)  # Σ_v dR ⊙ K M
    do_qm = tl.zeros([BT], dtype=tl.float32)  # Σ_v dO ⊙ Q M
    kdm_w = tl.zeros([BT], dtype=tl.float32)  # Σ_v (K dM') ⊙ W
    frob = tl.zeros([BV], dtype=tl.float32)  # ⟨dM', M⟩ summed over keys, one entry per value column
    for i_v in range(tl.cdiv(V, BV)):
        cv, m_tv = block_cols(i_v, BV, V, row_ok)
        b_do = tl.load(do + p_v + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_v = tl.load(v + p_v + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_w = tl.load(buf_ptrs(w_buf, head, rows, V, cv), mask=m_tv, other=0.0)  # [BT, BV]
        b_dw = tl.load(buf_ptrs(dw_buf, head, rows, V, cv), mask=m_tv, other=0.0)  # [BT, BV]
        b_dr = tl.dot(tl.trans(tm), b_dw, input_precision=PREC)  # dR, [BT, BV]
        tl.store(dv + p_v + cv[None, :], (b_eta[:, None] * b_dr).to(dv.dtype.element_ty), mask=m_tv)
        dow += tl.dot(b_do, tl.trans(b_w), input_precision=PREC)
        drw += tl.dot(b_dr, tl.trans(b_w), input_precision=PREC)
        km = tl.zeros([BT, BV], dtype=tl.float32)  # K M
        km_c = tl.zeros([BT, BV], dtype=tl.float32)  # K M_c
        qm = tl.zeros([BT, BV], dtype=tl.float32)  # Q M
        kdm = tl.zeros([BT, BV], dtype=tl.float32)  # K dM'
        for i_k in range(tl.cdiv(K, BK)):
            ck, m_tk = block_cols(i_k, BK, K, row_ok)
            m_kv = (ck < K)[:, None] & (cv < V)[None, :]
            b_q = tl.load(q + p_qk + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
            b_k = tl.load(k + p_qk + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
            b_m = tl.load(p_s + ck[:, None] * V + cv[None, :], mask=m_kv, other=0.0)  # [BK, BV]
            b_dm = tl.load(p_dh + ck[:, None] * V + cv[None, :], mask=m_kv, other=0.0)  # [BK, BV]
            km += tl.dot(b_k, b_m, input_precision=PREC)
            qm += tl.dot(b_q, b_m, input_precision=PREC)
            kdm += tl.dot(b_k, b_dm, input_precision=PREC)
            frob += tl.sum(b_dm * b_m, 0)
            if MULTI:
                b_mc = tl.load(p_c + ck[:, None] * V + cv[None, :], mask=m_kv, other=0.0)  # [BK, BV]
                km_c += tl.dot(b_k, b_mc, input_precision=PREC)
        if not MULTI:
            km_c = km
        d_eta += tl.sum(b_dr * (b_v - km_c), 1)
        dr_km += tl.sum(b_dr * km, 1)
        do_qm += tl.sum(b_do * qm, 1)
        kdm_w += tl.sum(kdm * b_w, 1)

    qk = gram(q + p_qk, k + p_qk, row_ok, K, BT, BK, PREC)  # Q Kᵀ, [BT, BT]
    kk = gram(k + p_qk, k + p_qk, row_ok, K, BT, BK, PREC)  # K Kᵀ, [BT, BT]
    strict = (r[:, None] > r[None, :]) & row_ok[:, None]
    ds = causal_decayed(dow, g, r, row_ok)  # dS, [BT, BT]
    e_prev = tl.where(strict, tl.exp(tl.where(strict, g_prev[:, None] - g[None, :], 0.0)), 0.0)  # [BT, BT]
    da = -drw * e_prev  # dA ⊙ e^{g⁻_t − g_i}, zero off the strict lower triangle
    dgk = da * b_beta[:, None]  # dG, [BT, BT]
    tl.store(buf_ptrs(ds_buf, head, rows, BT, r), ds, mask=row_ok[:, None])
    tl.store(buf_ptrs(dgk_buf, head, rows, BT, r), dgk, mask=row_ok[:, None])
    d_beta = tl.sum(da * kk, 1) - tl.exp(g_prev) * dr_km  # [BT]

    terms = (do_qm, dr_km, kdm_w, tl.sum(frob, 0))
    d_log_alpha = _log_alpha_grad(ds * qk, dgk * kk, g, g_prev, g_last, b_beta, terms, n, BT)  # [BT]
    tl.store(deta + p_gate, d_eta.to(deta.dtype.element_ty), mask=row_ok)
    tl.store(dbeta + p_gate, d_beta.to(dbeta.dtype.element_ty), mask=row_ok)
    tl.store(dalpha + p_gate, (d_log_alpha / b_alpha).to(dalpha.dtype.element_ty), mask=row_ok)


@triton.jit
def _dqk_kernel(
    q, k, eta, alpha, beta, do, g_buf, tm_buf, w_buf, dw_buf, h_buf, dh_buf, ds_buf, dgk_buf, dq, dk,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per tile and key block, in parallel: dQ and dK (formulas in the module docstring)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    start, n, i_s, r, row_ok, rows = tile_rows(i_t, T, C, L, NSUB, BT)
    ck, m_tk = block_cols(i_k, BK, K, row_ok)
    head = i_bh.to(tl.int64) * T
    p_gate = gate_offsets(i_b, i_h, T, H, rows)  # [BT]
    b_eta = tl.load(eta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]
    b_beta = tl.load(beta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]
    g, g_last = tile_decays(g_buf, head, start, n, rows, row_ok)  # [BT], []
    g_prev = g - tl.log(tl.load(alpha + p_gate, mask=row_ok, other=1.0).to(tl.float32))  # [BT]
    p_qk = token_ptrs(0, i_b, i_h, T, H, K, rows) + ck[None, :]  # [BT, BK]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
    p_tt = (head + rows)[:, None] * BT + r[None, :]  # [BT, BT]
    ds = tl.load(ds_buf + p_tt, mask=row_ok[:, None], other=0.0)  # [BT, BT]
    dgk = tl.load(dgk_buf + p_tt, mask=row_ok[:, None], other=0.0)  # [BT, BT]
    tm = tl.load(tm_buf + p_tt, mask=row_ok[:, None], other=0.0)  # [BT, BT]
    b_dq = tl.dot(ds, b_k, input_precision=PREC)  # [BT, BK]
    b_dk = tl.dot(tl.trans(ds), b_q, input_precision=PREC) + tl.dot(dgk + tl.trans(dgk), b_k, input_precision=PREC)

    p_s = tile_state(h_buf, i_bh, i_t, NT, K, V)
    p_c = h_buf + (i_bh.to(tl.int64) * NT + i_t - i_s) * K * V
    p_dh = tile_state(dh_buf, i_bh, i_t, NT, K, V)
    p_v = token_ptrs(0, i_b, i_h, T, H, V, rows)  # [BT, 1]
    do_m = tl.zeros([BT, BK], dtype=tl.float32)  # dO Mᵀ
    w_dm = tl.zeros([BT, BK], dtype=tl.float32)  # W dM'ᵀ
    dr_m = tl.zeros([BT, BK], dtype=tl.float32)  # dR Mᵀ
    dr_mc = tl.zeros([BT, BK], dtype=tl.float32)  # dR M_cᵀ
    for i_v in range(tl.cdiv(V, BV)):
        cv, m_tv = block_cols(i_v, BV, V, row_ok)
        m_kv = (ck < K)[:, None] & (cv < V)[None, :]
        b_do = tl.load(do + p_v + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        b_w = tl.load(buf_ptrs(w_buf, head, rows, V, cv), mask=m_tv, other=0.0)  # [BT, BV]
        b_dw = tl.load(buf_ptrs(dw_buf, head, rows, V, cv), mask=m_tv, other=0.0)  # [BT, BV]
        b_dr = tl.dot(tl.trans(tm), b_dw, input_precision=PREC)  # dR, [BT, BV]
        b_m = tl.load(p_s + ck[:, None] * V + cv[None, :], mask=m_kv, other=0.0)  # [BK, BV]
        b_dm = tl.load(p_dh + ck[:, None] * V + cv[None, :], mask=m_kv, other=0.0)  # [BK, BV]
        do_m += tl.dot(b_do, tl.trans(b_m), input_precision=PREC)
        w_dm += tl.dot(b_w, tl.trans(b_dm), input_precision=PREC)
        dr_m += tl.dot(b_dr, tl.trans(b_m), input_precision=PREC)
        if MULTI:
            b_mc = tl.load(p_c + ck[:, None] * V + cv[None, :], mask=m_kv, other=0.0)  # [BK, BV]
            dr_mc += tl.dot(b_dr, tl.trans(b_mc), input_precision=PREC)
    b_dq += tl.exp(g)[:, None] * do_m
    b_dk += tl.exp(g_last - g)[:, None] * w_dm
    if MULTI:
        b_dk -= b_eta[:, None] * dr_mc + (b_beta * tl.exp(g_prev))[:, None] * dr_m
    else:  # M_c = M
        b_dk -= (b_eta + b_beta * tl.exp(g_prev))[:, None] * dr_m
    tl.store(dq + p_qk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_qk, b_dk.to(dk.dtype.element_ty), mask=m_tk)


def chunk_bwd(x: Inputs, tiling: Tiling, do: torch.Tensor, dht: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, deta, dalpha, dbeta, d initial_state or None) given dO and d final_state."""
    batch, seq_len, heads, key_dim, value_dim = x.dims
    n_tiles, block_t, bh = tiling.n_tiles, tiling.block_t, batch * heads
    fwd = forward_states(x, tiling, False)
    prec, tiles = dot_precision(x.q.dtype), tile_args(x, tiling)
    bk, bv = loop_blocks(key_dim, value_dim)
    dw = fp32(x, batch, heads, seq_len, value_dim)
    launch(_local_dw_kernel, (triton.cdiv(value_dim, bv), n_tiles, bh), x.q, x.k, fwd["g"], do, dw, *tiles,
           block_t=block_t, BK=bk, BV=bv, PREC=prec)  # fmt: skip
    dh = fp32(x, batch, heads, n_tiles, key_dim, value_dim)
    dh0 = fp32(x, batch, heads, key_dim, value_dim) if x.initial_state is not None else None
    sk, sv = state_block_v(key_dim, value_dim)
    launch(_state_bwd_kernel, (triton.cdiv(value_dim, sv), bh), x.q, x.k, fwd["g"], fwd["wc"], fwd["wb"], do, dht,
           dh, dw, dh0, *tiles, n_tiles, block_t=block_t, sequential=True, BK=sk, BV=sv, MULTI=tiling.multi,
           HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, PREC=prec)  # fmt: skip
    dv = torch.empty(x.v.shape, device=x.v.device, dtype=x.v.dtype)
    ds, dgk = fp32(x, batch, heads, seq_len, block_t), fp32(x, batch, heads, seq_len, block_t)
    deta, dalpha, dbeta = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (x.eta, x.alpha, x.beta))
    launch(_tile_grads_kernel, (n_tiles, bh), *x[:6], do, fwd["g"], fwd["tm"], fwd["w"], dw, fwd["h"], dh,
           dv, ds, dgk, deta, dalpha, dbeta, *tiles, n_tiles, block_t=block_t, BK=bk, BV=bv, MULTI=tiling.multi,
           PREC=prec)  # fmt: skip
    dq = torch.empty(x.q.shape, device=x.q.device, dtype=x.q.dtype)
    dk = torch.empty(x.k.shape, device=x.k.device, dtype=x.k.dtype)
    launch(_dqk_kernel, (triton.cdiv(key_dim, bk), n_tiles, bh), x.q, x.k, x.eta, x.alpha, x.beta, do, fwd["g"],
           fwd["tm"], fwd["w"], dw, fwd["h"], dh, ds, dgk, dq, dk, *tiles, n_tiles, block_t=block_t, BK=bk, BV=bv,
           MULTI=tiling.multi, PREC=prec)  # fmt: skip
    return dq, dk, dv, deta, dalpha, dbeta, dh0
