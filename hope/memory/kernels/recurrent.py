"""Token-by-token Triton kernel of the inner-loop memory update: the rule's step in a loop (decoding, oracle).

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk (``chunk_size``),
BK/BV block sizes along key / value.
"""

import torch
import triton
import triton.language as tl

from .common import Inputs, Tensor, checked_inputs, state_block, state_block_v, store_state


@triton.jit
def _recurrent_kernel(
    q, k, v, eta, alpha, beta, h0, o, ht,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C,
    BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):  # fmt: skip
    """One program per (value block, batch·head) walks t = 0 … T−1 holding M = Sᵀ [K, BV] in registers.

    Per token, with M_c the state at the start of t's chunk:
        w = η (v − M_cᵀ k) − β Mᵀ k,   M ← α M + k wᵀ,   o = Mᵀ q.
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ck, cv, m_kv, p_kv, m = state_block(h0, i_v, i_bh, K, V, BK, BV, HAS_H0)  # M [BK, BV]
    m_k, m_v = ck < K, cv < V
    m_c = m
    # per-token pointers, advanced by one token each step (64-bit pointer arithmetic: no int32 overflow in T·H·K)
    p_q = q + i_b.to(tl.int64) * T * H * K + i_h * K + ck  # [BK]
    p_k = k + i_b.to(tl.int64) * T * H * K + i_h * K + ck  # [BK]
    p_v = v + i_b.to(tl.int64) * T * H * V + i_h * V + cv  # [BV]
    p_o = o + i_b.to(tl.int64) * T * H * V + i_h * V + cv  # [BV]
    p_gate = i_b.to(tl.int64) * T * H + i_h
    p_eta, p_alpha, p_beta = eta + p_gate, alpha + p_gate, beta + p_gate
    for t in range(T):
        m_c = tl.where(t % C == 0, m, m_c)  # first token of a chunk: gradients are taken at this state
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
        b_eta = tl.load(p_eta).to(tl.float32)
        b_alpha = tl.load(p_alpha).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)
        b_u = b_v - tl.sum(m_c * b_k[:, None], 0)  # v − M_cᵀ k, [BV]
        b_w = b_eta * b_u - b_beta * tl.sum(m * b_k[:, None], 0)  # [BV]
        m = b_alpha * m + b_k[:, None] * b_w[None, :]  # [BK, BV]
        b_o = tl.sum(m * b_q[:, None], 0)  # [BV]
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        p_q, p_k, p_v, p_o = p_q + H * K, p_k + H * K, p_v + H * V, p_o + H * V
        p_eta, p_alpha, p_beta = p_eta + H, p_alpha + H, p_beta + H
    store_state(ht, m, i_bh, p_kv, m_kv, K, V, STORE_HT)


def recurrent_memory_update(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor | None, chunk_size: int,
    initial_state: Tensor | None = None, output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The rule of ``chunk_memory_update`` one token at a time: for decoding and as a second oracle.

        S_t = S_{t−1} (α_t I − β_t k_t k_tᵀ) + η_t (v_t − S_{c(t)} k_t) k_tᵀ,      o_t = S_t q_t

    (eq. 93 of arXiv:2512.24695 with chunk-start gradients, eq. 90; symbols, shapes, dtypes and checks as in
    ``chunk_memory_update``; ``beta=None`` means β = 0). Forward only: a token-by-token backward needs
    ⟨dS_t, S_{t−1}⟩ for the retention gradient, i.e. every per-token state (T·K·V memory), so training uses
    the chunk kernel, whose backward recomputes chunk-start states. Raises ``ValueError`` when an input
    requires grad while grad mode is on, rather than returning outputs that silently carry no gradient.
    """
    x = checked_inputs(q, k, v, eta, alpha, beta, chunk_size, initial_state, output_final_state)
    if torch.is_grad_enabled():
        needing = [name for name, t in x._asdict().items() if t is not None and t.requires_grad]
        if needing:
            raise ValueError(
                f"recurrent_memory_update is forward-only but {needing} require grad; use chunk_memory_update "
                "for training or call it under torch.no_grad()"
            )
    return recurrent_fwd(x, chunk_size, output_final_state)


def recurrent_fwd(x: Inputs, chunk_size: int, output_final_state: bool) -> tuple[Tensor, Tensor | None]:
    """Host side of ``recurrent_memory_update`` (inputs already checked): allocate and launch."""
    batch, seq_len, heads, key_dim, value_dim = x.dims
    o = torch.empty(x.v.shape, device=x.v.device, dtype=x.v.dtype)
    final = None
    if output_final_state:
        final = torch.empty(batch, heads, key_dim, value_dim, device=x.q.device, dtype=torch.float32)
    bk, bv = state_block_v(key_dim, value_dim)
    _recurrent_kernel[(triton.cdiv(value_dim, bv), batch * heads)](
        *x[:6], x.initial_state, o, final, seq_len, heads, key_dim, value_dim, chunk_size,
        BK=bk, BV=bv, HAS_H0=x.initial_state is not None, STORE_HT=output_final_state,
    )  # fmt: skip
    return o, final
