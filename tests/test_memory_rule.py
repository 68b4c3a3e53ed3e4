"""The token-by-token oracle `hope.memory.rule` against hand-written forms of the rule (fp64).

Legend: B batch, T time, H heads, K key width, V value width, C chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import memory_inputs, rel_rms

from hope.memory.rule import recurrent, step

DT = torch.float64


def inputs(B=2, T=9, H=3, K=4, V=5, seed=0):
    x, _ = memory_inputs(B, T, H, K, V, seed=seed)
    return x["q"], x["k"], x["v"], x["eta"], x["alpha"]


def test_gd_chunk1_is_the_gated_delta_rule():
    """β = 0, C = 1 is the gated delta rule in flash-linear-attention's form S_t = a_t S_{t−1}(I − b_t k kᵀ) +
    b_t v' kᵀ with a = α, b = η/α, v' = α v (docs/design.md §7), written here in the untransposed S [V, K]."""
    q, k, v, eta, alpha = inputs()
    B, T, H, K = q.shape
    S = torch.randn(B, H, v.shape[-1], K, dtype=DT)
    o_ref = []
    S_loop = S.clone()
    for t in range(T):
        a, b = alpha[:, t, :, None, None], (eta / alpha)[:, t, :, None, None]
        kt, vt = k[:, t, :, :, None], alpha[:, t, :, None, None] * v[:, t, :, :, None]  # [B, H, K|V, 1]
        eye = torch.eye(K, dtype=DT)
        S_loop = a * S_loop @ (eye - b * kt @ kt.mT) + b * vt @ kt.mT  # [B, H, V, K]
        o_ref.append((S_loop @ q[:, t, :, :, None])[..., 0])
    o_ref = torch.stack(o_ref, dim=1)  # [B, T, H, V]
    o, final = recurrent(q, k, v, eta, alpha, torch.zeros_like(eta), 1, S.mT, True)
    assert rel_rms(o, o_ref) < 1e-12
    assert rel_rms(final, S_loop.mT) < 1e-12


def test_dgd_step_by_hand():
    """One step of DGD (β = η) with the ℓ2 objective, chunk-start state S_c ≠ S_{t−1}."""
    B, H, K, V = 2, 3, 4, 5
    q, k, v = torch.randn(B, H, K, dtype=DT), F.normalize(torch.randn(B, H, K, dtype=DT), dim=-1), torch.randn(
        B, H, V, dtype=DT)
    eta, alpha = torch.rand(B, H, dtype=DT) * 0.5, torch.rand(B, H, dtype=DT)
    S, Sc = torch.randn(B, H, V, K, dtype=DT), torch.randn(B, H, V, K, dtype=DT)  # untransposed [V, K]
    e, a = eta[..., None, None], alpha[..., None, None]
    kc = k[..., :, None]  # [B, H, K, 1]
    u = v[..., :, None] - Sc @ kc  # [B, H, V, 1]
    S_new = S @ (a * torch.eye(K, dtype=DT) - e * kc @ kc.mT) + e * u @ kc.mT
    o, P_new, Z = step(S.mT, q, k, v, eta, alpha, eta, Sc.mT)
    assert Z is None
    assert rel_rms(P_new, S_new.mT) < 1e-13
    assert rel_rms(o, (S_new @ q[..., None])[..., 0]) < 1e-13


@pytest.mark.parametrize("objective", ["l2", "dot", "self"])
def test_zero_momentum_decay_equals_no_momentum(objective):
    """γ = 0 makes Z_t = η u kᵀ, the plain write, so the momentum form reduces to the rule without it."""
    q, k, v, eta, alpha = inputs()
    if objective == "self":
        v = torch.randn_like(k)
    S0 = torch.randn(*q.shape[:1], q.shape[2], q.shape[3], 5, dtype=DT)
    o1, s1 = recurrent(q, k, v, eta, alpha, eta, 3, S0, True, objective=objective)
    o2, (s2, z2) = recurrent(q, k, v, eta, alpha, eta, 3, S0, True, gamma=torch.zeros_like(eta), objective=objective)
    assert rel_rms(o2, o1) < 1e-13 and rel_rms(s2, s1) < 1e-13


def test_chunk_start_state_is_used_inside_a_chunk():
    """With C = T the ℓ2 error of every token is measured against S_0, so the write equals the dot-product
    objective's write with targets v − S_0 k (a check that c(t) is the chunk start, not t − 1)."""
    q, k, v, eta, alpha = inputs(T=6)
    S0 = torch.randn(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=DT)
    o_l2, s_l2 = recurrent(q, k, v, eta, alpha, eta, 6, S0, True, objective="l2")
    targets = v - torch.einsum("bthk,bhkv->bthv", k, S0)
    o_dot, s_dot = recurrent(q, k, targets, eta, alpha, eta, 6, S0, True, objective="dot")
    assert rel_rms(o_l2, o_dot) < 1e-13 and rel_rms(s_l2, s_dot) < 1e-13
    o_c1, _ = recurrent(q, k, v, eta, alpha, eta, 1, S0, True, objective="l2")
    assert rel_rms(o_c1, o_l2) > 1e-3  # the chunk size matters


def test_dtypes_follow_the_inputs():
    q, k, v, eta, alpha = (x.float() for x in inputs())
    o, S = recurrent(q.half(), k.half(), v.half(), eta, alpha, eta, 4, None, True)
    assert o.dtype == torch.float16 and S.dtype == torch.float32
    o64, S64 = recurrent(q.double(), k.double(), v.double(), eta, alpha, eta, 4, None, True)
    assert o64.dtype == torch.float64 and S64.dtype == torch.float64
    assert rel_rms(o.double(), o64) < 5e-3


def test_self_objective_needs_a_state():
    q, k, v, eta, alpha = inputs()
    with pytest.raises(ValueError, match="initial_state"):
        recurrent(q, k, k, eta, alpha, eta, 4, objective="self")
