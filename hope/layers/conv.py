"""Causal depthwise convolution that carries its last inputs, so a stream fed in pieces (or one token at a
time) gives exactly what one call gives.

Legend: B batch, T time, D channels, W kernel width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _ShiftedConv(torch.autograd.Function):
    """y_t = b + Σ_j w_j ⊙ p_{t+j} over a left-padded input p `[B, W−1+T, D]`, as W shifted multiply-adds.

    On CPU this is several times faster than a grouped `conv1d` for short pieces, and the hand-written
    backward accumulates the input gradient in one buffer (autograd would allocate one per shifted slice).
    """

    @staticmethod
    def forward(ctx, padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        W = weight.shape[-1]
        T = padded.shape[1] - W + 1
        y = bias + padded[:, W - 1 :] * weight[:, W - 1]
        for j in range(W - 1):
            y = y.addcmul_(padded[:, j : j + T], weight[:, j])  # [B, T, D]
        ctx.save_for_backward(padded, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        padded, weight = ctx.saved_tensors
        W = weight.shape[-1]
        T = grad.shape[1]
        grad_padded = torch.zeros_like(padded) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for j in range(W):
            if grad_padded is not None:
                grad_padded[:, j : j + T].addcmul_(grad, weight[:, j])
            if grad_weight is not None:
                grad_weight[:, j] = (grad * padded[:, j : j + T]).sum(dim=(0, 1))
        grad_bias = grad.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
        return grad_padded, grad_weight, grad_bias


class CausalConv(nn.Module):
    """`y_t = b + Σ_{j<W} w_j ⊙ x_{t−W+1+j}` per channel (the "local convolution, window 4" of eq. 97's text).

    ```
    cache [B, W−1, D] ─┐
                       cat ─► [B, W−1+T, D] ─► W shifted multiply-adds ─► y [B, T, D]
    x [B, T, D] ───────┘                └─► last W−1 rows ─► new cache
    ```
    An absent cache is zeros (the stream starts with W−1 zero inputs).
    """

    def __init__(self, channels: int, width: int = 4) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"conv width must be >= 1, got {width}")
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))
        self.bias = nn.Parameter(torch.empty(channels))
        self.init_weights()

    def init_weights(self) -> None:
        """weight `[D, W]`: U(−1/√W, 1/√W) (PyTorch's Conv1d default for fan-in W); bias: zeros."""
        bound = 1 / math.sqrt(self.width)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        if cache is None:
            cache = x.new_zeros(B, self.width - 1, D)
        elif tuple(cache.shape) != (B, self.width - 1, D):
            raise ValueError(f"conv cache must be [B, W−1, D] = {[B, self.width - 1, D]}, got {list(cache.shape)}")
        padded = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, W−1+T, D]
        y = _ShiftedConv.apply(padded, self.weight.to(x.dtype), self.bias.to(x.dtype))  # [B, T, D]
        return y, padded[:, padded.shape[1] - (self.width - 1) :]
