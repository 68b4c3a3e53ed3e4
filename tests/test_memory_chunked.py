"""The chunk-parallel form `hope.memory.chunked` against the oracle `hope.memory.rule.recurrent`.

Legend: B batch, T time, H heads, K key width, V value width, C chunk.
Forward, final state and every gradient in fp64 (relative RMS ≤ 1e-10), fp32/fp16 against fp64, stability.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import gates, memory_inputs, rel_rms

from hope.memory.chunked import chunk_operators, chunk_step, chunked
from hope.memory.rule import RULE_OBJECTIVES as OBJECTIVES
from hope.memory.rule import recurrent

DT = torch.float64
ERASES = ("dgd", "gd", "none")  # β = η, β = 0 as a tensor, β = None (skips the solve)


def make_case(T, objective, erase, momentum, with_state, B=2, H=2, K=4, V=3, seed=0, dtype=DT):
    x, r = memory_inputs(B, T, H, K, K if objective == "self" else V, seed=seed, dtype=dtype)
    x = gates(x, r, erase, momentum)
    x["S0"] = r(B, H, K, V) if with_state or objective == "self" else None
    x["Z0"] = r(B, H, K, V) if momentum and with_state else None
    return x


def run(fn, x, C, objective):
    state = x["S0"] if x["Z0"] is None else (x["S0"], x["Z0"])
    args = (x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], C, state, True)
    o, final = fn(*args, gamma=x["gamma"], objective=objective)
    return o, (final if isinstance(final, tuple) else (final,))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("erase", ERASES)
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_and_final_state_match_oracle(objective, erase, momentum, with_state):
    for T, C in itertools.product([1, 7, 64, 100], [1, 3, 16]):
        x = make_case(T, objective, erase, momentum, with_state, seed=T * 31 + C)
        o_ref, s_ref = run(recurrent, x, C, objective)
        o, s = run(chunked, x, C, objective)
        assert o.shape == o_ref.shape and len(s) == len(s_ref)
        assert rel_rms(o, o_ref) < 1e-10, (T, C)
        for got, ref in zip(s, s_ref):
            assert rel_rms(got, ref) < 1e-10, (T, C)


def grads(fn, x, C, objective, seed=1):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    y = {**x, **leaves}
    o, s = run(fn, y, C, objective)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=DT)).sum()
    loss = loss + sum((t * torch.randn(t.shape, generator=g, dtype=DT)).sum() for t in s)
    loss.backward()
    return {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("erase", ERASES)
@pytest.mark.parametrize("momentum", [False, True])
def test_gradients_match_oracle(objective, erase, momentum):
    """Outer gradients flow through the writes: q, k, v, η, α, β, γ and the initial states."""
    for T, C in ((7, 3), (40, 16), (5, 1)):  # C = 1 and a one-token tail: the one-token operators
        x = make_case(T, objective, erase, momentum, with_state=True, seed=T + C)
        g_ref, g = grads(recurrent, x, C, objective), grads(chunked, x, C, objective)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            assert g[name] is not None, name
            assert rel_rms(g[name], g_ref[name]) < 1e-10, (name, T, C)


def test_zero_gate_is_handled():
    """α = 0 (a sigmoid that underflowed) resets the memory without NaN in the log-domain decays."""
    x = make_case(12, "l2", "dgd", True, True)
    x["alpha"][:, 5] = 0.0
    x["gamma"][:, 2] = 0.0
    o_ref, s_ref = run(recurrent, x, 4, "l2")
    o, s = run(chunked, x, 4, "l2")
    assert torch.isfinite(o).all() and rel_rms(o, o_ref) < 1e-10 and rel_rms(s[0], s_ref[0]) < 1e-10
    g = grads(chunked, x, 4, "l2")
    assert all(torch.isfinite(t).all() for t in g.values())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_low_precision_against_fp64(dtype, tol):
    x = make_case(100, "l2", "dgd", False, True, B=2, H=2, K=16, V=16, dtype=torch.float32)
    x64 = {n: None if t is None else t.double() for n, t in x.items()}
    o_ref, s_ref = run(recurrent, x64, 16, "l2")
    for name in ("q", "k", "v"):
        x[name] = x[name].to(dtype)
    o, s = run(chunked, x, 16, "l2")
    assert o.dtype == dtype and s[0].dtype == torch.float32
    # fp16 error comes from rounding q, k, v to fp16 before the fp32 computation
    assert rel_rms(o.double(), o_ref) < tol and rel_rms(s[0].double(), s_ref[0]) < tol


def long_run(erase, C, eta_max, T=4096, B=1, H=2, K=32, V=32, retention=True):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    eta = eta_max * torch.sigmoid(2 * r(B, T, H))
    beta = eta if erase == "dgd" else torch.zeros_like(eta)
    alpha = torch.sigmoid(2 * r(B, T, H) + 2) if retention else torch.ones(B, T, H)
    k = F.normalize(r(B, T, H, K) + 2.0, dim=-1)  # correlated keys, the hard case for stability
    return chunked(r(B, T, H, K), k, r(B, T, H, V), eta, alpha, beta, C, None, True)


@pytest.mark.parametrize("erase, C, eta_max", [("dgd", 64, 0.5), ("dgd", 16, 0.5), ("gd", 64, 1 / 64)])
def test_long_sequence_stays_bounded(erase, C, eta_max):
    """T = 4096 with η = η_max·sigmoid(·) bounded as docs/design.md §3 (with GD the chunk's steps add up, see below)."""
    o, S = long_run(erase, C, eta_max)
    K, V = S.shape[-2:]
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert S.norm(dim=(-2, -1)).max() < 10 * (K * V) ** 0.5  # a bounded memory, O(‖v‖·rank)


def test_gd_chunks_need_a_step_over_the_chunk_size_but_dgd_does_not():
    """Inside a chunk every GD gradient is taken at S_c, so S_c is multiplied by I − Σ_t η_t k_t k_tᵀ: with
    correlated keys that leaves [−1, 1] once Σ η > 2. DGD's erase keeps it bounded (with α = 1 the map is
    2 Π_t(I − η_t k_t k_tᵀ) − I). A property of the rule (the oracle agrees), which is why GD needs η ≲ 1/C."""
    _, S_gd = long_run("gd", 64, 0.5, T=512, retention=False)
    _, S_dgd = long_run("dgd", 64, 0.5, T=512, retention=False)
    assert S_gd.norm() > 1e6 and S_dgd.norm() < 1e3


def test_chunk_step_composes_over_a_split_chunk():
    """Running a chunk as two partial chunks (same start state for the writes) equals one chunk_step."""
    x = make_case(10, "dot", "dgd", True, True)
    to_bh = lambda t: t.movedim(1, 2)  # [B, H, T, ·]
    q, k, v, eta, alpha, beta, gamma = (to_bh(x[n]) for n in ("q", "k", "v", "eta", "alpha", "beta", "gamma"))
    w = eta[..., None] * v  # dot objective: x_t = η_t v_t
    o, S, Z = chunk_step(chunk_operators(k, alpha, beta, q, gamma), x["S0"], w, x["Z0"])
    a = slice(0, 4)
    b = slice(4, 10)
    o1, S1, Z1 = chunk_step(chunk_operators(k[:, :, a], alpha[:, :, a], beta[:, :, a], q[:, :, a], gamma[:, :, a]),
                            x["S0"], w[:, :, a], x["Z0"])
    o2, S2, Z2 = chunk_step(chunk_operators(k[:, :, b], alpha[:, :, b], beta[:, :, b], q[:, :, b], gamma[:, :, b]),
                            S1, w[:, :, b], Z1)
    assert rel_rms(torch.cat([o1, o2], dim=2), o) < 1e-12
    assert rel_rms(S2, S) < 1e-12 and rel_rms(Z2, Z) < 1e-12
