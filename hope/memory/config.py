"""`MemoryConfig`: the knobs of the inner-loop memories of the "self_modifying" and "titans" cores.

Every field is validated in `__post_init__`; errors print the offending value. The defaults are HOPE's
(docs/design.md §3–4); the chunk sizes and depths were chosen by the speed measurements recorded in the module
docstring of `hope.layers.self_modifying`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hope._checks import check

# The one definition of each knob's choices (the rule and the ops import them from here).
ERASES = ("dgd", "gd")
OBJECTIVES = ("l2", "dot")  # user-facing objectives of M_mem; the rule adds "self" (`rule.RULE_OBJECTIVES`)
DEPTHS = ("linear", "deep")
WIDTHS = ("head", "full")  # what a projection memory reads: its head's slice of x̃, or all of x̃
ACTIVATIONS = ("silu", "gelu")  # σ of a deep memory (`deep.activation`)
BACKENDS = ("auto", "torch", "recurrent", "triton")  # `hope.memory.ops.resolve_backend`
RETAIN_TOWARD = ("zero", "init")  # what retention α pulls a memory toward: zero, or its initial state S₀


@dataclass
class MemoryConfig:
    """Inner-loop memories of a core (docs/design.md §3–4, arXiv:2512.24695 eqs. 83–97).

    Attributes:
        chunk_size: tokens per chunk of the main memory M_mem; inside a chunk every inner gradient is taken at
            the chunk-start state (eq. 90), which is what makes the chunk parallel.
        proj_chunk_size: tokens per chunk of the projection memories M_k, M_v, M_η, M_α (and M_q); k, v, η, α of
            a chunk are read from these memories' chunk-start states.
        erase: "dgd" (β = η, Delta Gradient Descent, eq. 88) or "gd" (β = 0, plain GD with retention). The
            Titans core always uses "gd".
        momentum: add the momentum memory Z_t = γ_t Z_{t−1} + η'_t u_t k_tᵀ to M_mem (Table 6 "w/o momentum");
            γ_t = sigmoid of a linear read-out of the input, η'_t = (1 − γ_t) η_t so that Z averages the updates
            and the step stays η_t (with η_t itself it grows to η_t/(1 − γ_t) and M_mem blows up). The Titans
            core always uses momentum, damped the same way (`hope.layers.titans.TitansCore`).
        objective: inner objective of M_mem: "l2" (½‖Sk − v‖², eq. 93) or "dot" (−⟨Sk, v⟩, eq. 92).
        mem_depth: M_mem is a "linear" matrix memory or a "deep" residual MLP `z + W₁σ(W₂z)` (eq. 91).
        proj_depth: same choice for the projection memories M_k, M_v (and M_q).
        gate_depth: the scalar read-outs M_η, M_α: "linear", or "deep", a 2-layer MLP `W₁σ(W₂z)` without the
            residual term (its output, one gate per head, is narrower than its input, so `z + ·` has no meaning).
        proj_width: what the projection memories read: "head" (each head's memories see only that head's 1/H
            slice of x̃, and write with that head's k, v, η, α) or "full" (one memory per projection reads the
            whole x̃_t ∈ R^D and emits every head's k, v, (q), η, α, as eqs. 83/94 write M_□(x_t); it writes with
            the full-width key [k_1 … k_H]/√H (unit norm), the full-width value, and the head means of η and α).
        hidden_mult: hidden width of a deep memory, as a multiple of the head width (also for the full-width
            projection memories, which are then a D → hidden → D bottleneck).
        activation: σ of a deep memory: "silu" or "gelu".
        eta_max: η_t = eta_max·sigmoid(·) (times (1 + α_t) with `negative_eigenvalues`). Along k a C = 1 step
            multiplies S by α − β − η, which must stay in [−1, 1] for every α in (0, 1] (docs/design.md §3):
            eta_max ≤ 0.5 with DGD. With GD the steps of a chunk
            add up (S_c is multiplied by I − Σ_t η_t k_t k_tᵀ), so eta_max ≤ min(1, 2/C) for the largest chunk C;
            `tests/test_memory_chunked.py` shows GD blowing up where DGD stays bounded.
        negative_eigenvalues: η_t = eta_max·(1 + α_t)·sigmoid(·) instead of eta_max·sigmoid(·): with DGD the
            factor α − 2η of a token along k then spans [α − 2·eta_max·(1 + α), α], down to −1 at eta_max = 0.5
            for every α, so a memory can flip a sign (state tracking such as parity; Grazzi et al. 2024). Without
            it, α − 2η > α − 1 ≈ 0 for the retentions HOPE learns (α near 1). DGD only.
        adaptive_q: q_t = M_{q,c(t)}(x_t), a projection memory, instead of a fixed linear W_q (Table 6).
        self_targets: projection memories regress k_t onto their self-generated targets M_{□,c(t)}(v̄_t)
            (eqs. 84/87), v̄ = v/‖v‖ (normalised like k, so that the self-referential write stays within the
            bound of docs/design.md §3); False uses the plain target v̄_t for M_k, M_v, M_q, normalised the same way
            so that the ablation changes only M_c(·) around it (with the raw v_t the self-referential write
            M_v ← v_t = M_v(x_t) grows without bound: a 600-step `hope_small` run had gradient norms up to 3e6
            and never left the unigram loss, see experiments/lm_compare/README.md).
        self_target_mem: M_mem also regresses onto its self-generated target M_{mem,c(t)}(v̄_t) (the literal
            reading of eq. 85) instead of v_t.
        target_norm: self-generated (and plain) targets read v̄ = v/‖v‖; False reads the raw v_t, as eqs. 84/87
            write M_□(v_t).
        retain_toward: what the retention α_t pulls the self-modifying core's linear memories toward. "zero"
            (eq. 88 as printed): S_t = S_{t−1}(α_t I − β_t k_t k_tᵀ) + η_t u_t k_tᵀ, so a memory decays to 0.
            "init": S_t − S₀ = (S_{t−1} − S₀)(α_t I − β_t k_t k_tᵀ) + η_t u_t k_tᵀ, with S₀ the meta-learned
            initial state and u_t taken at the whole chunk-start memory S_c, so a memory decays to S₀ and stays
            within a bounded distance of it over a stream of any length (what carrying the core across windows
            needs; docs/design.md §3). Linear memories only (`mem_depth`, `proj_depth`, `gate_depth` "linear").
        max_horizon: the longest memory horizon at initialisation, in tokens: the retention biases start the heads
            at horizons τ log-spaced in [16, max_horizon] (σ(b_α) = 1 − 1/τ, `retention_bias`). The default 1,024
            spans a 512-token training window; a stream read far past its training length (passkey at 16K) may
            want longer.
        conv_width: width of the causal depthwise convolution on the core's input (eq. 97 text: 4).
        backend: kernel choice of `hope.ops.memory_update` for M_mem: "auto", "torch", "recurrent", "triton"
            (`hope.ops.resolve_backend` says which one runs).
    """

    chunk_size: int = 64
    proj_chunk_size: int = 16
    erase: str = "dgd"
    momentum: bool = False
    objective: str = "l2"
    mem_depth: str = "linear"
    proj_depth: str = "linear"
    gate_depth: str = "linear"
    proj_width: str = "head"
    hidden_mult: float = 1.0
    activation: str = "silu"
    eta_max: float = 0.5
    negative_eigenvalues: bool = False
    adaptive_q: bool = False
    self_targets: bool = True
    self_target_mem: bool = False
    target_norm: bool = True
    retain_toward: str = "zero"
    max_horizon: int = 1024
    conv_width: int = 4
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("chunk_size", "proj_chunk_size", "conv_width"):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            check(ok, f"MemoryConfig.{name} must be an int >= 1, got {value!r}")
        ok = isinstance(self.max_horizon, int) and not isinstance(self.max_horizon, bool) and self.max_horizon >= 16
        check(ok, f"MemoryConfig.max_horizon must be an int >= 16 (the shortest initial horizon), "
                  f"got {self.max_horizon!r}")
        for name, allowed in (("erase", ERASES), ("objective", OBJECTIVES), ("mem_depth", DEPTHS),
                              ("proj_depth", DEPTHS), ("gate_depth", DEPTHS), ("proj_width", WIDTHS),
                              ("activation", ACTIVATIONS), ("backend", BACKENDS),
                              ("retain_toward", RETAIN_TOWARD)):
            value = getattr(self, name)
            check(value in allowed, f"MemoryConfig.{name} must be one of {allowed}, got {value!r}")
        for name in ("momentum", "negative_eigenvalues", "adaptive_q", "self_targets", "self_target_mem",
                     "target_norm"):
            value = getattr(self, name)
            check(isinstance(value, bool), f"MemoryConfig.{name} must be a bool, got {value!r}")
        check(self.hidden_mult > 0, f"MemoryConfig.hidden_mult must be > 0, got {self.hidden_mult!r}")
        # DGD: along k a token multiplies S by α − 2η ∈ [−1, 1] for every α ∈ (0, 1] iff η ≤ 1/2. GD: inside a chunk
        # every gradient is taken at S_c, so S_c is multiplied by I − Σ_t η_t k_t k_tᵀ (α = 1, equal keys): Cη ≤ 2.
        chunk = max(self.chunk_size, self.proj_chunk_size)
        bound = 0.5 if self.erase == "dgd" else min(1.0, 2 / chunk)
        check(
            0 < self.eta_max <= bound,
            f"MemoryConfig.eta_max={self.eta_max!r} must be in (0, {bound:g}] with erase={self.erase!r} and chunks "
            f"of up to {chunk} tokens: larger steps can make the memory blow up (docs/design.md §3)",
        )
        check(
            not (self.negative_eigenvalues and self.erase != "dgd"),
            "MemoryConfig.negative_eigenvalues=True needs erase='dgd' (with plain GD the steps of a chunk add up and "
            f"η_t up to eta_max·(1 + α_t) is outside the stable range), got erase={self.erase!r}",
        )
        check(
            not (self.momentum and self.backend == "triton"),
            "MemoryConfig.momentum=True needs a backend that keeps the momentum state Z ('auto', 'torch' or "
            "'recurrent'); the Triton kernel has none, got backend='triton'",
        )
        check(
            not (self.self_target_mem and self.objective == "dot"),
            "MemoryConfig.self_target_mem=True needs objective='l2' (a self-generated target is an ℓ2 regression "
            f"target), got objective={self.objective!r}",
        )

        deep = [n for n in ("mem_depth", "proj_depth", "gate_depth") if getattr(self, n) != "linear"]
        check(
            not (self.retain_toward == "init" and deep),
            "MemoryConfig.retain_toward='init' is built for linear memories only, got "
            + ", ".join(f"{n}={getattr(self, n)!r}" for n in deep),
        )

    def hidden(self, head_dim: int) -> int:
        """Hidden width of a deep memory for heads of width `head_dim`."""
        return max(1, round(self.hidden_mult * head_dim))
