"""Titans neural long-term memory (LMM), the Titans baseline core (arXiv:2501.00663 §3, §4.4; paper_notes §3.1).

Legend: B batch, T time, D model width, H heads, K head width, F memory hidden width, C chunk.

Titans' memory update (eqs. 13–14) `M_t = (1 − a_t) M_{t−1} + S_t, S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; x_t)` is the
rule of `hope.memory` with plain GD (β = 0), retention α_t = 1 − a_t, momentum γ_t = η_t (Titans' name) and
learning rate θ_t (our η_t), gradients at the chunk-start weights (Titans eqs. 16–18).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import register_dataclass

from hope import ops
from hope.config import HopeConfig
from hope.layers.conv import CausalConv
from hope.layers.self_modifying import MemoryCore, MemoryOutput, check_input, retention_bias, stream_position
from hope.memory.state import DeepState, flat, unflat

Tensor = torch.Tensor


@dataclass
class TitansState:
    """The Titans core's state: stream position `[B]`, the deep memory, and the convolution's cache (None
    before the first call)."""

    pos: Tensor
    mem: DeepState
    conv: Tensor | None = None

    def to_flat(self) -> dict[str, Tensor]:
        """Keys "pos", "conv", "mem.<w2|w1|m2|m1>", "mem.<w2|w1>_start" (the saved-state format)."""
        out = {"pos": self.pos, **flat(self.mem, "mem")}
        return out if self.conv is None else {**out, "conv": self.conv}

    @classmethod
    def from_flat(cls, saved: dict[str, Tensor]) -> TitansState:
        return cls(saved["pos"], unflat(DeepState, saved, "mem"), saved.get("conv"))


register_dataclass(TitansState)


class TitansCore(MemoryCore):
    """Titans LMM core: fixed projections, a deep MLP memory trained in context by GD + momentum + retention.

    ```
    x [B,T,D] ─► W_qkv ─► CausalConv(W) ─► SiLU ─┬─► ℓ2 ─► q ─────────────────────────────┐
         state.conv ◄─────────────┘              ├─► ℓ2 ─► k ──┐                          │
                                                 └─────► v ────┤                          │
    x ─► W_gate ─► σ ─► α (retention), θ = (1−γ)η_max/C·σ, γ (momentum) ─┤                │
                                                                         ▼                ▼
         state.mem    ⇄ M(z) = z + W₁σ(W₂z): write ½‖M(k) − v‖² by GD + momentum, then read M_t(q_t)
                                                                         │
    x ─► W_g ─► SiLU ─────────────────────────────────────── (⊙) ◄─ per-head RMSNorm ◄─ o [B,T,H,K]
                                                              └─► W_o ─► y [B,T,D]
    ```
    Uses from `MemoryConfig`: chunk_size, hidden_mult, activation, eta_max, conv_width. The memory is always
    deep and the rule always GD with momentum (that is what defines the baseline); erase, momentum,
    objective, mem_depth, proj_* and the target flags are HOPE's knobs and are ignored. With GD the steps of a
    chunk add up (the S_c factor is I − Σ_t θ_t k_t k_tᵀ), so θ_t ≤ η_max/C keeps a chunk's total step ≤ η_max.
    The learning rate is θ_t = (1 − γ_t) · η_max/C · σ(·): momentum multiplies a write's total effect by up to
    1/(1 − γ_t), and inside a chunk, where every gradient is taken at the chunk-start weights, nothing corrects
    it. With θ_t = η_max/C · σ(·) and γ_t → 0.998 a Titans LM trained for 150 steps (context 512, lr 1e-3) wrote
    its memory ~20× larger in one chunk and overflowed within five chunks (NaN loss). The (1 − γ_t) factor keeps a
    write's total gain at most η_max/C, whatever the momentum (Titans eq. 14 leaves θ_t's form free).
    State: `TitansState`.
    """

    State = TitansState

    def __init__(self, config: HopeConfig) -> None:
        super().__init__(config)
        if self.mc.retain_toward != "zero":
            raise ValueError("the Titans core's memory is deep and retains toward zero: MemoryConfig.retain_toward="
                             f"{self.mc.retain_toward!r} is for the self-modifying core's linear memories")
        D, H, K = config.d_model, self.n_heads, self.head_dim
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.conv = CausalConv(3 * D, self.mc.conv_width)
        self.gates = nn.Linear(D, 3 * H)  # [α | θ | γ] pre-activations per head
        self.mem_w2 = nn.Parameter(torch.empty(H, K, self.hidden))
        self.mem_w1 = nn.Parameter(torch.empty(H, self.hidden, K))
        self.output = MemoryOutput(config)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialisation of every parameter:

        - qkv: N(0, init_std²); conv: see `CausalConv.init_weights`; output: see `MemoryOutput.init_weights`.
        - gates: weight N(0, init_std²); bias [α | θ | γ] = [`retention_bias` (horizons 16…`max_horizon` tokens) | 0 |
          2.2 (γ ≈ 0.9)].
        - mem_w2 (W₂ᵀ of the initial memory): N(0, 1/K); mem_w1 (W₁ᵀ): N(0, init_std²), so M(z) ≈ z at the start.
        """
        H, K, std = self.n_heads, self.head_dim, self.config.init_std
        nn.init.normal_(self.qkv.weight, std=std)
        self.conv.init_weights()
        self.output.init_weights()
        nn.init.normal_(self.gates.weight, std=std)
        with torch.no_grad():
            alpha = retention_bias(H, self.mc.max_horizon)
            self.gates.bias.copy_(torch.cat([alpha, torch.zeros(H), torch.full((H,), 2.2)]))
        nn.init.normal_(self.mem_w2, std=K**-0.5)
        nn.init.normal_(self.mem_w1, std=std)

    def init_state(self, batch: int) -> TitansState:
        """A fresh stream: position 0, empty conv cache, the memory at its meta-learned initial weights."""
        w2, w1 = self.mem_w2.expand(batch, *self.mem_w2.shape), self.mem_w1.expand(batch, *self.mem_w1.shape)
        return TitansState(torch.zeros(batch, dtype=torch.long, device=w2.device), DeepState(w2, w1, w2, w1))

    def forward(self, x: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        check_input(x, self.config.d_model)
        B, T, _ = x.shape
        H, K, C = self.n_heads, self.head_dim, self.mc.chunk_size
        state = self.init_state(B) if state is None else state
        pos = stream_position(state, B)
        qkv, conv_cache = self.conv(self.qkv(x), state.conv)
        q, k, v = F.silu(qkv).view(B, T, 3, H, K).unbind(2)  # [B, T, H, K]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        a, lr, mom = torch.sigmoid(self.gates(x)).view(B, T, 3, H).unbind(2)  # [B, T, H]
        eta = self.mc.eta_max / C * lr * (1 - mom)  # θ_t: see the class docstring
        o, mem = ops.deep_memory(q, k, v, eta, a, None, C, state.mem, pos % C, gamma=mom, objective="l2",
                                 act=self.mc.activation)  # [B, T, H, K]
        return self.output(o.to(x.dtype), x), TitansState(state.pos + T, mem, conv_cache)
