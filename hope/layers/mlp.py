"""SwiGLU MLP whose weights may be per-sample fast weights (a CMS level reads them from its state).

Legend: B batch, T time, D model width, F hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """`(silu(x W_gate) ⊙ x W_up) W_down` with weights either shared `[D, F]` or per sample `[B, D, F]`."""
    h = F.silu(x @ w_gate) * (x @ w_up)  # [B, T, F]
    return h @ w_down  # [B, T, D]


class SwiGLU(nn.Module):
    """SwiGLU feed-forward block (Shazeer 2020). Weights are stored input-major (`[D, F]`, `[F, D]`) so that a
    batch of per-sample copies `[B, D, F]` multiplies the same way."""

    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02, out_std: float | None = None) -> None:
        super().__init__()
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        self.w_gate = nn.Parameter(torch.empty(d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(hidden, d_model))
        self.init_weights()

    def weights(self) -> dict[str, torch.Tensor]:
        return {"w_gate": self.w_gate, "w_up": self.w_up, "w_down": self.w_down}

    def forward(self, x: torch.Tensor, fast: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = self.weights() if fast is None else fast
        return swiglu(x, w["w_gate"], w["w_up"], w["w_down"])

    def init_weights(self) -> None:
        """w_gate, w_up: N(0, init_std²); w_down: N(0, out_std²) (the residual-branch scaling of GPT-2)."""
        nn.init.normal_(self.w_gate, std=self.init_std)
        nn.init.normal_(self.w_up, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.out_std)


def residual_std(init_std: float, n_layers: int) -> float:
    """Std of the projections that write into the residual stream: init_std / sqrt(2·n_layers)."""
    return init_std / math.sqrt(2 * n_layers)
