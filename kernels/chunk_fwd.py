"""Forward Triton kernels of the chunked memory update (derivation in kernels/README.md).

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

which is eq. 93 of arXiv:2512.24695 (DGD with the ℓ2 objective, DESIGN.md §3) written for M = Sᵀ.
"""

import torch
import triton
import triton.language as tl

from kernels.common import Tiling, dot_precision, gram, launch_options, tile_bounds, unit_lower_inverse


@triton.jit
def _prepare_kernel(
    k, v, eta, alpha, beta, g_buf, tm_buf, u_buf, wc_buf, wb_buf,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MULTI: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per tile: decays g, the UT transform T and the state-free parts U, W_c, W_b of the pseudo-values."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    start, n, _ = tile_bounds(i_t, T, C, L, NSUB)
    r = tl.arange(0, BT)
    row_ok = r < n
    rows = start + r  # [BT] token index
    p_gate = i_b.to(tl.int64) * T * H + i_h + rows * H  # [BT]
    a = tl.where(row_ok, tl.log(tl.load(alpha + p_gate, mask=row_ok, other=1.0).to(tl.float32)), 0.0)  # [BT]
    g = tl.cumsum(a, 0)  # [BT]
    g_prev = g - a  # [BT]
    b_eta = tl.load(eta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]
    b_beta = tl.load(beta + p_gate, mask=row_ok, other=0.0).to(tl.float32)  # [BT]

    p_k = k + i_b.to(tl.int64) * T * H * K + i_h * K + rows[:, None] * (H * K)  # [BT, 1]
    kk = gram(p_k, p_k, row_ok, K, BT, BK, PREC)  # K Kᵀ, [BT, BT]
    strict = (r[:, None] > r[None, :]) & row_ok[:, None]
    decay = tl.exp(tl.where(strict, g_prev[:, None] - g[None, :], 0.0))  # [BT, BT], ≤ 1 where used
    tm = unit_lower_inverse(tl.where(strict, b_beta[:, None] * decay * kk, 0.0), BT, PREC)  # [BT, BT]

    head = i_bh.to(tl.int64) * T
    tl.store(g_buf + head + rows, g, mask=row_ok)
    tl.store(tm_buf + (head + rows)[:, None] * BT + r[None, :], tm, mask=row_ok[:, None])
    tm_eta = tm * b_eta[None, :]  # T diag(η), [BT, BT]
    tm_beta = tm * (b_beta * tl.exp(g_prev))[None, :]  # T diag(β e^{g⁻}), [BT, BT]
    p_v = v + i_b.to(tl.int64) * T * H * V + i_h * V + rows[:, None] * (H * V)  # [BT, 1]
    for i_v in range(tl.cdiv(V, BV)):
        cv = i_v * BV + tl.arange(0, BV)
        m_tv = row_ok[:, None] & (cv < V)[None, :]
        b_v = tl.load(p_v + cv[None, :], mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
        tl.store(u_buf + (head + rows)[:, None] * V + cv[None, :], tl.dot(tm_eta, b_v, input_precision=PREC), mask=m_tv)
    for i_k in range(tl.cdiv(K, BK)):
        ck = i_k * BK + tl.arange(0, BK)
        m_tk = row_ok[:, None] & (ck < K)[None, :]
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
    r = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    m_kv = (ck < K)[:, None] & (cv < V)[None, :]
    p_kv = ck[:, None] * V + cv[None, :]  # [BK, BV] offsets inside one state
    m = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        m += tl.load(h0 + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)
    m_c = m
    head = i_bh.to(tl.int64) * T
    p_k = k + i_b.to(tl.int64) * T * H * K + i_h * K
    for i_t in range(NT):
        start, n, i_s = tile_bounds(i_t, T, C, L, NSUB)
        row_ok = r < n
        rows = start + r  # [BT]
        m_tk = row_ok[:, None] & (ck < K)[None, :]
        m_tv = row_ok[:, None] & (cv < V)[None, :]
        tl.store(h_buf + (i_bh.to(tl.int64) * NT + i_t) * K * V + p_kv, m, mask=m_kv)
        b_u = tl.load(u_buf + (head + rows)[:, None] * V + cv[None, :], mask=m_tv, other=0.0)  # [BT, BV]
        b_wc = tl.load(wc_buf + (head + rows)[:, None] * K + ck[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        if MULTI:
            m_c = tl.where(i_s == 0, m, m_c)  # a new chunk: its gradients are taken at this state
            b_wb = tl.load(wb_buf + (head + rows)[:, None] * K + ck[None, :], mask=m_tk, other=0.0)  # [BT, BK]
            b_w = b_u - tl.dot(b_wc, m_c, input_precision=PREC) - tl.dot(b_wb, m, input_precision=PREC)
        else:
            b_w = b_u - tl.dot(b_wc, m, input_precision=PREC)  # [BT, BV]
        tl.store(w_buf + (head + rows)[:, None] * V + cv[None, :], b_w, mask=m_tv)
        g = tl.load(g_buf + head + rows, mask=row_ok, other=0.0)  # [BT]
        g_last = tl.load(g_buf + head + start + n - 1, mask=n > 0, other=0.0)
        b_k = tl.load(p_k + rows[:, None] * (H * K) + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_k *= tl.exp(g_last - g)[:, None]
        m = m * tl.exp(g_last) + tl.dot(tl.trans(b_k), b_w, input_precision=PREC)  # [BK, BV]
    if STORE_HT:
        tl.store(ht + i_bh.to(tl.int64) * K * V + p_kv, m, mask=m_kv)


@triton.jit
def _output_kernel(
    q, k, g_buf, h_buf, w_buf, o,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C, L, NSUB, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per tile, in parallel: O = diag(e^g) Q M + (Q Kᵀ ⊙ D) W (read after write, so D includes the diagonal)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    start, n, _ = tile_bounds(i_t, T, C, L, NSUB)
    r = tl.arange(0, BT)
    row_ok = r < n
    rows = start + r  # [BT]
    cv = i_v * BV + tl.arange(0, BV)
    p_qk = i_b.to(tl.int64) * T * H * K + i_h * K + rows[:, None] * (H * K)  # [BT, 1]
    p_h = h_buf + (i_bh.to(tl.int64) * NT + i_t) * K * V
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    qm = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        ck = i_k * BK + tl.arange(0, BK)
        m_tk = row_ok[:, None] & (ck < K)[None, :]
        b_q = tl.load(q + p_qk + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_k = tl.load(k + p_qk + ck[None, :], mask=m_tk, other=0.0).to(tl.float32)  # [BT, BK]
        b_h = tl.load(p_h + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
        qk += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BT, BT]
        qm += tl.dot(b_q, b_h, input_precision=PREC)  # [BT, BV]
    head = i_bh.to(tl.int64) * T
    m_tv = row_ok[:, None] & (cv < V)[None, :]
    g = tl.load(g_buf + head + rows, mask=row_ok, other=0.0)  # [BT]
    causal = (r[:, None] >= r[None, :]) & row_ok[:, None]
    p = tl.where(causal, qk * tl.exp(tl.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)  # [BT, BT]
    b_w = tl.load(w_buf + (head + rows)[:, None] * V + cv[None, :], mask=m_tv, other=0.0)  # [BT, BV]
    b_o = qm * tl.exp(g)[:, None] + tl.dot(p, b_w, input_precision=PREC)  # [BT, BV]
    p_o = o + i_b.to(tl.int64) * T * H * V + i_h * V + rows[:, None] * (H * V) + cv[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_tv)


def state_block_v(key_dim: int, value_dim: int) -> tuple[int, int]:
    """(BK, BV) for kernels that keep a whole-K block of the state in registers: BK · BV ≤ 4096."""
    block_k = max(16, triton.next_power_of_2(key_dim))
    return block_k, max(16, min(triton.next_power_of_2(value_dim), 4096 // block_k))


def loop_blocks(key_dim: int, value_dim: int) -> tuple[int, int]:
    """(BK, BV) for kernels that loop over the key and value widths in blocks of at most 64."""
    return min(64, max(16, triton.next_power_of_2(key_dim))), min(64, max(16, triton.next_power_of_2(value_dim)))


def forward_states(
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    tiling: Tiling,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> dict[str, torch.Tensor | None]:
    """Run the prepare and state kernels; return g, T, W_c, W_b, tile-start states h, pseudo-values W, final state.

    Used by the forward pass and again by the backward pass, which recomputes these instead of saving them.
    """
    batch, seq_len, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    n_tiles, block_t = tiling.n_tiles, tiling.block_t
    f32 = dict(device=k.device, dtype=torch.float32)
    g = torch.empty(batch, heads, seq_len, **f32)
    tm = torch.empty(batch, heads, seq_len, block_t, **f32)
    u = torch.empty(batch, heads, seq_len, value_dim, **f32)
    wc = torch.empty(batch, heads, seq_len, key_dim, **f32)
    wb = torch.empty(batch, heads, seq_len, key_dim, **f32) if tiling.multi else wc
    prec = dot_precision(k.dtype)
    tiles = (seq_len, heads, key_dim, value_dim, tiling.chunk_size, tiling.tile_len, tiling.n_sub)
    bk, bv = loop_blocks(key_dim, value_dim)
    _prepare_kernel[(n_tiles, batch * heads)](
        k, v, eta, alpha, beta, g, tm, u, wc, wb, *tiles, BT=block_t, BK=bk, BV=bv, MULTI=tiling.multi, PREC=prec,
        **launch_options(False, block_t),
    )  # fmt: skip
    h = torch.empty(batch, heads, n_tiles, key_dim, value_dim, **f32)
    w = torch.empty(batch, heads, seq_len, value_dim, **f32)
    final = torch.empty(batch, heads, key_dim, value_dim, **f32) if output_final_state else None
    bk, bv = state_block_v(key_dim, value_dim)
    _state_fwd_kernel[(triton.cdiv(value_dim, bv), batch * heads)](
        k, g, u, wc, wb, initial_state, h, w, final, *tiles, n_tiles, BT=block_t, BK=bk, BV=bv,
        MULTI=tiling.multi, HAS_H0=initial_state is not None, STORE_HT=output_final_state, PREC=prec,
        **launch_options(True, block_t),
    )  # fmt: skip
    return dict(g=g, tm=tm, wc=wc, wb=wb, h=h, w=w, final=final)


def chunk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    tiling: Tiling,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs o [B, T, H, V] (dtype of v) and, if asked, the final state [B, H, K, V] fp32."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    fwd = forward_states(k, v, eta, alpha, beta, tiling, initial_state, output_final_state)
    o = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    bk, bv = loop_blocks(key_dim, value_dim)
    _output_kernel[(triton.cdiv(value_dim, bv), tiling.n_tiles, batch * heads)](
        q, k, fwd["g"], fwd["h"], fwd["w"], o, seq_len, heads, key_dim, value_dim, tiling.chunk_size,
        tiling.tile_len, tiling.n_sub, tiling.n_tiles, BT=tiling.block_t, BK=bk, BV=bv, PREC=dot_precision(q.dtype),
        **launch_options(False, tiling.block_t),
    )  # fmt: skip
    return o, fwd["final"]
