"""Typed states of the memories in a stream (what `hope.ops.memory_stream` and `hope.ops.deep_memory` carry).

Legend: B batch, H heads, K key width, V value width, F hidden width.

Both are pytrees (`torch.utils._pytree`), so `tree_map` detaches, clones or moves them like a dict of tensors.
Weights are stored input-major (transposed), as everywhere in `hope.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils._pytree import register_dataclass

Tensor = torch.Tensor


@dataclass
class LinearState:
    """A linear memory fed in pieces: Sᵀ now, Sᵀ at the start of the current chunk (where the inner gradients
    of the chunk's tokens are taken), and the momentum Zᵀ when momentum is on. Each `[B, H, K, V]`."""

    S: Tensor
    S_start: Tensor
    Z: Tensor | None = None


@dataclass
class DeepState:
    """A deep memory `z + W₁σ(W₂z)` fed in pieces: W₂ᵀ `[B, H, K, F]`, W₁ᵀ `[B, H, F, K]`, their values at the start
    of the current chunk, and the momentum memories (same shapes) when momentum is on."""

    w2: Tensor
    w1: Tensor
    w2_start: Tensor
    w1_start: Tensor
    m2: Tensor | None = None
    m1: Tensor | None = None

    def weights(self) -> dict[str, Tensor]:
        """The current weights and momenta, without the chunk-start copies: {"w2", "w1"[, "m2", "m1"]}."""
        out = {"w2": self.w2, "w1": self.w1}
        if self.m2 is not None:
            out.update(m2=self.m2, m1=self.m1)
        return out


def flat(state: LinearState | DeepState, prefix: str) -> dict[str, Tensor]:
    """`{prefix.field: tensor}` of the fields that are set (the saved-state format, version 1)."""
    return {f"{prefix}.{f.name}": getattr(state, f.name) for f in fields(state) if getattr(state, f.name) is not None}


def unflat(cls: type[LinearState] | type[DeepState], saved: dict[str, Tensor], prefix: str):
    """Inverse of `flat`: the fields of `cls` read from `saved[prefix.field]` (absent optional fields are None)."""
    return cls(**{f.name: saved.get(f"{prefix}.{f.name}") for f in fields(cls)})


register_dataclass(LinearState)
register_dataclass(DeepState)
