"""The paper's literal HOPE (preset "hope_paper", docs/design.md §4.1) and each of its switches, in fp64.

- The chunked core equals a token-by-token oracle written here from the equations (eqs. 83–96): every projection
  memory reads the whole x̃_t, every memory is trained by its inner gradient taken with `torch.func.grad` at the
  chunk-start weights; outputs and the outer gradients of every parameter agree.
- A transition with a negative eigenvalue is reachable (`negative_eigenvalues`) and its norm stays ≤ 1 per token.
- The preset stays within 5% of Transformer++'s parameters; bad configs and mismatched states raise clear errors.

Legend: B batch, T time, D model width, H heads, K head width, F hidden width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_rms, self_modifying_core

from hope import HopeLM, preset
from hope.config import HOPE_PAPER_MEMORY
from hope.layers.self_modifying import SelfModifyingCore, SelfModifyingState
from hope.memory.config import MemoryConfig
from hope.memory.deep import activation, inner_grad, mlp
from hope.memory.rule import step

DT = torch.float64
D, H = 16, 2
K = D // H

# switch sets the oracle covers: the preset; full-width linear projection memories; per-head deep scalar read-outs
ORACLE_CASES = {
    "hope_paper": HOPE_PAPER_MEMORY,
    "full_linear": {**HOPE_PAPER_MEMORY, "proj_depth": "linear", "gate_depth": "linear"},
    "head_deep_gates": {**HOPE_PAPER_MEMORY, "proj_width": "head", "negative_eigenvalues": False},
    "raw_targets": {**HOPE_PAPER_MEMORY, "target_norm": False},
}


def make_core(knobs: dict, seed: int = 0) -> SelfModifyingCore:
    return self_modifying_core(knobs, seed, D, H)


def _write(weights: dict, start: dict, key, target, eta, alpha, beta, chunk: int, residual: bool, act: str,
           gamma=None, momentum: dict | None = None) -> tuple[dict, dict | None]:
    """One token of eq. 88 for a memory given as {"S"} (linear, read z S) or {"w2", "w1"} (2-layer MLP): the inner
    gradient of ½‖M(key) − target‖² by `torch.func.grad` at the chunk-start weights `start`; DGD erase on the layer
    that reads the key, plain retention on W₁ with the step η/(1 + C η ‖h‖²) (hope.memory.deep); with momentum
    m ← γ m − (step)·∇, W ← (retention) W + m. Gates `[B, Hm]` broadcast over each memory's weights."""
    col = lambda g: g[..., None, None]

    def loss(w):
        out = key @ w["S"] if "S" in w else mlp(key, w["w2"], w["w1"], act, residual)
        return 0.5 * (out - target).pow(2).sum()

    grads = torch.func.grad(loss)(start)
    first = "S" if "S" in weights else "w2"
    steps = {first: eta}
    if "w1" in weights:
        h = activation(key @ start["w2"], act)[0]  # [B, Hm, 1, F]
        steps["w1"] = eta / (1 + chunk * eta * h.pow(2).sum((-1, -2)))
    new, new_mom = {}, None if momentum is None else {}
    for name, w in weights.items():
        retained = col(alpha) * w
        if name == first and beta is not None:
            retained = retained - col(beta) * key.mT @ (key @ w)  # (αI − β k kᵀ) Wᵀ
        update = -col(steps[name]) * grads[name]
        if momentum is not None:
            new_mom[name] = col(gamma) * momentum[name] + update
            update = new_mom[name]
        new[name] = retained + update
    return new, new_mom


def oracle(core: SelfModifyingCore, x: torch.Tensor) -> torch.Tensor:
    """The core token by token, from the equations (deep M_mem; the projection memories as the config says)."""
    mc, act = core.mc, core.mc.activation
    B, T, _ = x.shape
    Cp, Cm = mc.proj_chunk_size, mc.chunk_size
    full = mc.proj_width == "full"
    state = core.init_state(B)
    xs = F.silu(core.conv(x)[0])  # x̃  # [B, T, D]
    gamma = torch.sigmoid(core.momentum_proj(x))  # [B, T, H]
    proj = {n: {"w2": d.w2, "w1": d.w1} for n, d in state.proj_deep.items()}
    if state.proj.S.shape[-1]:
        proj["lin"] = {"S": state.proj.S}
    mem = {"w2": state.mem.w2, "w1": state.mem.w1}
    mom = {name: torch.zeros_like(w) for name, w in mem.items()}
    outputs = []
    for t in range(T):
        if t % Cp == 0:
            proj_c = dict(proj)
        if t % Cm == 0:
            mem_c = dict(mem)
        z = xs[:, t].reshape(B, 1, 1, D) if full else xs[:, t].reshape(B, H, 1, K)  # what each memory reads
        raw = {}
        if "lin" in proj_c:
            raw.update(zip(core.linear_names, (z @ proj_c["lin"]["S"]).split(
                [core.out_width[n] for n in core.linear_names], dim=-1)))
        for name in core.deep_names:
            raw[name] = mlp(z, proj_c[name]["w2"], proj_c[name]["w1"], act, name in core.vectors)
        vec = lambda r: r.reshape(B, H, K)  # [B, H, K] from [B, 1, 1, D] or [B, H, 1, K]
        gate = lambda r: r.reshape(B, H)
        k, v, q = F.normalize(vec(raw["k"]), dim=-1), vec(raw["v"]), F.normalize(vec(raw["q"]), dim=-1)
        alpha = torch.sigmoid(gate(raw["alpha"]) + core.alpha_bias)
        eta = mc.eta_max * torch.sigmoid(gate(raw["eta"]) + core.eta_bias)
        if mc.negative_eigenvalues:
            eta = eta * (1 + alpha)
        norm = (lambda u: F.normalize(u, dim=-1)) if mc.target_norm else (lambda u: u)
        if full:  # one memory per projection: key [k_1 … k_H]/√H, the whole v, head means of η and α
            key, val = k.reshape(B, 1, 1, D) / H**0.5, norm(v.reshape(B, 1, 1, D))
            eta_m, alpha_m = eta.mean(1, keepdim=True), alpha.mean(1, keepdim=True)
        else:
            key, val, eta_m, alpha_m = k[:, :, None], norm(v)[:, :, None], eta, alpha
        for name, w in proj.items():
            residual = name in core.vectors
            target = (val @ proj_c[name]["S"] if name == "lin" else
                      mlp(val, proj_c[name]["w2"], proj_c[name]["w1"], act, residual))  # M_□,c(v̄), eqs. 84/87
            proj[name], _ = _write(w, proj_c[name], key, target, eta_m, alpha_m, eta_m, Cp, residual, act)
        # M_mem: self-generated target, momentum with the damped step (1 − γ)η, DGD erase β = η, read after write
        g = gamma[:, t]
        target = mlp(norm(v)[:, :, None], mem_c["w2"], mem_c["w1"], act)
        mem, mom = _write(mem, mem_c, k[:, :, None], target, eta * (1 - g), alpha, eta, Cm, True, act, g, mom)
        outputs.append(mlp(q[:, :, None], mem["w2"], mem["w1"], act)[:, :, 0])  # [B, H, K]
    return core.output(torch.stack(outputs, dim=1), x)  # [B, T, D]


@pytest.mark.parametrize("case", ORACLE_CASES)
def test_chunked_core_equals_the_token_by_token_oracle(case):
    """Outputs and every parameter's outer gradient, one call and a stream fed in pieces, against the oracle."""
    core, x = make_core(ORACLE_CASES[case]), torch.randn(2, 13, D, dtype=DT, generator=torch.Generator().manual_seed(1))
    y_ref = oracle(core, x)
    y, state = core(x)
    assert rel_rms(y, y_ref) < 1e-10
    ys, s = [], None
    for a, b in ((0, 3), (3, 9), (9, 13)):
        y_n, s = core(x[:, a:b], s)
        ys.append(y_n)
    assert rel_rms(torch.cat(ys, dim=1), y_ref) < 1e-10
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), list(core.parameters()))
    grads_ref = torch.autograd.grad((y_ref * w).sum(), list(core.parameters()))
    for (name, _), g, g_ref in zip(core.named_parameters(), grads, grads_ref):
        assert g_ref.abs().max() > 0 and rel_rms(g, g_ref) < 1e-9, name


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_inner_gradient_of_the_scalar_read_out_matches_torch_func_grad(act):
    """M(z) = W₁σ(W₂z) without the residual (M_η, M_α with gate_depth="deep"): closed form == torch.func.grad."""
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 5, 8, dtype=DT, generator=gen), torch.randn(3, 5, 2, dtype=DT, generator=gen)
    w2, w1 = torch.randn(3, 8, 6, dtype=DT, generator=gen), torch.randn(3, 6, 2, dtype=DT, generator=gen)
    delta, err, h = inner_grad(k, v, w2, w1, act, residual=False)
    loss = lambda a, b: 0.5 * (mlp(k, a, b, act, residual=False) - v).pow(2).sum()
    g2, g1 = torch.func.grad(loss, argnums=(0, 1))(w2, w1)
    assert rel_rms(k.mT @ delta, g2) < 1e-12 and rel_rms(h.mT @ err, g1) < 1e-12


def _transition(eta: float, alpha: float, k: torch.Tensor) -> torch.Tensor:
    """∂S_t/∂S_{t−1} of one DGD token of the rule (`rule.step`, C = 1, ℓ2 objective) as a [K·V, K·V] matrix."""
    V = 3
    g = lambda x: torch.full((1, 1), x, dtype=DT)
    one = lambda S: step(S, k, k, torch.zeros(1, 1, V, dtype=DT), g(eta), g(alpha), g(eta), S)[1]
    S0 = torch.zeros(1, 1, k.shape[-1], V, dtype=DT)
    return torch.autograd.functional.jacobian(one, S0).reshape(k.shape[-1] * V, -1)


@pytest.mark.parametrize("alpha", [0.3, 0.9, 0.999])
def test_negative_eigenvalue_is_reachable_and_bounded(alpha):
    """With `negative_eigenvalues` the core's gates reach α − 2η ≈ −1 (a sign flip per token, what parity needs)
    and the transition's spectral norm stays ≤ 1; without it the smallest eigenvalue is α − 2η > α − 1."""
    k = F.normalize(torch.randn(1, 1, 4, dtype=DT, generator=torch.Generator().manual_seed(2)), dim=-1)
    lowest = {}
    for negative in (True, False):
        core = make_core({"negative_eigenvalues": negative})
        raw_alpha = torch.logit(torch.tensor(alpha, dtype=DT)) - core.alpha_bias.detach()[None, :, None]
        with torch.no_grad():  # head 0's gates `[B=1, H, C=1]`, η's pre-activation at 12 (σ → 1)
            eta, a = (g[0, 0, 0].item() for g in core._gates(torch.full((1, H, 1), 12.0, dtype=DT), raw_alpha))
        A = _transition(eta, a, k)
        eig = torch.linalg.eigvalsh((A + A.mT) / 2)  # A is symmetric: α I − 2η k kᵀ per value column
        assert rel_rms(A, A.mT) < 1e-14 and float(torch.linalg.matrix_norm(A, ord=2)) <= 1 + 1e-9
        lowest[negative] = float(eig.min())
    assert lowest[True] < -0.99
    assert lowest[False] > alpha - 1 - 1e-9


def test_negative_eigenvalues_stay_bounded_over_a_long_stream():
    """η at its bound (σ → 1) and chunks of 1 and 16: the memory of a 2,048-token stream stays finite and of the
    size of its targets, for the DGD rule with eigenvalues down to −1."""
    from hope.ops import memory_update

    gen = torch.Generator().manual_seed(5)
    B, T, Hh, Kk = 1, 2048, 2, 8
    k = F.normalize(torch.randn(B, T, Hh, Kk, dtype=DT, generator=gen), dim=-1)
    v, q = torch.randn(B, T, Hh, Kk, dtype=DT, generator=gen), torch.randn(B, T, Hh, Kk, dtype=DT, generator=gen)
    alpha = torch.sigmoid(torch.randn(B, T, Hh, dtype=DT, generator=gen) + 3)
    eta = 0.5 * (1 + alpha) * 0.999
    for chunk in (1, 16):
        o, S = memory_update(q, k, v, eta, alpha, eta, chunk, None, True, "torch")
        assert torch.isfinite(o).all() and S.abs().max() < 10 * v.abs().max(), chunk


def test_parity_takes_one_token_chunks():
    """Why `negative_eigenvalues` solves parity only with `chunk_size=1` (experiments/memory_tasks/README.md): gates at
    the bound (α = 1; η = β = (1 + α)/2 = 1 on a 1, 0 on a 0), one fixed key, no target. With C = 1 each 1 multiplies
    S k by α − β − η = −1, so the read S_t k is (−1)^(ones so far). Inside a chunk the gradient term is taken at the
    chunk-start state, so a token multiplies S k by α − β = 0 and adds −η S_c k: the second 1 of a chunk does not
    flip the sign back, and the read stops tracking parity."""
    from hope.ops import memory_update

    T, Kk = 64, 4
    bits = torch.randint(0, 2, (1, T, 1), generator=torch.Generator().manual_seed(3)).to(DT)  # [B, T, H]
    k = F.normalize(torch.ones(1, T, 1, Kk, dtype=DT), dim=-1)
    v = torch.zeros(1, T, 1, Kk, dtype=DT)
    alpha, eta = torch.ones_like(bits), bits.clone()
    S0 = k[0, 0, 0][None, None, :, None] * torch.ones(1, 1, 1, Kk, dtype=DT)  # Sᵀ: S k = 1 in every value column
    parity = (-1.0) ** bits.cumsum(1)  # [B, T, H]
    for chunk, tracks in ((1, True), (16, False)):
        o, _ = memory_update(k, k, v, eta, alpha, eta, chunk, S0, True, "torch")
        assert torch.equal(o[..., 0].abs(), torch.ones_like(parity))  # a sign is read at every token
        assert torch.equal(torch.sign(o[..., 0]), parity) == tracks, chunk


def test_preset_within_budget_and_hope_unchanged():
    def count(name):
        return sum(p.numel() for p in HopeLM(preset(name, "small")).parameters())

    assert abs(count("hope_paper") / count("transformer") - 1) < 0.05
    assert preset("hope").memory == MemoryConfig()  # the default preset is not the paper's reading
    paper = preset("hope_paper", "tiny", memory={"chunk_size": 32}).memory  # a dict refines the preset's fields
    assert paper.chunk_size == 32 and paper.proj_width == "full" and paper.momentum


def test_paper_state_round_trips_through_the_saved_format():
    core = make_core(HOPE_PAPER_MEMORY)
    x = torch.randn(2, 6, D, dtype=DT)
    _, state = core(x[:, :3])
    flat = state.to_flat()
    assert {"proj_eta.w2", "proj_alpha.w1", "mem.m2"} <= flat.keys() and flat["proj.S"].shape[-1] == 0
    y1, _ = core(x[:, 3:], state)
    y2, _ = core(x[:, 3:], SelfModifyingState.from_flat(flat))
    assert torch.equal(y1, y2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"negative_eigenvalues": True, "eta_max": 0.6}, r"eta_max=0.6 must be in \(0, 0.5\]"),
        ({"negative_eigenvalues": True, "erase": "gd", "eta_max": 0.01}, "negative_eigenvalues=True needs erase='dgd'"),
        ({"momentum": True, "backend": "triton"}, "momentum=True needs a backend that keeps the momentum state Z"),
        ({"proj_width": "wide"}, r"proj_width must be one of \('head', 'full'\), got 'wide'"),
        ({"gate_depth": "mlp"}, r"gate_depth must be one of \('linear', 'deep'\), got 'mlp'"),
        ({"target_norm": "yes"}, "target_norm must be a bool, got 'yes'"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**kwargs)


def test_momentum_state_mismatch_raises():
    plain, with_momentum = make_core({}), make_core({"momentum": True})
    x = torch.randn(1, 4, D, dtype=DT)
    _, state = plain(x)
    with pytest.raises(ValueError, match=r"state has no momentum Z but MemoryConfig.momentum=True"):
        with_momentum(x, state)
    _, state = with_momentum(x)
    with pytest.raises(ValueError, match=r"state has a momentum Z but MemoryConfig.momentum=False"):
        plain(x, state)


def test_formal_languages_memory_switches(tmp_path):
    """`--memory` sets HOPE's core switches in the formal-language benchmark and the result file records them."""
    import json

    from experiments.memory_tasks import formal_languages as fl
    from experiments.memory_tasks.harness import parse_memory

    assert parse_memory("negative_eigenvalues=true, proj_chunk_size=1,eta_max=0.25") == {
        "negative_eigenvalues": True, "proj_chunk_size": 1, "eta_max": 0.25}
    with pytest.raises(ValueError, match="unknown MemoryConfig field 'negative'"):
        parse_memory("negative=true")
    with pytest.raises(ValueError, match="KEY=VALUE items separated by commas, got 'momentum'"):
        parse_memory("momentum")
    with pytest.raises(ValueError, match=r"eta_max=0.9 must be in \(0, 0.5\]"):
        parse_memory("eta_max=0.9")
    with pytest.raises(ValueError, match=r"--memory sets the core of \('hope',\)"):
        fl.run(["--tiny", "--models", "transformer", "--memory", "momentum=true", "--out", str(tmp_path)])
    fl.run(["--tiny", "--models", "hope", "--languages", "parity", "--memory", "negative_eigenvalues=true",
            "--tag", "_neg", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "formal_languages_neg.json").read_text())
    assert doc["config"]["memory"] == {"negative_eigenvalues": True}
    assert "ours: HOPE (negative_eigenvalues=True)" in doc["table"]
