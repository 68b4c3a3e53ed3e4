"""`MemoryConfig.retain_toward="init"`: the self-modifying core's linear memories retain toward their meta-learned
initial state S₀ instead of zero (docs/design.md §3), in fp64.

The chunked core equals a token-by-token oracle written here from the rule
S_t − S₀ = (S_{t−1} − S₀)(α_t I − β_t k_t k_tᵀ) + η_t u_t k_tᵀ (u_t at the whole chunk-start memory), for the
projection memories and M_mem, with and without momentum; outputs and every parameter's outer gradient agree. With
retention toward zero the same oracle is the default core, which checks the oracle itself.

Legend: B batch, T time, D model width, H heads, K head width, P read width of the projection memory.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_rms, self_modifying_core

from experiments.continual import long_stream
from hope import HopeLM, preset
from hope.config import HopeConfig
from hope.layers.self_modifying import SelfModifyingCore
from hope.layers.titans import TitansCore
from hope.memory.config import MemoryConfig
from hope.memory.state import LinearState
from hope.ops import memory_stream

DT = torch.float64
D, H = 16, 2
K = D // H


def make_core(seed: int = 0, **knobs) -> SelfModifyingCore:
    return self_modifying_core(knobs, seed, D, H)


def _write(P, P_c, anchor, key, u, eta, alpha, beta, gamma=None, Z=None):
    """One token on a transposed memory Pᵀ `[B, H, K, V]`: P_t − A = (αI − βkkᵀ)(P_{t−1} − A) + η k uᵀ (+ momentum
    Z_t = γ Z_{t−1} + η k uᵀ in place of the last term); `u` `[B, H, V]` was computed at the chunk start P_c."""
    col = lambda g: g[..., None, None]
    Dt = P - anchor
    retained = col(alpha) * Dt - col(beta) * key[..., :, None] * (key[..., None, :] @ Dt)
    update = col(eta) * key[..., :, None] * u[..., None, :]
    if gamma is not None:
        Z = col(gamma) * Z + update
        update = Z
    return anchor + retained + update, Z


def oracle(core: SelfModifyingCore, x: torch.Tensor) -> torch.Tensor:
    """The core token by token, from the rule (linear per-head memories, self-generated projection targets, M_mem
    regressing onto v with DGD, momentum when configured, read after write)."""
    mc = core.mc
    B, T, _ = x.shape
    init = mc.retain_toward == "init"
    state = core.init_state(B)
    xs = F.silu(core.conv(x)[0])  # x̃  # [B, T, D]
    q_all = F.normalize(core.q_proj(xs).view(B, T, H, K), dim=-1)
    gamma = None if core.momentum_proj is None else torch.sigmoid(core.momentum_proj(x))  # [B, T, H]
    P, M = state.proj.S, state.mem.S  # Pᵀ [B, H, K, P], M_memᵀ [B, H, K, K]
    A_p = core.proj_init if init else torch.zeros_like(P)
    A_m = core.mem_init["S"] if init else torch.zeros_like(M)
    Z = None if gamma is None else torch.zeros_like(M)
    outputs = []
    for t in range(T):
        if t % mc.proj_chunk_size == 0:
            P_c = P
        if t % mc.chunk_size == 0:
            M_c = M
        z = xs[:, t].reshape(B, H, K)
        raw = torch.einsum("bhk,bhkp->bhp", z, P_c)
        k, v, eta_raw, alpha_raw = raw.split([K, K, 1, 1], dim=-1)
        k = F.normalize(k, dim=-1)
        alpha = torch.sigmoid(alpha_raw[..., 0] + core.alpha_bias)  # [B, H]
        eta = mc.eta_max * torch.sigmoid(eta_raw[..., 0] + core.eta_bias)
        vbar = F.normalize(v, dim=-1)
        read = lambda w, S: torch.einsum("bhk,bhkv->bhv", w, S)
        P, _ = _write(P, P_c, A_p, k, read(vbar, P_c) - read(k, P_c), eta, alpha, eta)  # M_c(v̄) − M_c(k)
        g = None if gamma is None else gamma[:, t]
        step = eta if g is None else eta * (1 - g)
        M, Z = _write(M, M_c, A_m, k, v - read(k, M_c), step, alpha, eta, g, Z)
        outputs.append(read(q_all[:, t], M))
    return core.output(torch.stack(outputs, dim=1), x)  # [B, T, D]


@pytest.mark.parametrize("retain", ["zero", "init"])
@pytest.mark.parametrize("momentum", [False, True])
def test_chunked_core_equals_the_token_by_token_oracle(retain, momentum):
    """Outputs and every parameter's outer gradient, one call and a stream fed in pieces, on both backends."""
    x = torch.randn(2, 19, D, dtype=DT, generator=torch.Generator().manual_seed(1))
    for backend in ("torch", "recurrent"):
        core = make_core(retain_toward=retain, momentum=momentum, backend=backend)
        y_ref = oracle(core, x)
        y, _ = core(x)
        assert rel_rms(y, y_ref) < 1e-10, backend
        ys, s = [], None
        for a, b in ((0, 3), (3, 9), (9, 19)):
            y_n, s = core(x[:, a:b], s)
            ys.append(y_n)
        assert rel_rms(torch.cat(ys, dim=1), y_ref) < 1e-10, backend
        w = torch.randn_like(y)
        grads = torch.autograd.grad((y * w).sum(), list(core.parameters()))
        grads_ref = torch.autograd.grad((y_ref * w).sum(), list(core.parameters()))
        for (name, _), g, g_ref in zip(core.named_parameters(), grads, grads_ref):
            assert g_ref.abs().max() > 0 and rel_rms(g, g_ref) < 1e-9, (backend, name)


def test_retention_toward_init_changes_the_core():
    """The switch is not a no-op: with α < 1 the memories decay toward S₀, not zero."""
    x = torch.randn(1, 24, D, dtype=DT, generator=torch.Generator().manual_seed(2))
    y0, _ = make_core(retain_toward="zero")(x)
    y1, _ = make_core(retain_toward="init")(x)
    assert rel_rms(y1, y0) > 1e-3


def test_memory_returns_to_its_initial_state_without_writes():
    """With zero learning rate a memory started elsewhere decays geometrically to S₀ (α^T of the distance left)."""
    B, T, V = 1, 40, 3
    g = torch.Generator().manual_seed(3)
    k = F.normalize(torch.randn(B, T, H, K, dtype=DT, generator=g), dim=-1)
    q, v = torch.randn(B, T, H, K, dtype=DT, generator=g), torch.randn(B, T, H, V, dtype=DT, generator=g)
    eta, alpha = torch.zeros(B, T, H, dtype=DT), torch.full((B, T, H), 0.9, dtype=DT)
    A = torch.randn(H, K, V, dtype=DT, generator=g)
    S = A + torch.randn(B, H, K, V, dtype=DT, generator=g)
    for backend in ("torch", "recurrent"):
        _, new = memory_stream(q, k, v, eta, alpha, eta, 8, LinearState(S, S, None), 0, backend, anchor=A)
        assert rel_rms(new.S - A, 0.9**T * (S - A)) < 1e-12, backend
        _, zero = memory_stream(q, k, v, eta, alpha, eta, 8, LinearState(S, S, None), 0, backend)
        assert rel_rms(zero.S, 0.9**T * S) < 1e-12, backend


@pytest.mark.parametrize("retain", ["zero", "init"])
def test_carried_core_memories_keep_their_scale_only_when_retained_toward_init(retain):
    """A tiny untrained HOPE reads 4K random bytes with its core carried in 512-token windows. Retaining toward
    zero, self-generated targets make the zero memory attracting and every core memory collapses (below a tenth of
    its norm after the first window; docs/design.md §5); retaining toward S₀, each stays within [½, 2]× it."""
    torch.manual_seed(0)
    config = preset("hope", "tiny", memory=MemoryConfig(retain_toward=retain), persist=True, carry_core=True)
    model = HopeLM(config).eval()
    ids = torch.randint(0, 256, (1, 1 << 12), generator=torch.Generator().manual_seed(4))
    _, series = long_stream.track_norms(model, ids, 512)
    core = {key: norms for key, norms in series.items() if key.endswith((".proj.S", ".mem.S"))}
    assert len(core) == 2 * config.n_layers
    for key, norms in core.items():
        assert all(math.isfinite(n) for n in norms), key
        ratio = norms[-1] / norms[0]
        assert (ratio < 0.1) if retain == "zero" else (0.5 <= min(norms) / norms[0] and max(norms) / norms[0] <= 2), \
            (key, norms)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"retain_toward": "start"}, r"retain_toward must be one of \('zero', 'init'\), got 'start'"),
        ({"retain_toward": "init", "mem_depth": "deep"}, r"linear memories only, got mem_depth='deep'"),
        ({"retain_toward": "init", "proj_depth": "deep", "gate_depth": "deep"},
         r"proj_depth='deep', gate_depth='deep'"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**kwargs)


def test_titans_refuses_retention_toward_init():
    config = HopeConfig(d_model=D, n_heads=H, n_layers=2, core="titans", memory=MemoryConfig(retain_toward="init"))
    with pytest.raises(ValueError, match="Titans core's memory is deep"):
        TitansCore(config)


def test_self_objective_with_an_anchor_is_refused_outside_the_fused_path():
    x = torch.zeros(1, 4, H, K, dtype=DT)
    S = torch.zeros(1, H, K, K, dtype=DT)
    eta = torch.zeros(1, 4, H, dtype=DT)
    with pytest.raises(ValueError, match="needs objective 'l2' or 'dot', got 'self'"):
        memory_stream(x, x, x, eta, eta + 1, eta, 4, LinearState(S, S, None), 0, "recurrent", objective="self",
                      anchor=S[0])
