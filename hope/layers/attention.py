"""Causal softmax attention with RoPE and a KV cache: the core of Transformer++ and Hope-Attention.

Legend: B batch, T new tokens, S cached tokens, H heads, K head width, D model width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import register_dataclass

from hope.config import HopeConfig
from hope.layers.mlp import residual_std


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[T, dim/2]` for absolute `positions` `[T]` (computed in fp32 on the fly)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, K/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :K/2], x[..., K/2:]) of `x` `[B, H, T, K]` by the position angles."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


@torch.compiler.disable  # reads a value: eager inside a compiled model
def first_position(pos: torch.Tensor) -> int:
    """The stream position of the batch's first row `pos[0]` (0 for an empty batch)."""
    return int(pos[0]) if pos.numel() else 0


@dataclass
class KVCache:
    """The attention core's state: stream position `[B]` and the rotated keys and values seen so far
    `[B, H, S, K]`."""

    pos: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def to_flat(self) -> dict[str, torch.Tensor]:
        return {"pos": self.pos, "k": self.k, "v": self.v}

    @classmethod
    def from_flat(cls, saved: dict[str, torch.Tensor]) -> KVCache:
        return cls(saved["pos"], saved["k"], saved["v"])


register_dataclass(KVCache)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with rotary positions and an explicit KV-cache state.

    ```
    x [B,T,D] ─► W_qkv ─► q,k,v [B,H,T,K] ─► RoPE(q,k @ pos..pos+T) ─┐
    state.k, state.v [B,H,S,K] ─────────────────── concat ───────────┴─► SDPA (causal) ─► W_o ─► y [B,T,D]
                                                        └─► new state: k, v [B,H,S+T,K], pos + T
                                                       (`bound`: the last `kv_cache` tokens between calls)
    ```

    `config.kv_cache` bounds the state kept between the model's calls (`bound`, which `HopeLM` applies at the end
    of every call, not between the CMS segments inside one): only the keys and values of the last `kv_cache`
    tokens are kept, in their own storage (not a view of the call's concatenation). Inside a call every new token
    attends causally to the whole call plus the cache it received, and RoPE positions stay absolute. The memory
    therefore depends on how a stream is cut into calls: calls of L tokens with `kv_cache = L` give
    Transformer-XL with memory length L (token t sees tokens s ≤ t with s ≥ (⌊t/L⌋ − 1)·L), one token per call
    gives a sliding window of `kv_cache` tokens. With `kv_cache = None` the cache grows with the stream and
    pieces give what one call gives.
    """

    State = KVCache

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.kv_cache = config.kv_cache
        # second-order CMS writes differentiate the attention's backward: the fused CPU/GPU kernels have no
        # double backward, PyTorch's math attention has (used in training only)
        self.twice_differentiable = config.cms_second_order
        self.init_std = config.init_std
        self.out_std = residual_std(config.init_std, config.n_layers)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """qkv: N(0, init_std²); out: N(0, (init_std/sqrt(2·n_layers))²)."""
        nn.init.normal_(self.qkv.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.out_std)

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, K]
        if state is None:
            pos = torch.zeros(B, dtype=torch.long, device=x.device)
            k_cache = v_cache = None
            start = 0
        else:
            pos, k_cache, v_cache = state.pos, state.k, state.v
            start = first_position(pos)
        cos, sin = rope_cos_sin(torch.arange(start, start + T, device=x.device), self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k_cache is not None and k_cache.shape[2] > 0:
            k = torch.cat((k_cache, k), dim=2)  # [B, H, S+T, K]
            v = torch.cat((v_cache, v), dim=2)
        S = k.shape[2] - T
        math_only = self.twice_differentiable and self.training and torch.is_grad_enabled()
        with sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext():
            if S == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                mask = torch.ones(T, S + T, dtype=torch.bool, device=x.device).tril(diagonal=S)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.out(y.transpose(1, 2).reshape(B, T, D))
        return y, KVCache(pos + T, k, v)

    def bound(self, state: KVCache | None) -> KVCache | None:
        """The state kept between calls: the last `kv_cache` tokens' keys and values, each in storage of its own
        size (`state` itself when `kv_cache` is None).

        A slice is cloned, not kept as a view (nor made `.contiguous()`, which returns the view itself when it is
        already contiguous, e.g. B·H = 1): a view would keep the whole [B, H, S+T, K] concatenation alive between
        calls. A `v` that is still a view of the qkv projection (q, k and v side by side; no cache was joined) is
        cloned too.
        """
        if self.kv_cache is None or state is None:
            return state
        n, k, v = self.kv_cache, state.k, state.v
        if k.shape[2] > n:
            k, v = (t[:, :, -n:].clone(memory_format=torch.contiguous_format) for t in (k, v))
        elif v._base is not None:
            v = v.clone(memory_format=torch.contiguous_format)
        return KVCache(state.pos, k, v)
