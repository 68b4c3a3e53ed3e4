"""Self-modifying Titans: HOPE's sequence core (docs/design.md §4, arXiv:2512.24695 eqs. 83–97).

Legend: B batch, T time, D model width, H heads, K head width, F deep-memory hidden width, C chunk,
P read width of the linear projection memory (K per vector memory, 1 per scalar read-out).

Every memory is trained in context by the rule of `hope.memory` (DGD by default, eq. 88) and starts each
stream from a meta-learned initial state (a parameter), so the outer optimizer learns how each memory
should start; gradients flow through every write.

Speed (`python -m hope.memory.bench core --threads 1 [--segment 16]`; 2-core AVX2 CPU shared with other jobs,
load 6–9, so ratios moved by ±0.1 between runs; fwd+bwd, B=8 T=512 D=256 H=4 fp32, attention = q/k/v/o
projections + causal SDPA; ratio = attention time / core time, from medians and minima, 2026-11-23):

    MemoryConfig                          whole sequence     16-token pieces (HopeLM, CMS period 16)
    proj_chunk_size=16, chunk_size=64     0.41–0.49          0.37–0.51
    proj_chunk_size=32, chunk_size=32     0.42–0.56          0.35–0.46
    proj_chunk_size=16, chunk_size=16     0.44–0.49          0.39–0.53
    mem_depth="deep" / both deep          0.34–0.39 / 0.20–0.22
    Titans core (deep, C=64)              0.31–0.37

Compiled (`HopeLM.compile_cores`; `python -m hope.memory.bench core --threads 2 --compile`, quiet 2-core Intel Xeon,
2026-12-06; whole sequence, default MemoryConfig): 0.48 of the attention reference's speed, against 0.25 eager in
the same run (compiling the attention reference itself changes it by −6%).

Defaults: linear memories (deep ones cost 1.3–2.3×), projection chunks of 16 (HopeLM calls the core on
16-token pieces, where 16 is fastest; 32 wins on whole sequences) and M_mem chunks of 64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import register_dataclass

from hope import ops
from hope.config import HopeConfig
from hope.layers.attention import first_position
from hope.layers.conv import CausalConv
from hope.layers.mlp import residual_std
from hope.memory.bounds import cuts
from hope.memory.state import DeepState, LinearState, flat, unflat

Tensor = torch.Tensor
DEEP_NAMES = ("k", "v", "q", "eta", "alpha")  # the projection memories that can be deep, in state order


@dataclass
class SelfModifyingState:
    """The self-modifying core's state: stream position `[B]`, the linear projection memory (Sᵀ with columns
    [k | v | (q) | η | α], those of the linear memories), the main memory M_mem (linear or deep), the deep
    projection memories by name ("k", "v", "q" with `proj_depth="deep"`, "eta", "alpha" with `gate_depth="deep"`),
    and the convolution's cache (None before the first call)."""

    pos: Tensor
    proj: LinearState
    mem: LinearState | DeepState
    proj_deep: dict[str, DeepState] = field(default_factory=dict)
    conv: Tensor | None = None

    def to_flat(self) -> dict[str, Tensor]:
        """Keys "pos", "conv", "proj.S[_start]", "proj_<k|v|q|eta|alpha>.<w2|w1>[_start]", "mem.<S|S_start|Z>" or
        "mem.<w2|w1|m2|m1|w2_start|w1_start>" (the saved-state format)."""
        out = {"pos": self.pos, **flat(self.proj, "proj"), **flat(self.mem, "mem")}
        for name, deep in self.proj_deep.items():
            out.update(flat(deep, f"proj_{name}"))
        return out if self.conv is None else {**out, "conv": self.conv}

    @classmethod
    def from_flat(cls, saved: dict[str, Tensor]) -> SelfModifyingState:
        mem = unflat(LinearState if "mem.S" in saved else DeepState, saved, "mem")
        names = [n for n in DEEP_NAMES if f"proj_{n}.w2" in saved]
        deep = {n: unflat(DeepState, saved, f"proj_{n}") for n in names}
        return cls(saved["pos"], unflat(LinearState, saved, "proj"), mem, deep, saved.get("conv"))


register_dataclass(SelfModifyingState)


@torch.compiler.disable  # reads a value: eager inside a compiled core (the core is specialised per position)
def stream_position(state: SelfModifyingState, batch: int) -> int:
    """The common stream position of the batch (rows must advance together: chunk boundaries are shared)."""
    pos = state.pos
    if tuple(pos.shape) != (batch,):
        raise ValueError(f"state.pos must be an int64 [B={batch}] tensor, got shape {list(pos.shape)}")
    if batch > 1 and not bool((pos == pos[0]).all()):
        raise ValueError(f"every row of a batch must be at the same stream position, got {pos.tolist()}")
    return first_position(pos)


def check_input(x: object, d_model: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"core input must be a torch.Tensor [B, T, D], got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != d_model or x.shape[1] == 0:
        raise ValueError(f"core input must be [B, T ≥ 1, D={d_model}], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"core input must be floating point, got dtype {x.dtype}")


def retention_bias(n_heads: int, max_horizon: int = 1024) -> Tensor:
    """b_α per head so that sigmoid(b_α) = 1 − 1/τ with memory horizons τ log-spaced in [16, max_horizon] tokens."""
    if max_horizon < 16:
        raise ValueError(f"retention_bias needs max_horizon >= 16 tokens, got {max_horizon!r}")
    tau = torch.logspace(math.log10(16), math.log10(max_horizon), n_heads)
    return torch.log(tau - 1)  # logit(1 − 1/τ)


class MemoryOutput(nn.Module):
    """o `[B, T, H, K]` → per-head RMSNorm → ⊙ SiLU(x W_g) → W_o (Titans §4.4: norm and gate before the output)."""

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        D = config.d_model
        self.eps, self.init_std = config.norm_eps, config.init_std
        self.out_std = residual_std(config.init_std, config.n_layers)
        self.norm_weight = nn.Parameter(torch.empty(D))
        self.gate = nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """norm_weight: ones; gate: N(0, init_std²); out: N(0, (init_std/√(2·n_layers))²)."""
        nn.init.ones_(self.norm_weight)
        nn.init.normal_(self.gate.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.out_std)

    def forward(self, o: Tensor, x: Tensor) -> Tensor:
        B, T, H, K = o.shape
        dtype = torch.promote_types(o.dtype, torch.float32)  # fp32, or fp64 for fp64
        o = F.rms_norm(o.to(dtype), (K,), eps=self.eps).to(x.dtype)  # per head  # [B, T, H, K]
        o = o.reshape(B, T, H * K) * self.norm_weight * F.silu(self.gate(x))  # [B, T, D]
        return self.out(o)  # [B, T, D]


class MemoryCore(nn.Module):
    """What the memory cores share: their config, `MemoryConfig` (`mc`), heads H, head width K and the hidden
    width F of a deep memory."""

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.config, self.mc = config, config.memory
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.hidden = self.mc.hidden(self.head_dim)

    def bound(self, state):
        """The state kept between calls: a memory core's state has a fixed size already."""
        return state


class SelfModifyingCore(MemoryCore):
    """Self-modifying Titans core: every projection is a memory that rewrites itself in context.

    ```
    x [B,T,D] ─► CausalConv(W) ─► SiLU ─► x̃ ─┬─► W_q (or M_q) ─► ℓ2 ─► q ──────────────────┐
        state.conv ◄┘                       │                                             │
                                              └─► M_k, M_v, M_η, M_α  (read at chunk start) │
            state.proj ⇄ (write: regress k_t onto M_□,c(t)(v_t), DGD)                   │
                          k = ℓ2(M_k x̃), v = M_v x̃, η = η_max·σ(M_η x̃ + b_η), α = σ(M_α x̃ + b_α)
                                              │                                             │
                                              ▼                                             ▼
                      state.mem ⇄ M_mem: write (k, v, η, α, β = η) then read o_t = M_mem,t(q_t)
                                              │
    x ─► W_g ─► SiLU ─────────────────────── (⊙) ◄─ per-head RMSNorm ◄─ o [B,T,H,K]
                                              └─► W_o ─► y [B,T,D]
    ```
    Two choices beyond the paper keep the self-referential writes bounded (docs/design.md §3; see `MemoryConfig`):
    self-generated targets read the normalised value, M_□,c(v̄_t) with v̄ = v/‖v‖, and M_mem's momentum writes
    (1 − γ_t)η_t. `tests/test_cores.py::test_long_stream_stays_finite` fails without either.

    The four (five with `adaptive_q`) linear projection memories share keys and gates, so they are one
    linear memory whose read has P = 2K + 2 columns [k | v | (q) | η | α]. With `proj_depth="deep"` M_k, M_v (M_q)
    are residual MLPs, with `gate_depth="deep"` M_η, M_α are 2-layer MLPs (d → 1 per head, no residual). With
    `proj_width="full"` there is one memory of each kind per layer instead of one per head: it reads the whole
    x̃_t (width D) and emits all heads' reads (P = 3D + 2H columns with `adaptive_q`). State: `SelfModifyingState`.
    """

    State = SelfModifyingState

    def __init__(self, config: HopeConfig) -> None:
        super().__init__(config)
        D, H, K = config.d_model, self.n_heads, self.head_dim
        self.vectors = ("k", "v", "q") if self.mc.adaptive_q else ("k", "v")
        self.conv = CausalConv(D, self.mc.conv_width)
        self.q_proj = None if self.mc.adaptive_q else nn.Linear(D, D, bias=False)
        self.momentum_proj = nn.Linear(D, H) if self.mc.momentum else None
        full = self.mc.proj_width == "full"
        # memories per layer and input width of a projection memory; gates emitted per memory (one per head)
        self.proj_heads, self.proj_in, gate = (1, D, H) if full else (H, K, 1)
        gates = ("eta", "alpha")
        self.out_width = {**dict.fromkeys(self.vectors, self.proj_in), **dict.fromkeys(gates, gate)}
        self.linear_names = ((self.vectors if self.mc.proj_depth == "linear" else ())
                             + (gates if self.mc.gate_depth == "linear" else ()))
        self.deep_names = tuple(n for n in DEEP_NAMES if n in self.out_width and n not in self.linear_names)
        width = sum(self.out_width[n] for n in self.linear_names)
        # Sᵀ of the linear projection memories (None when every one is deep)
        self.proj_init = nn.Parameter(torch.empty(self.proj_heads, self.proj_in, width)) if width else None
        self.proj_deep = nn.ParameterDict()
        for name in self.deep_names:
            self.proj_deep[f"{name}_w2"] = nn.Parameter(torch.empty(self.proj_heads, self.proj_in, self.hidden))
            self.proj_deep[f"{name}_w1"] = nn.Parameter(torch.empty(self.proj_heads, self.hidden,
                                                                    self.out_width[name]))
        self.eta_bias = nn.Parameter(torch.empty(H))
        self.alpha_bias = nn.Parameter(torch.empty(H))
        self.mem_init = nn.ParameterDict()
        if self.mc.mem_depth == "linear":
            self.mem_init["S"] = nn.Parameter(torch.empty(H, K, K))
        else:
            self.mem_init["w2"] = nn.Parameter(torch.empty(H, K, self.hidden))
            self.mem_init["w1"] = nn.Parameter(torch.empty(H, self.hidden, K))
        self.output = MemoryOutput(config)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialisation of every parameter:

        - conv: see `CausalConv.init_weights`; output (norm, gate, out): see `MemoryOutput.init_weights`.
        - q_proj: N(0, init_std²). momentum_proj: weight N(0, init_std²), bias 2.2 (γ ≈ 0.9 at the start).
        - proj_init (Sᵀ of the linear projection memories): vector columns [k | v | q] N(0, 1/d_in), so that
          M x̃ starts as a unit-gain random projection; scalar columns [η | α] N(0, init_std²). d_in = K, or D
          with `proj_width="full"`.
        - proj_deep (deep M_k, M_v, M_q, M_η, M_α): w2 N(0, 1/d_in), w1 N(0, init_std²) (M(z) ≈ z for the
          residual M_k, M_v, M_q, and M_η, M_α ≈ 0 like the linear scalar columns at the start).
        - eta_bias: 0 (η = η_max/2 at the start); alpha_bias: `retention_bias` (horizons 16…`max_horizon` tokens).
        - mem_init: linear Sᵀ N(0, init_std²); deep w2 N(0, 1/K), w1 N(0, init_std²).
        """
        std = self.config.init_std
        self.conv.init_weights()
        self.output.init_weights()
        if self.q_proj is not None:
            nn.init.normal_(self.q_proj.weight, std=std)
        if self.momentum_proj is not None:
            nn.init.normal_(self.momentum_proj.weight, std=std)
            nn.init.constant_(self.momentum_proj.bias, 2.2)
        with torch.no_grad():
            if self.proj_init is not None:
                vector_cols = sum(self.out_width[n] for n in self.linear_names if n in self.vectors)
                self.proj_init.normal_(std=std)
                self.proj_init[..., :vector_cols].normal_(std=self.proj_in**-0.5)
            self.eta_bias.zero_()
            self.alpha_bias.copy_(retention_bias(self.n_heads, self.mc.max_horizon))
        for name, p in [*self.proj_deep.items(), *self.mem_init.items()]:
            nn.init.normal_(p, std=p.shape[-2] ** -0.5 if name.endswith("w2") else std)  # w2: [H, d_in, F]

    def init_state(self, batch: int) -> SelfModifyingState:
        """A fresh stream: position 0, empty conv cache, every memory at its meta-learned initial state."""
        expand = lambda p: p.expand(batch, *p.shape)
        device = self.eta_bias.device
        pos = torch.zeros(batch, dtype=torch.long, device=device)
        proj = (expand(self.proj_init) if self.proj_init is not None else
                self.eta_bias.new_zeros(batch, self.proj_heads, self.proj_in, 0))
        deep = {}
        for name in self.deep_names:
            w2, w1 = expand(self.proj_deep[f"{name}_w2"]), expand(self.proj_deep[f"{name}_w1"])
            deep[name] = DeepState(w2, w1, w2, w1)
        if "S" in self.mem_init:
            S = expand(self.mem_init["S"])
            mem = LinearState(S, S, torch.zeros_like(S) if self.mc.momentum else None)
        else:
            w2, w1 = expand(self.mem_init["w2"]), expand(self.mem_init["w1"])
            mem = DeepState(w2, w1, w2, w1)
        return SelfModifyingState(pos, LinearState(proj, proj), mem, deep)

    def forward(self, x: Tensor, state: SelfModifyingState | None = None) -> tuple[Tensor, SelfModifyingState]:
        check_input(x, self.config.d_model)
        B, T, _ = x.shape
        H, K, mc = self.n_heads, self.head_dim, self.mc
        state = self.init_state(B) if state is None else state
        pos = stream_position(state, B)
        check_momentum_state(state.mem, mc.momentum)
        xc, conv_cache = self.conv(x, state.conv)
        xs = F.silu(xc)  # x̃  # [B, T, D]
        q = None if self.q_proj is None else F.normalize(self.q_proj(xs).view(B, T, H, K), dim=-1)  # [B, T, H, K]
        gamma = None if self.momentum_proj is None else torch.sigmoid(self.momentum_proj(x))  # [B, T, H]
        # The PyTorch backend runs a linear M_mem inside the projection sweep, sharing its chunk operators (same
        # k, α, β), on every device; the oracle and the Triton kernel take the whole piece afterwards.
        fused = isinstance(state.mem, LinearState) and ops.resolve_backend(
            mc.backend, x, gamma, self.mem_objective) == "torch"
        xp = xs.view(B, T, self.proj_heads, self.proj_in)  # what each projection memory reads  # [B, T, H|1, K|D]
        reads, proj, proj_deep, mem = self._sweep(xp, q, gamma, state, pos, fused)
        if not fused:
            reads["o"], mem = self._main_memory(reads, q, gamma, state.mem, pos)  # [B, T, H, K]
        new = SelfModifyingState(state.pos + T, proj, mem, proj_deep, conv_cache)
        return self.output(reads["o"].to(x.dtype), x), new

    def _main_memory(self, r: dict[str, Tensor], q: Tensor | None, gamma: Tensor | None,
                     mem: LinearState | DeepState, pos: int) -> tuple[Tensor, LinearState | DeepState]:
        """M_mem over the whole piece (oracle, Triton or a deep M_mem): write (k, v̂) with (η, α, β, γ), then read
        q after the write (eqs. 88–93). `r` holds the sweep's reads `[B, T, H, ·]`."""
        C, mc = self.mc.chunk_size, self.mc
        q = r["q"] if q is None else q
        beta = r["eta"] if mc.erase == "dgd" else None
        eta = r["eta"] if gamma is None else r["eta"] * (1 - gamma)  # see `_mem_chunk`
        v = r["v_in"] if self.mem_objective == "self" else r["v"]
        if isinstance(mem, LinearState):
            return ops.memory_stream(q, r["k"], v, eta, r["alpha"], beta, C, mem, pos % C, mc.backend, gamma=gamma,
                                     objective=self.mem_objective, anchor=self._anchor("mem"))
        return ops.deep_memory(q, r["k"], v, eta, r["alpha"], beta, C, mem, pos % C, gamma=gamma,
                               objective=self.mem_objective, act=mc.activation)

    def _anchor(self, name: str) -> Tensor | None:
        """S₀ᵀ toward which retention pulls the linear memory `name` ("proj": `[H|1, K|D, P]`, "mem": `[H, K, K]`),
        or None when it pulls toward zero (`MemoryConfig.retain_toward`)."""
        if self.mc.retain_toward == "zero":
            return None
        return self.proj_init if name == "proj" else self.mem_init["S"]

    @property
    def mem_objective(self) -> str:
        return "self" if self.mc.self_target_mem else ("l2" if self.mc.mem_depth == "deep" else self.mc.objective)

    def _gates(self, eta_raw: Tensor, alpha_raw: Tensor) -> tuple[Tensor, Tensor]:
        """η = η_max·σ(M_η x̃ + b_η) (bounded, docs/design.md §3), α = σ(M_α x̃ + b_α); raw reads `[B, H, C]`.
        With `negative_eigenvalues` η = η_max·(1 + α)·σ(·), so that α − 2η reaches −1 for every α."""
        eta = self.mc.eta_max * torch.sigmoid(eta_raw + self.eta_bias[:, None])
        alpha = torch.sigmoid(alpha_raw + self.alpha_bias[:, None])
        return (eta * (1 + alpha) if self.mc.negative_eigenvalues else eta), alpha

    def _sweep(self, xh: Tensor, q: Tensor | None, gamma: Tensor | None, state: SelfModifyingState, pos: int,
               fused: bool) -> tuple[dict[str, Tensor], LinearState, dict[str, DeepState], LinearState | None]:
        """Sweep the projection memories over the piece, chunk by chunk (`proj_chunk_size`, aligned to the
        stream): read k, v, η, α (q) of a chunk from the chunk-start states, then write them (eq. 90). With
        `fused`, M_mem (linear) is written and read in the same sweep, in pieces cut at both chunk sizes.
        Returns the reads `[B, T, H, ·]` (and "o" when fused), the new projection memories and, when fused, the new
        M_mem (else None)."""
        Cp, Cm = self.mc.proj_chunk_size, self.mc.chunk_size
        T = xh.shape[1]
        proj, deep, mem = state.proj, state.proj_deep, state.mem if fused else None
        bounds = cuts(T, pos, (Cp, Cm) if fused else (Cp,))
        sizes = [b - a for a, b in bounds]
        pieces = lambda t: [None] * len(bounds) if t is None else t.movedim(1, 2).split(sizes, dim=2)
        outs = []
        for (a, _), x_n, q_n, g_n in zip(bounds, pieces(xh), pieces(q), pieces(gamma)):
            if (pos + a) % Cp == 0:  # a chunk boundary: later reads and inner gradients use the state reached here
                proj, deep = _chunk_start(proj, deep)
            reads, proj, deep, ops_n = self._projection_chunk(x_n, proj, deep, (pos + a) % Cp == 0, q_n, fused)
            if fused:
                reads["o"], mem = self._mem_chunk(ops_n, mem, reads, g_n, (pos + a) % Cm == 0)
            outs.append(reads)
        if (pos + T) % Cp == 0:
            proj, deep = _chunk_start(proj, deep)
        if fused and (pos + T) % Cm == 0:
            mem = LinearState(mem.S, mem.S, mem.Z)
        reads = {n: torch.cat([r[n] for r in outs], dim=2).movedim(2, 1) for n in outs[0]}
        return reads, proj, deep, mem

    def _mem_chunk(self, ops_n, mem: LinearState, r: dict[str, Tensor], gamma: Tensor | None,
                   boundary: bool) -> tuple[Tensor, LinearState]:
        """One piece of the linear M_mem inside the sweep; `boundary`: the piece starts one of M_mem's chunks."""
        beta, eta = (r["eta"] if self.mc.erase == "dgd" else None), r["eta"]
        if gamma is not None:  # the projection memories have no momentum: M_mem needs operators of its own
            ops_n = ops.chunk_operators(r["k"], r["alpha"], beta, r["q"], gamma)
            # momentum writes (1 − γ)η: Z is then an average of the updates, whose step stays η, so the DGD bound
            # holds (with η itself the step grows to η/(1 − γ) and the memory blows up)
            eta = eta * (1 - gamma)
        S, S_start, Z = mem.S, mem.S if boundary else mem.S_start, mem.Z
        v = r["v_in"] if self.mem_objective == "self" else r["v"]
        y, z = ops.write_terms(r["k"], v, eta, self.mem_objective)  # x_t = y_t − S_cᵀ z_t
        A = self._anchor("mem")  # retention toward S₀: the rule on D = S − S₀, read D_t q_t + S₀ q_t
        D = S if A is None else S - A
        if boundary and gamma is None:  # x_t = y_t − S_cᵀz_t = (y_t − S₀ᵀz_t) − D_cᵀz_t
            o, D = ops.linear_chunk(ops_n, D, y if A is None or z is None else ops.chunk_write(y, z, A), z)
        else:
            o, D, Z_new = ops.chunk_step(ops_n, D, ops.chunk_write(y, z, S_start), Z)
            Z = Z if Z_new is None else Z_new
        if A is not None:
            o, D = o + r["q"] @ A, D + A
        return o, LinearState(D, S_start, Z)

    def _projection_chunk(self, x: Tensor, proj: LinearState, deep: dict[str, DeepState], aligned: bool,
                          q: Tensor | None, with_query: bool
                          ) -> tuple[dict[str, Tensor], LinearState, dict[str, DeepState], ops.ChunkOperators | None]:
        """One (partial) chunk x̃ `[B, H, C, K]` (`[B, 1, C, D]` with `proj_width="full"`): reads from the
        chunk-start states, then one chunk of writes. `aligned`: the chunk starts at a boundary, so the current
        states are the chunk-start states. Returns the per-head reads `[B, H, C, ·]`, the new states and M_mem's
        chunk operators with the query q when `with_query` (else None with `proj_width="full"`)."""
        mc, act = self.mc, self.mc.activation
        start = proj.S_start
        raw = {}
        if self.linear_names:  # reads at the chunk start: columns [k | v | (q) | η | α] of the linear memories
            widths = [self.out_width[n] for n in self.linear_names]
            raw.update(zip(self.linear_names, (x @ start).split(widths, dim=-1)))
        for name in self.deep_names:
            d = deep[name]
            raw[name] = ops.mlp(x, d.w2_start, d.w1_start, act, name in self.vectors)  # [B, H|1, C, ·]
        reads = {name: self._per_head(name, t) for name, t in raw.items()}
        k = F.normalize(reads["k"], dim=-1)
        v = reads["v"]
        # A self-generated target reads the normalised value M_c(v̄), v̄ = v/‖v‖: along k a write then multiplies
        # the memory by α − β − η + η kᵀv̄, which stays in [−1, 1] under the bound of docs/design.md §3; with the raw v
        # the factor grows with kᵀv and the self-referential memories blow up (`target_norm=False` is that reading).
        v_in = F.normalize(v, dim=-1) if mc.target_norm else v
        q = F.normalize(reads["q"], dim=-1) if "q" in self.vectors else q
        eta, alpha = self._gates(reads["eta"], reads["alpha"])  # [B, H, C]
        beta = eta if mc.erase == "dgd" else None
        ops_q = ops.chunk_operators(k, alpha, beta, q if with_query else None) if with_query or not self.full else None
        if self.full:  # one memory per projection: the full-width key and value, the head means of η and α
            km = k.transpose(1, 2).flatten(-2)[:, None] * self.n_heads**-0.5  # [k_1 … k_H]/√H  # [B, 1, C, D]
            vm = v.transpose(1, 2).flatten(-2)[:, None]  # [B, 1, C, D]
            vm = F.normalize(vm, dim=-1) if mc.target_norm else vm
            eta_m, alpha_m = eta.mean(1, keepdim=True), alpha.mean(1, keepdim=True)  # [B, 1, C]
            ops_k = ops.chunk_operators(km, alpha_m, eta_m if mc.erase == "dgd" else None)
        else:
            km, vm, eta_m, alpha_m = k, v_in, eta, alpha
            ops_k = ops_q._replace(q_decay=None, attn=None)  # the projection memories are written, never read here
        new_S = proj.S
        if self.linear_names:
            vector_cols = sum(self.out_width[n] for n in self.linear_names if n in self.vectors)
            plain = not mc.self_targets and vector_cols > 0
            A = self._anchor("proj")  # retention toward S₀: the rule on D = S − S₀, writes taken at the whole S_c
            D = proj.S if A is None else proj.S - A
            # self-generated targets M_□,c(v): u = M_c(v) − M_c(k) = (v − k) S_c for a linear memory (eq. 93)
            if aligned and not plain:
                z = eta_m[..., None] * (km - vm)  # x_t = −z_t S_c = −z_t S₀ − z_t D_c
                _, new_S = ops.linear_chunk(ops_k, D, None if A is None else -(z @ A), z)
            else:
                write = -(km - vm) @ start  # [B, H, C, P]
                if plain:  # u = v̄ − S_c k for M_k, M_v, M_q; the scalar read-outs keep their self-generated targets
                    n_vec = vector_cols // self.proj_in
                    write = torch.cat([vm.repeat(1, 1, 1, n_vec) - km @ start[..., :vector_cols],
                                       write[..., vector_cols:]], dim=-1)
                _, new_S, _ = ops.chunk_step(ops_k, D, eta_m[..., None] * write)
            new_S = new_S if A is None else new_S + A
        new_deep = {}
        for name in self.deep_names:
            d, residual = deep[name], name in self.vectors
            w0 = {"w2": d.w2_start, "w1": d.w1_start}
            # the scalar read-outs always regress onto their self-generated targets (a width-D v̄ is no gate value)
            own = mc.self_targets or not residual
            target = ops.mlp(vm, d.w2_start, d.w1_start, act, residual) if own else vm
            _, w = ops.deep_write(ops_k, {"w2": d.w2, "w1": d.w1}, w0, km, target, eta_m, alpha_m, None, act,
                                  mc.proj_chunk_size, residual)
            new_deep[name] = DeepState(w["w2"], w["w1"], d.w2_start, d.w1_start)
        out = {"k": k, "v": v, "v_in": v_in, "eta": eta, "alpha": alpha}
        if q is not None:
            out["q"] = q
        return out, LinearState(new_S, proj.S_start), new_deep, ops_q

    @property
    def full(self) -> bool:
        return self.mc.proj_width == "full"

    def _per_head(self, name: str, t: Tensor) -> Tensor:
        """A projection memory's read → per head: vectors `[B, H, C, K]`, gates `[B, H, C]`. Full-width reads
        `[B, 1, C, D]` (vectors) or `[B, 1, C, H]` (gates) are split by head."""
        if name in self.vectors:
            return t[:, 0].unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2) if self.full else t
        return t[:, 0].transpose(1, 2) if self.full else t[..., 0]


def check_momentum_state(mem: LinearState | DeepState, momentum: bool) -> None:
    """A linear M_mem carries its momentum Z exactly when `MemoryConfig.momentum` is on (a deep M_mem starts its
    momenta at zero when they are absent): a state made with the other setting is refused, not reinterpreted."""
    if isinstance(mem, LinearState) and (mem.Z is None) == momentum:
        have = "no momentum Z" if mem.Z is None else "a momentum Z"
        raise ValueError(f"the carried state has {have} but MemoryConfig.momentum={momentum}: it was made by a core "
                         "with the other momentum setting (start a fresh state or match the config)")


def _chunk_start(proj: LinearState, deep: dict[str, DeepState]) -> tuple[LinearState, dict[str, DeepState]]:
    """The projection memories at a chunk boundary: the states reached here become the chunk-start states."""
    return (LinearState(proj.S, proj.S, proj.Z),
            {name: DeepState(d.w2, d.w1, d.w2, d.w1, d.m2, d.m1) for name, d in deep.items()})
