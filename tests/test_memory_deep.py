"""Deep memory `M(z) = z + W₁σ(W₂z)`: closed-form inner gradients, chunked form against the oracle (fp64).

Legend: B batch, T time, H heads, K width, F hidden width, C chunk.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import gates, memory_inputs, rel_rms

from hope.memory.deep import activation, deep_chunked, deep_recurrent, inner_grad, mlp

DT = torch.float64


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_activation_derivative_matches_autograd(act):
    x = torch.linspace(-6, 6, 101, dtype=DT, requires_grad=True)
    y, dy = activation(x, act)
    ref = F.silu(x) if act == "silu" else F.gelu(x)
    assert rel_rms(y, ref) < 1e-14
    (g,) = torch.autograd.grad(ref.sum(), x)
    assert rel_rms(dy, g) < 1e-14


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_closed_form_inner_gradient_matches_torch_func_grad(act):
    """∇_{W₂}½‖M(k) − v̂‖² = δ kᵀ and ∇_{W₁} = e hᵀ (stored transposed), batched over tokens with vmap."""
    K, Fh, T = 5, 7, 6
    w2, w1 = torch.randn(K, Fh, dtype=DT), torch.randn(Fh, K, dtype=DT)
    k, target = torch.randn(T, K, dtype=DT), torch.randn(T, K, dtype=DT)
    loss = lambda w2, w1, k, t: 0.5 * (mlp(k[None], w2, w1, act)[0] - t).pow(2).sum()
    g2, g1 = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w2, w1, k, target)
    delta, err, h = inner_grad(k, target, w2, w1, act)
    assert rel_rms(k[:, :, None] * delta[:, None, :], g2) < 1e-13
    assert rel_rms(h[:, :, None] * err[:, None, :], g1) < 1e-13


def make_case(T, objective, erase, momentum, B=2, H=2, K=4, Fh=6, seed=0):
    """erase "dgd" (β = η) or "gd" (β = None: W₂ without erase)."""
    x, r = memory_inputs(B, T, H, K, K, seed=seed)
    x = gates(x, r, "none" if erase == "gd" else erase, momentum)
    state = {"w2": 0.5 * r(B, H, K, Fh), "w1": 0.5 * r(B, H, Fh, K)}
    if momentum:
        state.update(m2=0.1 * r(B, H, K, Fh), m1=0.1 * r(B, H, Fh, K))
    return x, state


def run(fn, x, state, C, objective, act):
    out = fn(x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], C, state, gamma=x["gamma"],
             objective=objective, act=act)
    return out[0], out[1]


@pytest.mark.parametrize("objective", ["l2", "self"])
@pytest.mark.parametrize("erase", ["dgd", "gd"])
@pytest.mark.parametrize("momentum", [False, True])
def test_chunked_matches_oracle(objective, erase, momentum):
    for (T, C), act in itertools.product([(1, 3), (7, 1), (7, 3), (50, 16)], ["silu", "gelu"]):
        x, state = make_case(T, objective, erase, momentum, seed=T + C)
        o_ref, s_ref = run(deep_recurrent, x, state, C, objective, act)
        o, s = run(deep_chunked, x, state, C, objective, act)
        assert s.keys() == s_ref.keys()
        assert rel_rms(o, o_ref) < 1e-10, (T, C, act)
        for name in s_ref:
            assert rel_rms(s[name], s_ref[name]) < 1e-10, (name, T, C, act)


@pytest.mark.parametrize("objective, erase, momentum", [("l2", "dgd", False), ("self", "gd", True)])
def test_gradients_match_oracle(objective, erase, momentum):
    """Outer gradients through the closed-form inner gradients: inputs, gates and the initial weights."""
    x, state = make_case(12, objective, erase, momentum)
    results = []
    for fn in (deep_recurrent, deep_chunked):
        leaves = {n: t.clone().requires_grad_() for n, t in {**x, **state}.items() if t is not None}
        y = {n: leaves.get(n) for n in x}
        o, s = run(fn, y, {n: leaves[n] for n in state}, 5, objective, "silu")
        g = torch.Generator().manual_seed(3)
        loss = (o * torch.randn(o.shape, generator=g, dtype=DT)).sum()
        loss = loss + sum((s[n] * torch.randn(s[n].shape, generator=g, dtype=DT)).sum() for n in sorted(s))
        loss.backward()
        results.append({n: t.grad for n, t in leaves.items()})
    ref, got = results
    for name in ref:
        assert got[name] is not None and rel_rms(got[name], ref[name]) < 1e-10, name


def test_pieces_equal_one_call():
    """A stream fed in pieces (offsets inside chunks, one-token steps) equals one call."""
    x, state = make_case(23, "self", "dgd", True)
    o_ref, s_ref = run(deep_recurrent, x, state, 5, "self", "gelu")
    st, start, offset, outs = state, None, 0, []
    for a, b in [(0, 3), (3, 4), (4, 5), (5, 12), (12, 13), (13, 23)]:
        piece = {n: None if t is None else t[:, a:b] for n, t in x.items()}
        o, st, start = deep_chunked(piece["q"], piece["k"], piece["v"], piece["eta"], piece["alpha"], piece["beta"],
                                    5, st, gamma=piece["gamma"], objective="self", act="gelu", offset=offset,
                                    chunk_start=start)
        offset = (offset + b - a) % 5
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=1), o_ref) < 1e-10
    for name in s_ref:
        assert rel_rms(st[name], s_ref[name]) < 1e-10


def test_long_sequence_with_large_chunks_stays_bounded():
    """C = 64, T = 2048, no retention (α = 1): W₁'s normalised step η̃ = η/(1 + Cη‖h‖²) keeps the chunk's summed
    GD steps below 1 (with η itself the weights overflow to NaN)."""
    B, T, H, K, Fh = 1, 2048, 2, 16, 16
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    eta = 0.5 * torch.sigmoid(r(B, T, H))
    state = {"w2": r(B, H, K, Fh) * K**-0.5, "w1": r(B, H, Fh, K) * 0.02}
    o, s, _ = deep_chunked(r(B, T, H, K), F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, K), eta,
                           torch.ones(B, T, H), eta, 64, state)
    assert torch.isfinite(o).all() and s["w1"].abs().max() < 100 and s["w2"].abs().max() < 100


def test_missing_state_and_bad_objective_raise():
    x, state = make_case(4, "l2", "dgd", False)
    with pytest.raises(ValueError, match="'w2' and 'w1'"):
        run(deep_chunked, x, {"w2": state["w2"]}, 2, "l2", "silu")
    with pytest.raises(ValueError, match="objective"):
        run(deep_chunked, x, state, 2, "dot", "silu")
    with pytest.raises(ValueError, match="activation"):
        run(deep_chunked, x, state, 2, "l2", "relu")
    with pytest.raises(ValueError, match="chunk-start"):
        deep_chunked(x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["beta"], 4, state, offset=2)
