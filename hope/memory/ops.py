"""The memory ops: input checks, backend choice, then the PyTorch forms or the Triton kernels.

Legend: B batch, T time, H heads, K key width, V value width, C chunk.

- `memory_update`: the linear memory over one sequence (chunks aligned to its start);
- `memory_stream`: the same for a stream fed in pieces (`LinearState` carried, chunks aligned to the stream);
- `deep_memory`: the deep memory `z + W₁σ(W₂z)` over a stream piece (`DeepState` carried);
- `check_inputs`: the one validator of their arguments; `resolve_backend`: which backend actually runs.

This is the only module that imports `hope.memory.kernels` (lazily, and never for CPU inputs under "auto"), so
`import hope` works without Triton. The short public name of these is `hope.ops`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import torch

from hope._checks import check_tensor
from hope.memory.bounds import head_body_tail
from hope.memory.chunked import chunked, partial_chunk
from hope.memory.config import BACKENDS
from hope.memory.deep import deep_chunked
from hope.memory.rule import RULE_OBJECTIVES, State, check_pair, recurrent, value_width
from hope.memory.state import DeepState, LinearState

_WARNED: set[str] = set()  # fallback reasons already warned about (each once per process)


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed and `hope.memory.kernels` imports (cached; from any working directory)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("hope.memory.kernels")
    except Exception:  # ImportError, or a Triton install that fails at import on this machine
        return False
    return True


def _triton_unsupported(q: torch.Tensor, gamma: torch.Tensor | None, objective: str) -> str | None:
    """Why the Triton kernel cannot run these inputs (None when it can). CPU inputs never import Triton."""
    if not q.is_cuda:
        return f"the kernel needs CUDA inputs, got device {q.device}"
    if gamma is not None:
        return "momentum (gamma) is not supported by the kernel"
    if objective != "l2":
        return f"objective {objective!r} is not supported by the kernel (only 'l2')"
    if q.dtype == torch.float64:
        return "float64 is not supported by the kernel (fp32, fp16, bf16)"
    if not triton_available():
        return "Triton is not installed (or hope.memory.kernels does not import)"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"memory_update(backend='auto') runs the PyTorch form on CUDA: {reason}", stacklevel=4)


def resolve_backend(
    backend: str, q: torch.Tensor, gamma: torch.Tensor | None = None, objective: str = "l2"
) -> str:
    """The backend that will actually run: "torch", "recurrent" or "triton".

    "auto" is "triton" for CUDA inputs when Triton is available and the knobs are supported (no momentum,
    objective "l2", not fp64); on CUDA otherwise it is "torch" with a warning, once per distinct reason; on CPU it
    is "torch", silently and without importing Triton. `backend="triton"` that cannot run raises ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "recurrent") or (backend == "auto" and not q.is_cuda):
        return "torch" if backend == "auto" else backend
    why = _triton_unsupported(q, gamma, objective)
    if why is None:
        return "triton"
    if backend == "triton":
        raise ValueError(
            f"backend='triton' is unavailable: {why} (it runs CUDA inputs in fp16/bf16/fp32, objective 'l2', no "
            f"momentum; got device {q.device}, dtype {q.dtype}, objective {objective!r}, "
            f"gamma {'given' if gamma is not None else 'None'})"
        )
    _warn_once(why)
    return "torch"


def _check_tensor(name: str, x: object, shape: tuple[int, ...], device: torch.device) -> None:
    check_tensor(name, x, device)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")


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
    """Validate `memory_update`'s arguments (messages name the offending value); returns V.

    The one validator of the memory ops; the checks that the PyTorch forms need themselves (objective "self"
    needs a state, an (S, Z) pair needs momentum) are `rule.value_width` and `rule.check_pair`, used here too.
    """
    check_tensor("q", q, getattr(q, "device", None))
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {list(q.shape)}")
    if objective not in RULE_OBJECTIVES:
        raise ValueError(f"objective must be one of {RULE_OBJECTIVES}, got {objective!r}")
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
    V = value_width(v, initial_state, objective)
    if isinstance(initial_state, tuple):
        check_pair(initial_state, gamma is not None)
        for name, x in zip(("initial_state[0]", "initial_state[1]"), initial_state):
            _check_tensor(name, x, (B, H, K, V), q.device)
    elif initial_state is not None:
        _check_tensor("initial_state", initial_state, (B, H, K, V), q.device)
    _check_values(q=q, k=k, v=v, eta=eta, alpha=alpha, beta=beta, gamma=gamma)
    return V


def _triton_kernel():
    """`hope.memory.kernels.chunk_memory_update` (imported on first use: it imports Triton)."""
    return importlib.import_module("hope.memory.kernels").chunk_memory_update


def memory_update(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_size: int, initial_state: State | None = None, output_final_state: bool = False,
    backend: str = "auto", *, gamma: torch.Tensor | None = None, objective: str = "l2",
) -> tuple[torch.Tensor, State | None]:
    """The inner-loop rule of a linear memory over a sequence (docs/design.md §3, arXiv:2512.24695 eqs. 88–93):

        S_t = S_{t−1}(α_t I − β_t k_t k_tᵀ) + η_t u_t k_tᵀ,   o_t = S_t q_t,   u_t = v_t − S_{c(t)} k_t ("l2"),
        u_t = v_t ("dot"), u_t = S_{c(t)}(v_t − k_t) ("self"); with momentum Z_t = γ_t Z_{t−1} + η_t u_t k_tᵀ
        and S_t = S_{t−1}(α_t I − β_t k_t k_tᵀ) + Z_t.

    c(t) is the last token of the previous chunk (chunks of `chunk_size` aligned to position 0 of this call).

    Args:
        q, k: `[B, T, H, K]` (k ℓ2-normalised by the caller); v: `[B, T, H, V]` (`[B, T, H, K]` for "self").
        eta, alpha, beta, gamma: `[B, T, H]`; α in (0, 1], β ≥ 0 (None = 0, plain GD), γ ≥ 0 (None = no momentum).
        initial_state: Sᵀ `[B, H, K, V]` (zeros if None), or `(Sᵀ, Zᵀ)` with momentum.
        backend: "torch" (chunk-parallel PyTorch), "recurrent" (token-by-token oracle), "triton"
            (`hope.memory.kernels.chunk_memory_update`: linear memory, "l2", no momentum, CUDA), or "auto"
            (see `resolve_backend`: Triton where it can run, else "torch", with a warning on CUDA).

    Returns `(o [B, T, H, V]` in q's dtype, final state or None`)`; the state is kept in fp32 (fp64 for fp64).
    """
    check_inputs(q, k, v, eta, alpha, beta, chunk_size, initial_state, gamma, objective)
    args = (q, k, v, eta, alpha, beta, chunk_size, initial_state, output_final_state)
    resolved = resolve_backend(backend, q, gamma, objective)
    if resolved == "triton":
        # the kernels take contiguous inputs and an fp32 state (views of projections are not contiguous)
        cont = [None if t is None else t.contiguous() for t in (q, k, v, eta, alpha, beta)]
        s0 = None if initial_state is None else initial_state.float().contiguous()
        return _triton_kernel()(*cont, chunk_size, s0, output_final_state)
    if resolved == "recurrent":
        return recurrent(*args, gamma=gamma, objective=objective)
    return chunked(*args, gamma=gamma, objective=objective)


def memory_stream(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_size: int, state: LinearState, offset: int, backend: str = "auto", *,
    gamma: torch.Tensor | None = None, objective: str = "l2", anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """`memory_update` for a stream fed in pieces: chunks aligned to the stream's start, not to this call's.

    `state`: Sᵀ now, Sᵀ at the start of the current chunk and Zᵀ (momentum only), all `[B, H, K, V]`; `offset` =
    tokens of the current chunk already seen (stream position mod chunk_size). The tokens finishing the current
    chunk and those after the last boundary run as partial chunks; the aligned middle goes to `memory_update`
    (Triton-capable). Returns (o `[B, T, H, V]`, the new state).

    `anchor` S₀ᵀ `[H, K, V]` or `[B, H, K, V]` (`MemoryConfig.retain_toward="init"`): retention pulls the memory
    toward S₀ instead of 0, S_t − S₀ = (S_{t−1} − S₀)(α_t I − β_t k_t k_tᵀ) + η_t u_t k_tᵀ with u_t taken at the
    whole S_c. That is the rule itself on D = S − S₀ with the target v_t − S₀k_t ("l2"; v_t for "dot") and the
    read o_t = D_t q_t + S₀ q_t, which is how it is computed here ("self" would need S₀ inside the rule: refused).
    """
    if anchor is not None:
        if objective == "self":
            raise ValueError("memory_stream: anchor (retain_toward='init') needs objective 'l2' or 'dot', got 'self' "
                             "(the fused PyTorch path of the self-modifying core handles it)")
        A = anchor.to(state.S.dtype).expand_as(state.S)  # S₀ᵀ  # [B, H, K, V]
        read = lambda z: torch.einsum("bthk,bhkv->bthv", z.to(A.dtype), A)  # S₀ z  # [B, T, H, V]
        v = v - read(k).to(v.dtype) if objective == "l2" else v
        shifted = LinearState(state.S - A, state.S_start - A, state.Z)
        o, new = memory_stream(q, k, v, eta, alpha, beta, chunk_size, shifted, offset, backend, gamma=gamma,
                               objective=objective)
        return o + read(q).to(o.dtype), LinearState(new.S + A, new.S_start + A, new.Z)
    T, C = q.shape[1], chunk_size
    head, n_full, _ = head_body_tail(T, offset, C)
    body = n_full * C
    S, S_start, Z = state.S, state.S_start, state.Z
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
    return o, LinearState(S, S_start, Z)


def deep_memory(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_size: int, state: DeepState, offset: int = 0, *,
    gamma: torch.Tensor | None = None, objective: str = "l2", act: str = "silu",
) -> tuple[torch.Tensor, DeepState]:
    """The deep memory `M(z) = z + W₁σ(W₂z)` over a stream piece, chunk-parallel (see `hope.memory.deep`).

    `state`: the weights W₂ᵀ, W₁ᵀ, their values at the start of the current chunk, and the momenta (momentum
    only; zeros when absent); `offset` as in `memory_stream`. Returns (o `[B, T, H, K]`, the new state).
    """
    start = {"w2": state.w2_start, "w1": state.w1_start}
    o, new, start = deep_chunked(q, k, v, eta, alpha, beta, chunk_size, state.weights(), gamma=gamma,
                                 objective=objective, act=act, offset=offset, chunk_start=start)
    return o, DeepState(new["w2"], new["w1"], start["w2"], start["w1"], new.get("m2"), new.get("m1"))
