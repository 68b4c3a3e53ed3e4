"""Chunk-parallel Triton kernel of the inner-loop memory update: autograd.Function and public function.

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk (``chunk_size``).
"""

import torch

from kernels.chunk_bwd import chunk_bwd
from kernels.chunk_fwd import chunk_fwd
from kernels.common import Tiling, check_inputs, plan_tiles


class ChunkMemoryUpdateFunction(torch.autograd.Function):
    """Forward saves only the inputs; backward recomputes tile-start states and pseudo-values (kernels/README.md)."""

    @staticmethod
    def forward(
        ctx,
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
        o, final_state = chunk_fwd(q, k, v, eta, alpha, beta, tiling, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, eta, alpha, beta, initial_state)
        ctx.tiling = tiling
        return o, final_state

    @staticmethod
    def backward(ctx, do: torch.Tensor, dht: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q, k, v, eta, alpha, beta, initial_state = ctx.saved_tensors
        # autograd may hand over broadcast (stride-0) gradients, e.g. from o.sum(): the kernels need dense ones
        dht = None if dht is None else dht.contiguous()
        grads = chunk_bwd(q, k, v, eta, alpha, beta, ctx.tiling, initial_state, do.contiguous(), dht)
        dq, dk, dv, deta, dalpha, dbeta, dh0 = grads
        return dq, dk, dv, deta, dalpha, dbeta, None, dh0, None


def chunk_memory_update(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear-memory DGD update with chunk-start gradients, chunk-parallel (forward and backward in Triton).

    Per head, with Sᵀ stored as the state and c(t) the last token of the previous chunk (chunks of
    ``chunk_size`` tokens aligned at t = 0; S_{c(t)} is the state at the start of t's chunk):

        S_t = S_{t−1} (α_t I − β_t k_t k_tᵀ) + η_t (v_t − S_{c(t)} k_t) k_tᵀ,      o_t = S_t q_t

    i.e. eq. 93 of arXiv:2512.24695 (eq. 88's Delta Gradient Descent on ½‖S k − v‖² with the gradient taken
    at the chunk-start state, eq. 90) with the erase strength β_t separated from the learning rate η_t
    (β = η is DGD as printed, β = 0 plain GD with retention; DESIGN.md §3). The read comes after the write.

    ======  ================  ====================================================================
    symbol  argument          meaning
    ======  ================  ====================================================================
    q_t     q [B, T, H, K]    query read from the memory after the write
    k_t     k [B, T, H, K]    key (the paper L2-normalises it; not required here)
    v_t     v [B, T, H, V]    regression target (v̂ in the paper)
    η_t     eta [B, T, H]     inner learning rate
    α_t     alpha [B, T, H]   retention, in (0, 1] (its logarithm is taken: α ≤ 0 gives NaN)
    β_t     beta [B, T, H]    erase strength of the (α I − β k kᵀ) factor; None means 0
    C       chunk_size        tokens per chunk; gradients inside a chunk use S_{c(t)}
    S_0ᵀ    initial_state     [B, H, K, V] fp32, zeros when None
    ======  ================  ====================================================================

    Returns ``(o, final_state)``: o [B, T, H, V] in the dtype of v, final_state = S_Tᵀ [B, H, K, V] fp32
    when ``output_final_state`` else None. Inputs fp32/fp16/bf16 (gates may be fp32), all math in fp32,
    any T, K and V ≤ 256, contiguous tensors on one CUDA device (or CPU under ``TRITON_INTERPRET=1``).
    Gradients flow to q, k, v, eta, alpha, beta and initial_state; the backward recomputes the chunk-start
    states, so saved memory is the inputs only.
    """
    if beta is None and isinstance(eta, torch.Tensor):
        beta = torch.zeros_like(eta)  # plain GD; the kernels always read a β
    check_inputs(q, k, v, eta, alpha, beta, chunk_size, initial_state, output_final_state)
    tiling = plan_tiles(q.shape[1], chunk_size)
    return ChunkMemoryUpdateFunction.apply(q, k, v, eta, alpha, beta, tiling, initial_state, output_final_state)
