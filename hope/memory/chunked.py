"""Chunk-parallel form of the linear-memory rule (docs/design.md §3), exact to round-off against `rule.recurrent`.

Legend: B batch, T time, H heads, K key width, V value width, C chunk, N chunks.

Derivation (one chunk, tokens t = 0 … C−1, start state P₀ = S_cᵀ, write values x_t = η_t u_t given)::

    P_t = (α_t I − β_t k_t k_tᵀ) P_{t−1} + k_t x_tᵀ                       (transposed rule, no momentum)

Let ᾱ_t = Π_{j≤t} α_j and D[t, s] = ᾱ_t / ᾱ_s (s ≤ t). By induction P_t = ᾱ_t P₀ + Σ_{s≤t} D[t, s] k_s r_sᵀ with
r_t = x_t − β_t P_{t−1}ᵀ k_t. Substituting P_{t−1} gives a unit lower-triangular system for R = [r_t]:

    (I + L) R = X − diag(β ᾱ_prev) K P₀,     L[t, s] = β_t D_prev[t, s] k_tᵀ k_s  (s < t)

where ᾱ_prev_t = ᾱ_{t−1} and D_prev[t, s] = D[t−1, s]. With 𝒯 = (I + L)⁻¹ (the UT/WY transform, one
triangular solve per chunk, independent of the state):

    R     = 𝒯 X − W P₀,                      W = 𝒯 diag(β ᾱ_prev) K
    O     = diag(ᾱ) Q P₀ + (D ⊙ Q Kᵀ) R       (read after write)
    P_C   = ᾱ_C P₀ + (D[C−1, :] ⊙ K)ᵀ R

For a linear memory x_t = η_t (y_t − P₀ᵀ z_t) is affine in P₀ (`write_value`: z = k for "l2", none for "dot",
z = k − v with y = 0 for "self"), so R = U − W' P₀ with U = 𝒯 diag(η) Y and W' = W + 𝒯 diag(η) Z are computed
for all chunks at once and the sequential pass over chunks is two small matmuls per chunk.

With momentum (Z_t = γ_t Z_{t−1} + k_t x_tᵀ, P_t = A_t P_{t−1} + Z_t, Γ_t = Π_{j≤t} γ_j, G[t, s] = Γ_t / Γ_s):

    P_t = ᾱ_t P₀ + φ_t Z₀ + Σ_{s≤t} k_s (M[t, s] x_s + D[t, s] e_s)ᵀ,    M = D G,  φ = D Γ
    (I + L) E = −[diag(β ᾱ_prev) K P₀ + diag(β φ_prev) K Z₀ + diag(β) (M_prev ⊙ K Kᵀ) X]
    O   = diag(ᾱ) Q P₀ + diag(φ) Q Z₀ + (M ⊙ Q Kᵀ) X + (D ⊙ Q Kᵀ) E
    P_C = ᾱ_C P₀ + φ_C Z₀ + (M[C−1, :] ⊙ K)ᵀ X + (D[C−1, :] ⊙ K)ᵀ E
    Z_C = Γ_C Z₀ + (G[C−1, :] ⊙ K)ᵀ X

(γ = 0 gives G = I, φ = 0, M = D and E = R − X: the first form.) Decay ratios come from segment sums of
log α in the log domain, so no ratio ever exceeds 1 and no cumulative product is divided by.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hope.memory.rule import RULE_OBJECTIVES, State, prepare


class ChunkOperators(NamedTuple):
    """The state-independent operators of one or many chunks (leading dims `[...]`, e.g. `[B, H]` or
    `[B, H, N]`). Fields that need a query or momentum are None without them."""

    k: torch.Tensor  # keys K  # [..., C, K]
    solve: torch.Tensor | None  # 𝒯 = (I + L)⁻¹ (None when β = 0)  # [..., C, C]
    erase: torch.Tensor | None  # diag(β ᾱ_prev) K, so that W = 𝒯 · erase (None when β = 0)  # [..., C, K]
    k_end: torch.Tensor  # D[C−1, :] ⊙ K  # [..., C, K]
    decay_end: torch.Tensor  # ᾱ_C  # [...]
    q_decay: torch.Tensor | None  # diag(ᾱ) Q  # [..., C, K]
    attn: torch.Tensor | None  # D ⊙ Q Kᵀ  # [..., C, C]
    momentum: tuple[torch.Tensor, ...] | None  # see `_momentum_operators`


def _constants(C: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower-triangular mask incl. the diagonal, identity) of size C: built once per size, dtype and device
    in eager mode; under `torch.compile` built in the graph (constants that the compiler folds)."""
    if torch.compiler.is_compiling():
        return _build_constants(C, dtype, device)
    return _cached_constants(C, dtype, device)


def _build_constants(C: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(), torch.eye(C, dtype=dtype, device=device)


_cached_constants = functools.lru_cache(maxsize=64)(_build_constants)


def _decays(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, D_prev, log ᾱ) for a gate `[..., C]` in (0, 1]: D[t, s] = Π_{s<j≤t} gate_j (s ≤ t), D_prev[t, s] =
    D[t−1, s] (s < t), both zero elsewhere, and log ᾱ_t = Σ_{j≤t} log gate_j. Differences of the log-gate
    cumsum are masked with `where` before `exp`, so no ratio above 1 is ever formed (no overflow, no 0·inf in
    the backward); the gate is clamped at the smallest normal number so that its log is finite."""
    lower, _ = _constants(gate.shape[-1], gate.dtype, gate.device)
    cum = gate.clamp_min(torch.finfo(gate.dtype).tiny).log().cumsum(-1)  # log ᾱ_t  # [..., C]
    D = torch.where(lower, cum[..., :, None] - cum[..., None, :], -torch.inf).exp()  # [..., C, C]
    return D, F.pad(D[..., :-1, :], (0, 0, 1, 0)), cum


def chunk_operators(
    k: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None,
    q: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
) -> ChunkOperators:
    """Operators of the chunk transition for keys k `[..., C, K]` and gates alpha, beta, gamma `[..., C]`
    (see the module docstring for the equations; any leading dims, any C ≥ 1). `beta=None` means β = 0
    (plain GD): then 𝒯 = I and no Gram matrix or triangular solve is formed (`solve`, `erase` are None)."""
    if k.shape[-2] == 1 and gamma is None:
        return _one_token_operators(k, alpha, beta, q)
    D, D_prev, cum = _decays(alpha)  # [..., C, C], [..., C, C], [..., C]
    decay = cum.exp()[..., None]  # ᾱ_t  # [..., C, 1]
    gram = solve = erase = None
    if beta is not None:
        gram = k @ k.transpose(-1, -2)  # K Kᵀ  # [..., C, C]
        lower = beta[..., :, None] * D_prev * gram  # L, strictly lower through D_prev  # [..., C, C]
        _, eye = _constants(k.shape[-2], k.dtype, k.device)
        # unitriangular: the solve reads only the strict lower part of its matrix and takes ones on the diagonal
        solve = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True)
        decay_prev = F.pad(decay[..., :-1, :], (0, 0, 1, 0), value=1.0)  # ᾱ_{t−1}, ᾱ_{−1} = 1  # [..., C, 1]
        erase = beta[..., :, None] * decay_prev * k  # [..., C, K]
    k_end = D[..., -1, :, None] * k  # [..., C, K]
    decay_end = decay[..., -1, 0]  # [...]
    q_decay = attn = None
    if q is not None:
        q_decay = decay * q  # [..., C, K]
        attn = D * (q @ k.transpose(-1, -2))  # [..., C, C]
    momentum = None if gamma is None else _momentum_operators(k, q, beta, gamma, D, gram)
    return ChunkOperators(k, solve, erase, k_end, decay_end, q_decay, attn, momentum)


def _one_token_operators(k, alpha, beta, q) -> ChunkOperators:
    """`chunk_operators` of a one-token chunk (generation) without the chunk machinery: D = [1], L = 0 so 𝒯 = I
    (`solve` None, `erase` = β K since ᾱ_prev = 1), k_end = K, ᾱ_C = α."""
    erase = None if beta is None else beta[..., None] * k  # [..., 1, K]
    q_decay = attn = None
    if q is not None:
        q_decay = alpha[..., None] * q  # [..., 1, K]
        attn = q @ k.transpose(-1, -2)  # [..., 1, 1]
    return ChunkOperators(k, None, erase, k, alpha[..., 0], q_decay, attn, None)


def _momentum_operators(k, q, beta, gamma, D, gram) -> tuple[torch.Tensor, ...]:
    """(erase_z, erase_x, k_end_x, phi_end, k_end_z, mom_end, q_mom, attn_x) of the momentum form."""
    G, _, _ = _decays(gamma)  # [..., C, C]
    mom = G[..., :, :1] * gamma[..., :1, None]  # Γ_t  # [..., C, 1]
    M = D @ G  # M[t, s] = Σ_{s≤j≤t} D[t, j] G[j, s]  # [..., C, C]
    phi = D @ mom  # φ_t = Σ_{j≤t} D[t, j] Γ_j  # [..., C, 1]
    erase_z = erase_x = None
    if beta is not None:
        M_prev = F.pad(M[..., :-1, :], (0, 0, 1, 0))  # [..., C, C]
        phi_prev = F.pad(phi[..., :-1, :], (0, 0, 1, 0))  # [..., C, 1]
        erase_z = beta[..., :, None] * phi_prev * k  # diag(β φ_prev) K  # [..., C, K]
        erase_x = beta[..., :, None] * M_prev * gram  # diag(β) (M_prev ⊙ K Kᵀ)  # [..., C, C]
    k_end_x = M[..., -1, :, None] * k  # [..., C, K]
    k_end_z = G[..., -1, :, None] * k  # [..., C, K]
    phi_end, mom_end = phi[..., -1, 0], mom[..., -1, 0]  # [...]
    q_mom = attn_x = None
    if q is not None:
        q_mom = phi * q  # [..., C, K]
        attn_x = M * (q @ k.transpose(-1, -2))  # [..., C, C]
    return erase_z, erase_x, k_end_x, phi_end, k_end_z, mom_end, q_mom, attn_x


def chunk_step(
    ops: ChunkOperators, state: torch.Tensor, x: torch.Tensor, momentum: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """One chunk of `P_t = (α_t I − β_t k_t k_tᵀ) P_{t−1} + k_t x_tᵀ` (or its momentum form) for given write
    values x `[..., C, V]` (x_t = η_t u_t) from the state P₀ = S_cᵀ `[..., K, V]` (and momentum Z₀ᵀ).

    Returns (o `[..., C, V]` or None without a query, P_Cᵀ `[..., K, V]`, Z_Cᵀ or None). The write values may
    depend on any earlier state (the deep memory computes them at the chunk-start weights), which is why
    this function takes them as given.
    """
    end = lambda c, s: c[..., None, None] * s
    if ops.momentum is None:
        r = x if ops.erase is None else _solve(ops, x - ops.erase @ state)  # R  # [..., C, V]
        o = None if ops.q_decay is None else ops.q_decay @ state + ops.attn @ r  # [..., C, V]
        return o, end(ops.decay_end, state) + ops.k_end.transpose(-1, -2) @ r, None
    erase_z, erase_x, k_end_x, phi_end, k_end_z, mom_end, q_mom, attn_x = ops.momentum
    if momentum is None:
        momentum = torch.zeros_like(state)
    o = None if ops.q_decay is None else ops.q_decay @ state + q_mom @ momentum + attn_x @ x  # [..., C, V]
    new_state = end(ops.decay_end, state) + end(phi_end, momentum) + k_end_x.transpose(-1, -2) @ x  # [..., K, V]
    if ops.erase is not None:
        e = -_solve(ops, ops.erase @ state + erase_z @ momentum + erase_x @ x)  # E  # [..., C, V]
        o = None if o is None else o + ops.attn @ e
        new_state = new_state + ops.k_end.transpose(-1, -2) @ e
    new_momentum = end(mom_end, momentum) + k_end_z.transpose(-1, -2) @ x  # [..., K, V]
    return o, new_state, new_momentum


def _solve(ops: ChunkOperators, x: torch.Tensor) -> torch.Tensor:
    """𝒯 x (x itself where 𝒯 = I)."""
    return x if ops.solve is None else ops.solve @ x


def write_terms(
    k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, objective: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(η y, η z) with x_t = η_t (y_t − P_cᵀ z_t) the write value of `rule.write_value` (None for a zero term)."""
    eta = eta[..., None]
    if objective == "l2":
        return eta * v, eta * k
    if objective == "dot":
        return eta * v, None
    if objective == "self":
        return None, eta * (k - v)
    raise ValueError(f"objective must be one of {RULE_OBJECTIVES}, got {objective!r}")


def chunk_write(y: torch.Tensor | None, z: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """Write values x = y − z P₀ of one chunk from `write_terms` (y, z) and its start state, None being zero
    # [..., C, V]."""
    if z is None:
        return y
    return -(z @ state) if y is None else y - z @ state


def linear_chunk(
    ops: ChunkOperators, state: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One chunk `[..., C, ·]` of a linear memory (no momentum) that starts at a chunk boundary, so its write
    values x_t = y_t − P₀ᵀ z_t are taken at `state` itself (y = η·target, z = η·key as in `write_terms`; None
    is zero). Folds the write into R = 𝒯 y − 𝒯(diag(β ᾱ_prev) K + z) P₀: one state matmul fewer than
    `chunk_step`. Returns (o or None, P_C)."""
    if ops.erase is None:
        r = chunk_write(y, z, state)
    else:
        w = _solve(ops, ops.erase if z is None else ops.erase + z)  # W'  # [..., C, K]
        r = chunk_write(None if y is None else _solve(ops, y), w, state)  # [..., C, V]
    o = None if ops.q_decay is None else ops.q_decay @ state + ops.attn @ r
    return o, ops.decay_end[..., None, None] * state + ops.k_end.transpose(-1, -2) @ r


def _linear_pass(ops: ChunkOperators, y, z, state: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """All full chunks of a linear memory without momentum; ops and y, z carry a chunk dim N at position 2.

    The affine write folds into R = U − W' P_n, so only `R` and `P_{n+1}` are sequential."""
    if ops.erase is None:  # β = 0: 𝒯 = I
        u, w = y, z
    else:
        u = None if y is None else _solve(ops, y)  # U  # [B, H, N, C, V]
        w = _solve(ops, ops.erase if z is None else ops.erase + z)  # W'  # [B, H, N, C, K]
    # unbind (not indexing) so that the backward of the sweep stacks gradients instead of scattering each
    # chunk's into a full-size zero tensor
    split = lambda t: [None] * ops.k.shape[2] if t is None else t.unbind(2)
    starts, rs = [], []
    for u_n, w_n, decay_n, k_end_n in zip(split(u), split(w), split(ops.decay_end), split(ops.k_end.mT)):
        r = chunk_write(u_n, w_n, state)  # R_n = U_n − W'_n P_n  # [B, H, C, V]
        starts.append(state)
        rs.append(r)
        state = decay_n[..., None, None] * state + k_end_n @ r  # [B, H, K, V]
    o = None
    if ops.q_decay is not None:
        o = ops.q_decay @ torch.stack(starts, dim=2) + ops.attn @ torch.stack(rs, dim=2)  # [B, H, N, C, V]
    return o, state


def _chunks(x: torch.Tensor | None, n: int, size: int) -> torch.Tensor | None:
    """`[B, T, H, ...]` → its first n·size tokens as `[B, H, n, size, ...]`."""
    if x is None:
        return None
    x = x[:, : n * size].movedim(1, 2)  # [B, H, T, ...]
    return x.reshape(*x.shape[:2], n, size, *x.shape[3:])


def _tail(x: torch.Tensor | None, start: int) -> torch.Tensor | None:
    """`[B, T, H, ...]` → tokens start… as `[B, H, T − start, ...]`."""
    return None if x is None else x[:, start:].movedim(1, 2)


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_size: int, initial_state: State | None = None, output_final_state: bool = False,
    *, gamma: torch.Tensor | None = None, objective: str = "l2",
) -> tuple[torch.Tensor, State | None]:
    """Chunk-parallel `rule.recurrent` (same signature, shapes, dtypes and results to round-off; `beta=None`
    is β = 0 and skips the Gram matrix and the triangular solve).

    Full chunks are transformed in parallel (`chunk_operators` over `[B, H, N]`) and then swept once; a last
    partial chunk (T not a multiple of `chunk_size`) gets its own operators, so nothing is padded and the
    final state is exactly the state after token T−1. Differentiable by autograd in every input.
    """
    in_dtype, (B, T, H, _) = q.dtype, q.shape
    (q, k, v, eta, alpha, beta, gamma), state, momentum = prepare(q, k, v, eta, alpha, beta, gamma, initial_state,
                                                                  objective)
    V = state.shape[-1]
    y, z = write_terms(k, v, eta, objective)  # [B, T, H, V], [B, T, H, K]
    n_full, outputs = T // chunk_size, []
    if n_full > 0:
        parts = [_chunks(x, n_full, chunk_size) for x in (q, k, alpha, beta, gamma, y, z)]
        cq, ck, ca, cb, cg, cy, cz = parts
        ops = chunk_operators(ck, ca, cb, cq, cg)
        if gamma is None:
            o, state = _linear_pass(ops, cy, cz, state)
            outputs.append(o.flatten(2, 3))  # [B, H, N·C, V]
        else:
            for n in range(n_full):
                ops_n = _select(ops, n)
                x = chunk_write(None if cy is None else cy[:, :, n], None if cz is None else cz[:, :, n], state)
                o, state, momentum = chunk_step(ops_n, state, x, momentum)
                outputs.append(o)
    if T > n_full * chunk_size:
        tail = [_tail(x, n_full * chunk_size) for x in (q, k, alpha, beta, gamma, y, z)]
        o, state, momentum = _partial(*tail, state, state, momentum)
        outputs.append(o)
    o = torch.cat(outputs, dim=2) if outputs else q.new_zeros(B, H, 0, V)  # [B, H, T, V]
    o = o.movedim(2, 1).to(in_dtype)  # [B, T, H, V]
    if not output_final_state:
        return o, None
    return o, (state if gamma is None else (state, momentum))


def _partial(q, k, alpha, beta, gamma, y, z, state, chunk_state, momentum):
    """A chunk `[B, H, C', ·]` of any length C' from `state`, write values taken at `chunk_state`."""
    return chunk_step(chunk_operators(k, alpha, beta, q, gamma), state, chunk_write(y, z, chunk_state), momentum)


def partial_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, state: torch.Tensor, chunk_state: torch.Tensor, *, gamma: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None, objective: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tokens `[B, T', H, ·]` that all lie in one chunk whose start state is `chunk_state` (Sᵀ at c(t)), run from
    the current `state` (and `momentum`), which may be mid-chunk: how a stream fed in pieces continues a chunk.

    Inputs in the compute dtype. Returns (o `[B, T', H, V]`, Sᵀ after the last token, Zᵀ or None).
    """
    y, z = write_terms(k, v, eta, objective)
    tail = [_tail(x, 0) for x in (q, k, alpha, beta, gamma, y, z)]
    o, state, momentum = _partial(*tail, state, chunk_state, momentum)
    return o.movedim(2, 1), state, momentum


def _select(ops: ChunkOperators, n: int) -> ChunkOperators:
    """Chunk n of operators built over `[B, H, N]`."""
    pick = lambda t: None if t is None else t[:, :, n]
    mom = None if ops.momentum is None else tuple(pick(t) for t in ops.momentum)
    return ChunkOperators(*(pick(t) for t in ops[:-1]), mom)
