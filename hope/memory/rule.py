"""The inner-loop rule of a linear memory (docs/design.md §3): one-token `step` and the token-by-token oracle.

Legend: B batch, T time, H heads, K key width, V value width, C chunk.

A head's memory is a matrix S `[V, K]`; it is stored transposed, `P = Sᵀ` `[B, H, K, V]`, so that the read
`o_t = S_t q_t` is the row-vector product `o_tᵀ = q_tᵀ P_t` and batched matmuls need no transposes.
Every faster form (`hope.memory.chunked`, the Triton kernels) is tested against `recurrent` below.
"""

from __future__ import annotations

import torch

from hope.memory.config import OBJECTIVES

# what the rule computes: the user-facing objectives plus the self-generated target "self" (eqs. 84/87) of the
# projection memories (and of M_mem with `MemoryConfig.self_target_mem`)
RULE_OBJECTIVES = (*OBJECTIVES, "self")

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (for tight tests); every other dtype is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def write_value(
    v: torch.Tensor, k: torch.Tensor, chunk_state: torch.Tensor, objective: str
) -> torch.Tensor:
    """The value u_t written along k_t, i.e. minus the inner gradient at the chunk-start state S_c.

        "l2":   u = v − S_c k          from ½‖S k − v‖²           (eq. 93, with the target v̂ = v)
        "dot":  u = v                  from −⟨S k, v⟩             (eq. 92, descent sign)
        "self": u = S_c v − S_c k      from ½‖S k − S_c v‖²       (eqs. 84/87/93: the self-generated target
                                                                   v̂ = M_c(v), held fixed in the inner gradient)

    Shapes: k `[..., K]`, chunk_state `[..., K, V]`; v is `[..., V]`, except for "self" where v is an input
    `[..., K]` that the memory maps to its own target. Returns u `[..., V]`.
    """
    if objective == "dot":
        return v
    read = lambda z: torch.einsum("...k,...kv->...v", z, chunk_state)  # S_c z  # [..., V]
    if objective == "l2":
        return v - read(k)
    if objective == "self":
        return read(v - k)
    raise ValueError(f"objective must be one of {RULE_OBJECTIVES}, got {objective!r}")


def step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_state: torch.Tensor, *, gamma: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None, objective: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One token of the rule, read after write (docs/design.md §3; arXiv:2512.24695 eqs. 88, 90, 92–93).

    Without momentum (`gamma is None`):

        S_t = S_{t−1} (α_t I − β_t k_t k_tᵀ) + η_t u_t k_tᵀ
        o_t = S_t q_t

    With momentum (the "w/o momentum" ablation of Table 6 turned on; Titans eq. 14 in this rule's form):

        Z_t = γ_t Z_{t−1} + η_t u_t k_tᵀ
        S_t = S_{t−1} (α_t I − β_t k_t k_tᵀ) + Z_t
        o_t = S_t q_t

    | symbol | argument      | shape        | meaning                                                        |
    |--------|---------------|--------------|----------------------------------------------------------------|
    | Sᵀ     | state         | [B, H, K, V] | memory before the token, S_{t−1}, stored transposed            |
    | S_cᵀ   | chunk_state   | [B, H, K, V] | memory at the start of the token's chunk, S_{c(t)}             |
    | q, k   | q, k          | [B, H, K]    | query and key (k ℓ2-normalised by the caller)                  |
    | v      | v             | [B, H, V]    | target ([B, H, K] input for objective "self")                  |
    | η      | eta           | [B, H]       | learning rate                                                  |
    | α      | alpha         | [B, H]       | retention (weight decay), in (0, 1]                            |
    | β      | beta          | [B, H]       | erase: β = η is DGD (eq. 88); β = 0 (or None) is plain GD      |
    | γ      | gamma         | [B, H]       | momentum decay, in [0, 1] (γ = 0 equals no momentum)           |
    | Zᵀ     | momentum      | [B, H, K, V] | momentum Z_{t−1}, stored transposed (zeros if None)            |
    | u      | —             | [B, H, V]    | written value, `write_value(v, k, S_c, objective)`             |

    Inputs must already be in the compute dtype (fp32 or fp64). Returns `(o [B, H, V], S_tᵀ, Z_tᵀ or None)`.
    """
    u = write_value(v, k, chunk_state, objective)  # [B, H, V]
    write = eta[..., None, None] * k[..., :, None] * u[..., None, :]  # η k uᵀ = (η u kᵀ)ᵀ  # [B, H, K, V]
    if gamma is not None:
        momentum = write if momentum is None else gamma[..., None, None] * momentum + write
        write = momentum
    new_state = alpha[..., None, None] * state + write  # [B, H, K, V]
    if beta is not None:  # (αI − βkkᵀ) Sᵀ: erase what the memory holds along k
        held = torch.einsum("bhk,bhkv->bhv", k, state)  # kᵀ Sᵀ = (S k)ᵀ  # [B, H, V]
        new_state = new_state - beta[..., None, None] * k[..., :, None] * held[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q, new_state)  # [B, H, V]
    return o, new_state, momentum


def value_width(v: torch.Tensor, initial_state: State | None, objective: str) -> int:
    """V of a call: v's last dim, except for objective "self", whose v is an input `[..., K]` that the memory maps
    to its own target, so V is the state's; "self" therefore needs `initial_state` (raises without it)."""
    if objective != "self":
        return v.shape[-1]
    S0 = initial_state[0] if isinstance(initial_state, tuple) else initial_state
    if S0 is None:
        raise ValueError("objective 'self' needs initial_state: a zero memory generates zero targets forever")
    return S0.shape[-1]


def in_compute_dtype(dtype: torch.dtype, *xs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """xs cast to `dtype` (the compute dtype of the call, `compute_dtype(q)`); None stays None."""
    return tuple(None if x is None else x.to(dtype) for x in xs)


def check_pair(initial_state: tuple, momentum: bool) -> None:
    """An `(Sᵀ, Zᵀ)` pair as initial state is for momentum only (`gamma` given), and holds two tensors."""
    if not momentum:
        raise ValueError("initial_state is an (S, Z) pair but gamma is None (momentum off); pass S alone")
    if len(initial_state) != 2:
        raise ValueError(f"initial_state pair must be (S, Z), got {len(initial_state)} tensors")


def split_state(
    initial_state: State | None, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
    momentum: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Sᵀ, Zᵀ) from `initial_state` (a tensor, or a pair `(S, Z)` when momentum is on), zeros where absent."""
    zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)
    if initial_state is None:
        return zeros(), (zeros() if momentum else None)
    if isinstance(initial_state, tuple):
        check_pair(initial_state, momentum)
        s, z = initial_state
        return s.to(dtype), z.to(dtype)
    return initial_state.to(dtype), (zeros() if momentum else None)


def prepare(q, k, v, eta, alpha, beta, gamma, initial_state: State | None, objective: str):
    """The common start of `recurrent` and `chunked.chunked` (shapes as in `recurrent`): returns
    ((q, k, v, eta, alpha, beta, gamma) in the compute dtype, Sᵀ `[B, H, K, V]`, Zᵀ or None), the states from
    `initial_state` by `split_state`."""
    dtype = compute_dtype(q)
    B, _, H, K = q.shape
    V = value_width(v, initial_state, objective)
    state, momentum = split_state(initial_state, (B, H, K, V), dtype, q.device, gamma is not None)
    return in_compute_dtype(dtype, q, k, v, eta, alpha, beta, gamma), state, momentum


def recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
    beta: torch.Tensor | None, chunk_size: int, initial_state: State | None = None, output_final_state: bool = False,
    *, gamma: torch.Tensor | None = None, objective: str = "l2",
) -> tuple[torch.Tensor, State | None]:
    """Token-by-token oracle: `step` applied for t = 0 … T−1, chunks aligned to position 0 of this call.

    Shapes: q, k `[B, T, H, K]`; v `[B, T, H, V]` (`[B, T, H, K]` for objective "self"); eta, alpha, beta, gamma
    `[B, T, H]`; state `[B, H, K, V]` (Sᵀ), or the pair `(Sᵀ, Zᵀ)` when momentum is on (`gamma` given; a lone
    tensor then means Z₀ = 0). Objective "self" reads V from `initial_state`, which it therefore needs.
    Returns `o` `[B, T, H, V]` in q's dtype and the final state (None unless `output_final_state`; kept in the
    compute dtype, fp32 or fp64, like the state of the kernels). Differentiable with respect to every input.
    """
    in_dtype, (B, T, H, _) = q.dtype, q.shape
    (q, k, v, eta, alpha, beta, gamma), state, momentum = prepare(q, k, v, eta, alpha, beta, gamma, initial_state,
                                                                  objective)
    V = state.shape[-1]
    outputs = []
    chunk_state = state
    for t in range(T):
        if t % chunk_size == 0:
            chunk_state = state  # S_{c(t)}: the memory as the previous chunk left it
        o, state, momentum = step(
            state, q[:, t], k[:, t], v[:, t], eta[:, t], alpha[:, t], None if beta is None else beta[:, t], chunk_state,
            gamma=None if gamma is None else gamma[:, t], momentum=momentum, objective=objective,
        )
        outputs.append(o)
    o = (torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, V)).to(in_dtype)  # [B, T, H, V]
    if not output_final_state:
        return o, None
    return o, (state if gamma is None else (state, momentum))
