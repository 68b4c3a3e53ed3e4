"""Chunk-parallel Triton kernel of the inner-loop memory update: autograd.Function and public function.

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk (``chunk_size``).
"""

import torch

from .chunk_bwd import chunk_bwd
from .chunk_fwd import chunk_fwd
from .common import Inputs, Tensor, Tiling, checked_inputs, plan_tiles


class ChunkMemoryUpdateFunction(torch.autograd.Function):
    """Forward saves only the inputs; backward recomputes tile-start states and pseudo-values (README.md)."""

    @staticmethod
    def forward(ctx, tiling: Tiling, output_final_state: bool, *inputs: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``inputs``: the fields of `Inputs` (q, k, v, eta, alpha, beta, initial_state)."""
        o, final_state = chunk_fwd(Inputs(*inputs), tiling, output_final_state)
        ctx.save_for_backward(*inputs)
        ctx.tiling = tiling
        return o, final_state

    @staticmethod
    def backward(ctx, do: Tensor, dht: Tensor | None) -> tuple[Tensor | None, ...]:
        # autograd may hand over broadcast (stride-0) gradients, e.g. from o.sum(): the kernels need dense ones
        dht = None if dht is None else dht.contiguous()
        grads = chunk_bwd(Inputs(*ctx.saved_tensors), ctx.tiling, do.contiguous(), dht)
        return None, None, *grads  # dq, dk, dv, deta, dalpha, dbeta, d initial_state


def chunk_memory_update(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor | None, chunk_size: int,
    initial_state: Tensor | None = None, output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Linear-memory DGD update with chunk-start gradients, chunk-parallel (forward and backward in Triton).

    Per head, with Sᵀ stored as the state and c(t) the last token of the previous chunk (chunks of
    ``chunk_size`` tokens aligned at t = 0; S_{c(t)} is the state at the start of t's chunk):

        S_t = S_{t−1} (α_t I − β_t k_t k_tᵀ) + η_t (v_t − S_{c(t)} k_t) k_tᵀ,      o_t = S_t q_t

    i.e. eq. 93 of arXiv:2512.24695 (eq. 88's Delta Gradient Descent on ½‖S k − v‖² with the gradient taken
    at the chunk-start state, eq. 90) with the erase strength β_t separated from the learning rate η_t
    (β = η is DGD as printed, β = 0 plain GD with retention; docs/design.md §3). The read comes after the write.

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
    x = checked_inputs(q, k, v, eta, alpha, beta, chunk_size, initial_state, output_final_state)
    return ChunkMemoryUpdateFunction.apply(plan_tiles(q.shape[1], chunk_size), output_final_state, *x)
