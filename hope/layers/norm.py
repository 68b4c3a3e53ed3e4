"""RMSNorm (Zhang & Sennrich 2019) with a learned gain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`y = x / rms(x) · g` over the last dimension; computed in fp32 (fp64 for fp64 input), returned in the
    input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps).to(x.dtype)

    def init_weights(self) -> None:
        """weight: ones."""
        nn.init.ones_(self.weight)
