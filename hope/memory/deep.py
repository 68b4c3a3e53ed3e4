"""Deep memory: the residual MLP `M(z) = z + W₁ σ(W₂ z)` per head, trained in context by the rule of §3.

Legend: B batch, T time, H heads, K key width (= value width), F hidden width, C chunk.

State (a dict of batched tensors, weights stored input-major like the linear memory's Sᵀ):
    "w2" `[B, H, K, F]` = W₂ᵀ (the layer that reads k),  "w1" `[B, H, F, K]` = W₁ᵀ,
    "m2", "m1" (same shapes): the momentum memories, present when momentum is on.

Rule (docs/design.md §3, paper_notes A5; ℓ2 objective ℓ_t(W) = ½‖M_W(k_t) − v̂_t‖², gradients at the chunk-start
weights W_c, read after write):

    W₂ ← W₂ (α_t I − β_t k_t k_tᵀ) − η_t ∇_{W₂} ℓ_t(W_c)          (DGD erase on the layer that reads k, eq. 88)
    W₁ ← α_t W₁ − η̃_t ∇_{W₁} ℓ_t(W_c),  η̃_t = η_t / (1 + C η_t ‖h_t‖²)   (plain retention: W₁ reads h_t)
    o_t = M_{W_t}(q_t)

W₁'s input h_t = σ(W₂,c k_t) is not unit-norm (paper_notes §6, "DGD normalization"), and inside a chunk of C
tokens its GD steps add up: W₁,c is multiplied by I − Σ_t η̃_t h_t h_tᵀ. The normalised step keeps
Σ_t η̃_t ‖h_t‖² < 1, so that factor stays in [0, 1] whatever the activations (with η_t alone a chunk of 64
correlated SiLU activations blows the memory up within a few hundred tokens).

With momentum the update terms go through Z₂ ← γ_t Z₂ − η_t ∇_{W₂}ℓ_t, Z₁ ← γ_t Z₁ − η̃_t ∇_{W₁}ℓ_t, and
W₂ ← W₂(α_t I − β_t k_t k_tᵀ) + Z₂, W₁ ← α_t W₁ + Z₁ (the linear memory's momentum form, per layer).

Inside a chunk each layer is therefore a linear memory with an externally computed write value: W₂ with key
k_t and value −η_t δ_t, W₁ with key h_t = σ(W₂,c k_t) and value −η̃_t e_t; `chunked.chunk_step` runs both.
"""

from __future__ import annotations

import math

import torch

from hope.memory.bounds import cuts, head_body_tail
from hope.memory.chunked import ChunkOperators, chunk_operators, chunk_step
from hope.memory.config import ACTIVATIONS
from hope.memory.rule import RULE_OBJECTIVES, compute_dtype, in_compute_dtype

DEEP_OBJECTIVES = tuple(o for o in RULE_OBJECTIVES if o != "dot")  # ("l2", "self"): −⟨M(k), v⟩ has no deep form here

# weights (and momenta) by name, the working form inside this module; `hope.memory.state.DeepState` is the typed
# state that a stream carries (`hope.memory.ops.deep_memory`)
DeepWeights = dict[str, torch.Tensor]


def activation(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ(x), σ'(x)) for σ = SiLU (x·sigmoid x) or GELU (exact, x·Φ(x))."""
    if name == "silu":
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # Φ(x)
        return x * cdf, cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def mlp(z: torch.Tensor, w2: torch.Tensor, w1: torch.Tensor, act: str, residual: bool = True) -> torch.Tensor:
    """M(z) = z + W₁ σ(W₂ z) for z `[..., T, K]`, w2 `[..., K, F]`, w1 `[..., F, K]` → `[..., T, K]`.

    `residual=False` drops the z term: M(z) = W₁ σ(W₂ z), whose output width (w1 `[..., F, G]`) may differ from K
    (the scalar read-outs M_η, M_α of `MemoryConfig.gate_depth="deep"`)."""
    out = activation(z @ w2, act)[0] @ w1
    return z + out if residual else out


def inner_grad(
    k: torch.Tensor, target: torch.Tensor, w2: torch.Tensor, w1: torch.Tensor, act: str, residual: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-one factors of the inner gradient of ℓ = ½‖M(k) − v̂‖² at weights (W₂, W₁), closed form (eqs. 29–31):

        p = W₂ k,  h = σ(p),  e = k + W₁ h − v̂,  δ = σ'(p) ⊙ W₁ᵀ e
        ∇_{W₂} ℓ = δ kᵀ   (stored transposed: k δᵀ),     ∇_{W₁} ℓ = e hᵀ   (stored transposed: h eᵀ)

    | symbol | argument | shape        | meaning                                   |
    |--------|----------|--------------|-------------------------------------------|
    | k      | k        | [..., T, K]  | keys (memory inputs)                      |
    | v̂      | target   | [..., T, K]  | regression targets                        |
    | W₂ᵀ    | w2       | [..., K, F]  | first layer, input-major                  |
    | W₁ᵀ    | w1       | [..., F, K]  | second layer, input-major                 |

    `residual=False`: M(k) = W₁σ(W₂k), so e = W₁h − v̂ (targets and w1 may then have a width G ≠ K).
    Returns (δ `[..., T, F]`, e `[..., T, K]`, h `[..., T, F]`); tests check them against `torch.func.grad`.
    """
    h, dh = activation(k @ w2, act)  # [..., T, F]
    err = (k + h @ w1 if residual else h @ w1) - target  # [..., T, K]
    delta = dh * (err @ w1.transpose(-1, -2))  # [..., T, F]
    return delta, err, h


def hidden_step(eta: torch.Tensor, h: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """η̃ = η / (1 + C η ‖h‖²): W₁'s step for inputs h `[..., F]` (see the module docstring)  # [...]."""
    return eta / (1 + chunk_size * eta * h.pow(2).sum(-1))


def _target(v: torch.Tensor, start: DeepWeights, objective: str, act: str) -> torch.Tensor:
    """v̂ = v ("l2") or the self-generated M_{W_c}(v) ("self", eqs. 84/87), held fixed by the inner gradient."""
    if objective == "l2":
        return v
    if objective == "self":
        return mlp(v, start["w2"], start["w1"], act)
    raise ValueError(f"deep-memory objective must be one of {DEEP_OBJECTIVES}, got {objective!r}")


def _cast_state(state: DeepWeights, dtype: torch.dtype, momentum: bool) -> DeepWeights:
    if not {"w2", "w1"} <= state.keys():
        raise ValueError(f"deep-memory state needs keys 'w2' and 'w1', got {sorted(state)}")
    out = {name: t.to(dtype) for name, t in state.items()}
    if momentum:
        for m, w in (("m2", "w2"), ("m1", "w1")):
            out.setdefault(m, torch.zeros_like(out[w]))
    return out


def deep_step(
    state: DeepWeights, start: DeepWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
    alpha: torch.Tensor, beta: torch.Tensor | None, *, gamma: torch.Tensor | None = None, objective: str = "l2",
    act: str = "silu", chunk_size: int = 1,
) -> tuple[torch.Tensor, DeepWeights]:
    """One token (the oracle's step): q, k, v `[B, H, K]`, gates `[B, H]`, `start` = chunk-start weights W_c.

    Symbols as in the module docstring and `inner_grad`; β = None is β = 0; `chunk_size` is the C of η̃.
    Returns (o `[B, H, K]`, state).
    """
    col = lambda t: t[..., None, None]
    delta, err, h = inner_grad(k[..., None, :], _target(v[..., None, :], start, objective, act), start["w2"],
                               start["w1"], act)  # [B, H, 1, F], [B, H, 1, K], [B, H, 1, F]
    write2 = -col(eta) * k[..., :, None] * delta  # (−η δ kᵀ)ᵀ  # [B, H, K, F]
    write1 = -col(hidden_step(eta, h[..., 0, :], chunk_size)) * h.transpose(-1, -2) * err  # (−η̃ e hᵀ)ᵀ  # [B, H, F, K]
    new = {}
    if gamma is not None:
        new["m2"] = col(gamma) * state["m2"] + write2
        new["m1"] = col(gamma) * state["m1"] + write1
        write2, write1 = new["m2"], new["m1"]
    w2 = col(alpha) * state["w2"] + write2
    if beta is not None:
        w2 = w2 - col(beta) * k[..., :, None] * (k[..., None, :] @ state["w2"])  # (αI − βkkᵀ) W₂ᵀ
    new["w2"], new["w1"] = w2, col(alpha) * state["w1"] + write1
    o = mlp(q[..., None, :], new["w2"], new["w1"], act)[..., 0, :]  # [B, H, K]
    return o, new


def deep_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_size: int, initial_state: DeepWeights, *,
    gamma: torch.Tensor | None = None, objective: str = "l2", act: str = "silu",
) -> tuple[torch.Tensor, DeepWeights]:
    """Token-by-token oracle of the deep memory, chunks aligned to position 0 of this call.

    q, k, v `[B, T, H, K]`, gates `[B, T, H]`, `initial_state` as in the module docstring (required: zero
    weights are a fixed point of the rule). Returns (o `[B, T, H, K]` in q's dtype, final state in the
    compute dtype, fp32 or fp64).
    """
    dtype, in_dtype = compute_dtype(q), q.dtype
    q, k, v, eta, alpha, beta, gamma = in_compute_dtype(dtype, q, k, v, eta, alpha, beta, gamma)
    state = _cast_state(initial_state, dtype, gamma is not None)
    start, outputs = state, []
    pick = lambda x, t: None if x is None else x[:, t]
    for t in range(q.shape[1]):
        if t % chunk_size == 0:
            start = state
        o, state = deep_step(state, start, q[:, t], k[:, t], v[:, t], eta[:, t], alpha[:, t], pick(beta, t),
                             gamma=pick(gamma, t), objective=objective, act=act, chunk_size=chunk_size)
        outputs.append(o)
    o = torch.stack(outputs, dim=1) if outputs else torch.zeros_like(q)  # [B, T, H, K]
    return o.to(in_dtype), state


def deep_write(
    ops2: ChunkOperators,
    state: DeepWeights,
    start: DeepWeights,
    k: torch.Tensor,
    target: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    gamma: torch.Tensor | None,
    act: str,
    chunk_size: int,
    residual: bool = True,
) -> tuple[torch.Tensor | None, DeepWeights]:
    """One (possibly partial) chunk `[B, H, C', ·]` of writes from `state`, inner gradients of ½‖M(k) − v̂‖² at
    the chunk-start weights `start`; `chunk_size` is the memory's C (of η̃), not the length C' of this piece.
    `ops2` = `chunk_operators(k, α, β, q, γ)` of the W₂ layer; with a query in `ops2` the reads after the
    writes W₁σ(W₂,t q_t) (without the residual q_t) are returned too (else None). `residual` as in `mlp`."""
    delta, err, h = inner_grad(k, target, start["w2"], start["w1"], act, residual)  # [B, H, C, F|K]
    o2, w2, m2 = chunk_step(ops2, state["w2"], -eta[..., None] * delta, state.get("m2"))  # W₂,t q_t  # [B, H, C, F]
    query = None if o2 is None else activation(o2, act)[0]  # σ(W₂,t q_t)
    ops1 = chunk_operators(h, alpha, None, query, gamma)  # W₁ reads h_t = σ(W₂,c k_t): no erase, plain retention
    step1 = hidden_step(eta, h, chunk_size)[..., None]  # η̃  # [B, H, C, 1]
    o1, w1, m1 = chunk_step(ops1, state["w1"], -step1 * err, state.get("m1"))  # [B, H, C, K]
    new = {"w2": w2, "w1": w1} if m2 is None else {"w2": w2, "w1": w1, "m2": m2, "m1": m1}
    return o1, new


def deep_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_size: int, initial_state: DeepWeights, *,
    gamma: torch.Tensor | None = None, objective: str = "l2", act: str = "silu", offset: int = 0,
    chunk_start: DeepWeights | None = None,
) -> tuple[torch.Tensor, DeepWeights, DeepWeights]:
    """Chunk-parallel deep memory; equals `deep_recurrent` to round-off (same inputs and shapes).

    `offset` = tokens of the current chunk already consumed by earlier calls (0 ≤ offset < chunk_size), whose
    chunk-start weights `chunk_start` {"w2", "w1"} the first `chunk_size − offset` tokens take their gradients
    at, so a stream fed in pieces equals one call. Returns (o, final state, chunk-start weights of the chunk
    that holds the next token). The W₂ operators of all full chunks (Gram matrix, UT transform) are built in
    one batched call; the sweep over chunks is sequential because each chunk's write values depend on its
    start weights.
    """
    dtype, in_dtype = compute_dtype(q), q.dtype
    to_bh = lambda x: None if x is None else x.movedim(1, 2)  # [B, H, T, ·]
    q, k, v, eta, alpha, beta, gamma = map(to_bh, in_compute_dtype(dtype, q, k, v, eta, alpha, beta, gamma))
    state = _cast_state(initial_state, dtype, gamma is not None)
    weights = lambda st: {"w2": st["w2"], "w1": st["w1"]}
    if offset and chunk_start is None:
        raise ValueError(f"offset={offset} > 0 needs the chunk-start weights (chunk_start=None)")
    start = {name: chunk_start[name].to(dtype) for name in ("w2", "w1")} if offset else weights(state)
    T, C = q.shape[2], chunk_size
    head, n_full, _ = head_body_tail(T, offset, C)
    bounds = cuts(T, offset, (C,))  # the head, n_full whole chunks, then the tail (each only when non-empty)
    full_ops = []
    if n_full:  # the W₂ operators of all full chunks in one batched call
        body = lambda x: None if x is None else x[:, :, head : head + n_full * C].unflatten(2, (n_full, C))
        full_ops = _unbind_ops(chunk_operators(body(k), body(alpha), body(beta), body(q), body(gamma)))
    outputs = []
    for i, (a, b) in enumerate(bounds):
        seg = [None if x is None else x[:, :, a:b] for x in (q, k, v, eta, alpha, beta, gamma)]
        j = i - (1 if head else 0)
        ops2 = full_ops[j] if 0 <= j < n_full else chunk_operators(seg[1], seg[4], seg[5], seg[0], seg[6])
        if (offset + a) % C == 0:
            start = weights(state)  # a chunk boundary: gradients are taken at the weights reached here
        q_n, k_n, v_n, eta_n, alpha_n, _, gamma_n = seg
        o, state = deep_write(ops2, state, start, k_n, _target(v_n, start, objective, act), eta_n, alpha_n, gamma_n,
                              act, chunk_size)
        outputs.append(q_n + o)  # M(q) = q + W₁σ(W₂q)
    if (offset + T) % C == 0:
        start = weights(state)
    o = torch.cat(outputs, dim=2) if outputs else q  # [B, H, T, K]
    return o.movedim(2, 1).to(in_dtype), state, start


def _unbind_ops(ops: ChunkOperators) -> list[ChunkOperators]:
    """Operators built over `[B, H, N]` → N per-chunk operators (views)."""
    n = ops.k.shape[2]
    split = lambda t: [None] * n if t is None else t.unbind(2)
    mom = [None] * n if ops.momentum is None else list(zip(*(split(t) for t in ops.momentum)))
    return [ChunkOperators(*fields, m) for *fields, m in zip(*(split(t) for t in ops[:-1]), mom)]
