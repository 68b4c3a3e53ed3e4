"""Causal depthwise convolution that carries its last inputs, so a stream fed in pieces (or one token at a
time) gives exactly what one call gives.

Legend: B batch, T time, D channels, W kernel width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CausalConv(nn.Module):
    """`y_t = b + Σ_{j<W} w_j ⊙ x_{t−W+1+j}` per channel (the "local convolution, window 4" of eq. 97's text).

    ```
    cache [B, W−1, D] ─┐
                       cat ─► [B, W−1+T, D] ─► depthwise conv (valid) ─► y [B, T, D]
    x [B, T, D] ───────┘                └─► last W−1 rows ─► new cache
    ```
    An absent cache is zeros (the stream starts with W−1 zero inputs).
    """

    def __init__(self, channels: int, width: int = 4) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"conv width must be >= 1, got {width}")
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.empty(channels))
        self.init_weights()

    def init_weights(self) -> None:
        """weight: U(−1/√W, 1/√W) (PyTorch's Conv1d default for fan-in W); bias: zeros."""
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
        # W shifted multiply-adds: on CPU several times faster than a grouped conv1d (forward and backward),
        # most of all for the short pieces a stream is fed in
        w = self.weight[:, 0]  # [D, W]
        y = self.bias + padded[:, self.width - 1 :] * w[:, -1]
        for j in range(self.width - 1):
            y = y + padded[:, j : j + T] * w[:, j]  # [B, T, D]
        return y, padded[:, padded.shape[1] - (self.width - 1) :]
