"""Public ops of the inner-loop rule: input checks, then dispatch to the PyTorch forms or the Triton kernels.

Legend: B batch, T time, H heads, K key width, V value width, C chunk.

This is the only module that imports `kernels` (lazily, inside `memory_update`), so `import hope` works
without Triton. Layers call these functions, never `hope.memory` or `kernels` directly.
"""

from __future__ import annotations

import importlib

import torch

from hope.memory.chunked import (
    ChunkOperators,
    chunk_operators,
    chunk_step,
    chunk_write,
    chunked,
    linear_chunk,
    partial_chunk,
    write_terms,
)
from hope.memory.deep import DeepState, activation, deep_chunked, deep_write, inner_grad, mlp
from hope.memory.rule import OBJECTIVES, State, compute_dtype, recurrent

BACKENDS = ("auto", "torch", "recurrent", "triton")

__all__ = [
    "BACKENDS",
    "ChunkOperators",
    "DeepState",
    "activation",
    "chunk_operators",
    "chunk_step",
    "chunk_write",
    "compute_dtype",
    "deep_memory",
    "deep_write",
    "inner_grad",
    "linear_chunk",
    "memory_stream",
    "memory_update",
    "mlp",
    "write_terms",
]


def _check_tensor(name: str, x: object, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; put every input on one device")


def _check_values(**tensors: torch.Tensor | None) -> None:
    """Finite inputs, α > 0, γ ≥ 0, on CPU only: on an accelerator the check would force a host sync."""
    present = {name: x for name, x in tensors.items() if x is not None}
    if torch.compiler.is_compiling() or any(x.device.type != "cpu" for x in present.values()):
        return
    for name, x in present.items():
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")
    if "alpha" in present and not bool((present["alpha"] > 0).all()):
        raise ValueError(f"alpha (retention) must be > 0, got min {float(present['alpha'].min())}")
    if "gamma" in present and not bool((present["gamma"] >= 0).all()):
        raise ValueError(f"gamma (momentum decay) must be >= 0, got min {float(present['gamma'].min())}")


def check_inputs(q, k, v, eta, alpha, beta, chunk_size, initial_state, gamma, objective) -> int:
    """Validate `memory_update`'s arguments (messages name the offending value); returns V."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {list(q.shape)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    B, T, H, K = q.shape
    _check_tensor("k", k, (B, T, H, K), q.device)
    if not isinstance(v, torch.Tensor) or v.ndim != 4:
        raise ValueError(f"v must be a [B, T, H, V] tensor, got {getattr(v, 'shape', type(v).__name__)}")
    width = K if objective == "self" else v.shape[-1]
    _check_tensor("v", v, (B, T, H, width), q.device)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k, v must share one dtype")
    for name, x in (("eta", eta), ("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if x is not None or name in ("eta", "alpha"):
            _check_tensor(name, x, (B, T, H), q.device)
    S0 = initial_state[0] if isinstance(initial_state, tuple) else initial_state
    if objective == "self" and S0 is None:
        raise ValueError("objective 'self' needs initial_state: a zero memory generates zero targets forever")
    V = v.shape[-1] if S0 is None or objective != "self" else S0.shape[-1]
    if isinstance(initial_state, tuple):
        if gamma is None:
            raise ValueError("initial_state is an (S, Z) pair but gamma is None (momentum off); pass S alone")
        if len(initial_state) != 2:
            raise ValueError(f"initial_state pair must be (S, Z), got {len(initial_state)} tensors")
        for name, x in zip(("initial_state[0]", "initial_state[1]"), initial_state):
            _check_tensor(name, x, (B, H, K, V), q.device)
    elif initial_state is not None:
        _check_tensor("initial_state", initial_state, (B, H, K, V), q.device)
    _check_values(q=q, k=k, v=v, eta=eta, alpha=alpha, beta=beta, gamma=gamma)
    return V


def _triton_kernel():
    """`kernels.chunk_memory_update`, or None when Triton or the project's `kernels` package is missing (an
    unrelated PyPI distribution also installs a top-level `kernels`, hence the attribute check)."""
    try:
        module = importlib.import_module("kernels")
    except Exception:  # ImportError, or a Triton install that fails at import on this machine
        return None
    return getattr(module, "chunk_memory_update", None)


def _triton_supports(q, beta, gamma, objective) -> bool:
    return q.is_cuda and gamma is None and objective == "l2" and q.dtype != torch.float64


def memory_update(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None,
    chunk_size: int,
    initial_state: State | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    *,
    gamma: torch.Tensor | None = None,
    objective: str = "l2",
) -> tuple[torch.Tensor, State | None]:
    """The inner-loop rule of a linear memory over a sequence (DESIGN.md §3, arXiv:2512.24695 eqs. 88–93):

        S_t = S_{t−1}(α_t I − β_t k_t k_tᵀ) + η_t u_t k_tᵀ,   o_t = S_t q_t,   u_t = v_t − S_{c(t)} k_t ("l2"),
        u_t = v_t ("dot"), u_t = S_{c(t)}(v_t − k_t) ("self"); with momentum Z_t = γ_t Z_{t−1} + η_t u_t k_tᵀ
        and S_t = S_{t−1}(α_t I − β_t k_t k_tᵀ) + Z_t.

    c(t) is the last token of the previous chunk (chunks of `chunk_size` aligned to position 0 of this call).

    Args:
        q, k: `[B, T, H, K]` (k ℓ2-normalised by the caller); v: `[B, T, H, V]` (`[B, T, H, K]` for "self").
        eta, alpha, beta, gamma: `[B, T, H]`; α in (0, 1], β ≥ 0 (None = 0, plain GD), γ ≥ 0 (None = no momentum).
        initial_state: Sᵀ `[B, H, K, V]` (zeros if None), or `(Sᵀ, Zᵀ)` with momentum.
        backend: "torch" (chunk-parallel PyTorch), "recurrent" (token-by-token oracle), "triton"
            (`kernels.chunk_memory_update`: linear memory, "l2", no momentum, CUDA), or "auto" (Triton when the
            inputs are on CUDA, the kernels import and the knobs are supported; else "torch").

    Returns `(o [B, T, H, V]` in q's dtype, final state or None`)`; the state is kept in fp32 (fp64 for fp64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, eta, alpha, beta, chunk_size, initial_state, gamma, objective)
    args = (q, k, v, eta, alpha, beta, chunk_size, initial_state, output_final_state)
    if backend in ("auto", "triton"):
        supported = _triton_supports(q, beta, gamma, objective)
        kernel = _triton_kernel() if supported or backend == "triton" else None  # no import for CPU inputs
        if backend == "triton" and (kernel is None or not supported):
            why = "the kernels package (or Triton) is not importable" if kernel is None else (
                f"it needs CUDA inputs, fp16/bf16/fp32, objective 'l2' and no momentum; got device "
                f"{q.device}, dtype {q.dtype}, objective {objective!r}, "
                f"gamma {'given' if gamma is not None else 'None'}")
            raise ValueError(f"backend='triton' is unavailable: {why}")
        if kernel is not None and supported:
            # the kernels take contiguous inputs and an fp32 state (views of projections are not contiguous)
            q_, k_, v_, eta_, alpha_, beta_, C, s0, out_final = args
            cont = [None if t is None else t.contiguous() for t in (q_, k_, v_, eta_, alpha_, beta_)]
            s0 = None if s0 is None else s0.float().contiguous()
            return kernel(*cont, C, s0, out_final)
    if backend == "recurrent":
        return recurrent(*args, gamma=gamma, objective=objective)
    return chunked(*args, gamma=gamma, objective=objective)


def memory_stream(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None,
    chunk_size: int,
    state: dict[str, torch.Tensor],
    offset: int,
    backend: str = "auto",
    *,
    gamma: torch.Tensor | None = None,
    objective: str = "l2",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`memory_update` for a stream fed in pieces: chunks aligned to the stream's start, not to this call's.

    `state` = {"S": Sᵀ now, "S_start": Sᵀ at the start of the current chunk, "Z": Zᵀ (momentum only)}, all
    `[B, H, K, V]`; `offset` = tokens of the current chunk already seen (stream position mod chunk_size). The
    tokens finishing the current chunk and those after the last boundary run as partial chunks; the aligned
    middle goes to `memory_update` (Triton-capable). Returns (o `[B, T, H, V]`, the new state dict).
    """
    T, C = q.shape[1], chunk_size
    if not 0 <= offset < C:
        raise ValueError(f"offset must be in [0, chunk_size={C}), got {offset}")
    S, S_start, Z = state["S"], state["S_start"], state.get("Z")
    head = min(T, (C - offset) % C)
    body = (T - head) // C * C
    dtype = S.dtype
    cast = lambda x, a, b: None if x is None else x[:, a:b].to(dtype)
    outputs = []
    if head:
        part = [cast(x, 0, head) for x in (q, k, v, eta, alpha, beta)]
        o, S, Z = partial_chunk(*part, S, S_start, gamma=cast(gamma, 0, head), momentum=Z, objective=objective)
        outputs.append(o)
    if body:
        part = [None if x is None else x[:, head : head + body] for x in (q, k, v, eta, alpha, beta)]
        init = S if gamma is None else (S, Z)
        o, final = memory_update(*part, C, init, True, backend, gamma=cast(gamma, head, head + body),
                                 objective=objective)
        S, Z = (final, None) if gamma is None else final
        outputs.append(o)
    if (offset + head + body) % C == 0:
        S_start = S
    if head + body < T:
        part = [cast(x, head + body, T) for x in (q, k, v, eta, alpha, beta)]
        o, S, Z = partial_chunk(*part, S, S_start, gamma=cast(gamma, head + body, T), momentum=Z,
                                objective=objective)
        outputs.append(o)
    if (offset + T) % C == 0:
        S_start = S
    o = torch.cat([x.to(q.dtype) for x in outputs], dim=1) if outputs else q.new_zeros(*q.shape[:3], S.shape[-1])
    new = {"S": S, "S_start": S_start}
    if Z is not None:
        new["Z"] = Z
    return o, new


def deep_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None,
    chunk_size: int,
    state: DeepState,
    offset: int = 0,
    *,
    gamma: torch.Tensor | None = None,
    objective: str = "l2",
    act: str = "silu",
) -> tuple[torch.Tensor, DeepState]:
    """The deep memory `M(z) = z + W₁σ(W₂z)` over a stream piece, chunk-parallel (see `hope.memory.deep`).

    `state` holds "w2", "w1" (and "m2", "m1" with momentum) and, once a stream has started, the chunk-start
    weights "w2_start", "w1_start"; `offset` as in `memory_stream`. Returns (o `[B, T, H, K]`, new state).
    """
    if not 0 <= offset < chunk_size:
        raise ValueError(f"offset must be in [0, chunk_size={chunk_size}), got {offset}")
    weights = {name: t for name, t in state.items() if not name.endswith("_start")}
    start = {name: state[f"{name}_start"] for name in ("w2", "w1")} if "w2_start" in state else None
    o, new, start = deep_chunked(q, k, v, eta, alpha, beta, chunk_size, weights, gamma=gamma, objective=objective,
                                 act=act, offset=offset, chunk_start=start)
    return o, {**new, "w2_start": start["w2"], "w1_start": start["w1"]}
