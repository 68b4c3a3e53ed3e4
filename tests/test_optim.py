"""Tests of `hope.optim`: rules against torch's optimizers, batched rules against per-sample loops, invariants.

Legend: B batch, R rows, K row width. Fast forms are compared with references by relative RMS (fp64 ~1e-10,
fp32 ~1e-6). Names are imported from the submodules so a monkeypatched `hope.optim` attribute cannot mask them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_rms

from hope.optim.build import OPTIMIZERS, build_optimizer
from hope.optim.delta import DeepMomentumRule, deep_memory_grads, deep_memory_loss
from hope.optim.optimizers import M3, AdamMemory, DeltaMomentum, Momentum, Muon, PreconditionedMomentum
from hope.optim.orthogonal import newton_schulz
from hope.optim.registry import RULES, memory_rule


def random_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (2, 3, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def run_pair(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, a: list, b: list, steps: int = 100) -> float:
    """Feed both optimizers the same random gradients; return the worst relative RMS between their parameters."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    return max(rel_rms(p.detach(), q.detach()) for p, q in zip(a, b))


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_equals_torch_sgd(nesterov: bool) -> None:
    a, b = random_params(), random_params()
    ours = Momentum([{"params": a[:2]}, {"params": a[2:], "lr": 0.05}], lr=0.01, beta=0.9, nesterov=nesterov)
    ref = torch.optim.SGD([{"params": b[:2]}, {"params": b[2:], "lr": 0.05}], lr=0.01, momentum=0.9, nesterov=nesterov)
    assert run_pair(ours, ref, a, b) < 1e-6


def test_adam_memory_equals_torch_adam_and_adamw() -> None:
    a, b = random_params(), random_params()
    assert (
        run_pair(AdamMemory(a, lr=1e-2, betas=(0.8, 0.95)), torch.optim.Adam(b, lr=1e-2, betas=(0.8, 0.95)), a, b)
        < 1e-6
    )
    a, b = random_params(), random_params()
    ours, ref = AdamMemory(a, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    assert run_pair(ours, ref, a, b) < 1e-6


def test_preconditioned_momentum_equals_rmsprop_with_momentum() -> None:
    a, b = random_params(), random_params()
    ours = PreconditionedMomentum(a, lr=1e-3, beta=0.9, beta2=0.95, eps=1e-8)
    ref = torch.optim.RMSprop(b, lr=1e-3, alpha=0.95, eps=1e-8, momentum=0.9)
    assert run_pair(ours, ref, a, b) < 1e-6


def test_delta_momentum_without_erase_is_momentum() -> None:
    a, b = random_params(torch.float64), random_params(torch.float64)
    assert run_pair(DeltaMomentum(a, lr=0.01, erase=0.0), Momentum(b, lr=0.01), a, b, steps=20) < 1e-12


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 16, 24), (128, 8)])
def test_newton_schulz_singular_values_in_documented_band(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.linalg.svdvals(newton_schulz(x, steps=5, coefficients="quintic"))
    assert s.min() >= 0.68 and s.max() <= 1.21
    s = torch.linalg.svdvals(newton_schulz(x, steps=12, coefficients="cubic"))
    assert (s - 1).abs().max() < 1e-6


def test_newton_schulz_keeps_singular_vectors_and_band_edge() -> None:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    sv = torch.logspace(0, -2, 20, dtype=torch.float64)
    x = U[:, :20] @ torch.diag(sv) @ V.T
    assert (sv / torch.linalg.matrix_norm(x) >= 0.002).all()  # inside the documented domain
    out = newton_schulz(x)
    # NS acts on singular values only: Uᵀ out V is diagonal with entries in the band.
    core = U[:, :20].T @ out @ V
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-10
    assert torch.diagonal(core).min() >= 0.68 and torch.diagonal(core).max() <= 1.21


def least_squares(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X, W = torch.randn(32, 8, generator=g), torch.randn(4, 8, generator=g)
    Y = X @ W.T + 0.5
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 4), X, Y


# One rate per optimizer that reaches < 0.3 of the initial loss in 50 steps with margin (swept over 1e-3…3e-1).
LEARNING_RATES = {
    "adamw": 1e-1,
    "adam": 1e-1,
    "sgd": 1e-1,
    "momentum": 1e-2,
    "adam_memory": 1e-1,
    "preconditioned_momentum": 3e-3,
    "delta_momentum": 3e-2,
    "deep_momentum": 1e-1,
    "muon": 1e-1,
    "m3": 3e-2,
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_decreases_least_squares(name: str) -> None:
    model, X, Y = least_squares()
    opt = build_optimizer(name, model.parameters(), lr=LEARNING_RATES[name])
    loss_fn = lambda: (model(X) - Y).square().mean()
    first = loss_fn().item()
    for _ in range(50):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.3 * first, name


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_resumes_identically(name: str) -> None:
    kwargs = {"frequency": 3} if name == "m3" else {}
    X = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            model(X).square().mean().backward()
            opt.step()

    model = make_model(0)
    opt = build_optimizer(name, model.parameters(), lr=1e-3, weight_decay=0.01, **kwargs)
    train(model, opt, 4)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 5)

    resumed = make_model(1)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(name, resumed.parameters(), lr=1e-3, weight_decay=0.01, **kwargs)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 5)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", sorted(RULES))
def test_batched_update_equals_loop_of_per_sample_updates(name: str) -> None:
    B, R, K = 3, 5, 4
    rule = memory_rule(name, **({"frequency": 2} if name == "m3" else {}))
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(B, R, K, generator=g, dtype=torch.float64) for _ in range(5)]
    state = rule.init_state(torch.zeros(B, R, K, dtype=torch.float64))
    singles = [rule.init_state(torch.zeros(R, K, dtype=torch.float64)) for _ in range(B)]
    for grad in grads:
        state, d = rule.update(state, grad)
        for b in range(B):
            singles[b], d_b = rule.update(singles[b], grad[b])
            assert rel_rms(d[b], d_b) < 1e-10, name
    for key, value in state.items():
        if value.ndim == 0:  # the shared step counter
            assert all(torch.equal(value, s[key]) for s in singles)
        else:
            assert all(rel_rms(value[b], singles[b][key]) < 1e-10 for b in range(B)), (name, key)


def test_rule_update_is_pure() -> None:
    for name in RULES:
        rule = memory_rule(name)
        state = rule.update(rule.init_state(torch.zeros(4, 3)), torch.randn(4, 3))[0]
        before = {k: v.clone() for k, v in state.items()}
        rule.update(state, torch.randn(4, 3))
        assert all(torch.equal(before[k], state[k]) for k in state), name


def test_delta_momentum_erase_is_the_sherman_morrison_step_for_vectors_and_bounded() -> None:
    beta, erase = 0.9, 0.5
    rule = memory_rule("delta_momentum", beta=beta, erase=erase)
    g0, g1 = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64), torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    state, _ = rule.update(rule.init_state(g0), g0)
    _, d = rule.update(state, g1)
    step = erase / (1 + erase * g1 @ g1)  # ζ' = ζ / (1 + ζ‖g‖²)
    assert rel_rms(d, beta * g0 - step * (g0 @ g1) * g1 + g1) < 1e-12
    # Any gradient scale: along a constant gradient the factor is β − c with c = ζ'‖g‖² ∈ [0, 1), so the memory
    # converges to g / (1 − β + c) instead of blowing up.
    for scale in (1e-3, 1.0, 1e6):
        g = torch.full((2, 3), scale, dtype=torch.float64)
        c = erase * g.square().sum() / (1 + erase * g.square().sum())
        state = rule.init_state(g)
        for _ in range(300):
            state, d = rule.update(state, g)
        assert rel_rms(d, g / (1 - beta + c)) < 1e-8, scale


def test_deep_momentum_closed_form_inner_grads_match_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    w1, w2 = (
        torch.randn(2, 6, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 6, generator=g, dtype=torch.float64),
    )
    keys, values = (
        torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
    )
    g1, g2, _ = deep_memory_grads(w1, w2, keys, values)
    r1, r2 = torch.func.grad(deep_memory_loss, argnums=(0, 1))(w1, w2, keys, values)
    assert rel_rms(g1, r1) < 1e-12 and rel_rms(g2, r2) < 1e-12


def test_deep_momentum_converges_to_an_average_and_learns_its_initial_state() -> None:
    rule = DeepMomentumRule(beta=0.9, inner_lr=0.5, hidden=8)
    grad = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    state = rule.init_state(grad)
    for _ in range(300):
        state, d = rule.update(state, grad)
    assert rel_rms(d, 0.5 / (1 - 0.9 + 0.5) * grad) < 1e-3  # ζ / (1 − β + ζ) · g (W2 keeps drifting slowly)
    w1 = torch.nn.Parameter(0.1 * torch.randn(4, 8, dtype=torch.float64))
    w2 = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    learned = DeepMomentumRule(hidden=8, initial_weights=(w1, w2))
    state = learned.init_state(torch.zeros(3, 2, 4, dtype=torch.float64))  # batched [B, R, K]
    _, d = learned.update(state, torch.randn(3, 2, 4, dtype=torch.float64))
    d.square().sum().backward()
    assert w1.grad is not None and w2.grad is not None and w1.grad.abs().sum() > 0


def test_m3_slow_memory_refreshes_every_frequency_steps() -> None:
    f, beta3 = 3, 0.5
    rule = memory_rule("m3", frequency=f, betas=(0.9, 0.99, beta3))
    grads = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    state = rule.init_state(grads[0])
    expected_slow = torch.zeros(4, 6)
    for t, grad in enumerate(grads, start=1):
        before = state["slow_output"]
        state, _ = rule.update(state, grad)
        if t % f == 0:
            expected_slow = beta3 * expected_slow + sum(grads[t - f : t])
            assert rel_rms(state["slow_output"], newton_schulz(expected_slow)) < 1e-6
        else:
            assert torch.equal(state["slow_output"], before)
    assert rel_rms(state["slow"], expected_slow) < 1e-6
    # Before the first refresh the slow output is zero, so the direction is NS(M1) / (sqrt(V̂) + ε).
    rule = memory_rule("m3", frequency=f, betas=(0.9, 0.99, beta3), eps=1e-8)
    _, d = rule.update(rule.init_state(grads[0]), grads[0])
    assert rel_rms(d, newton_schulz(grads[0]) / (grads[0].abs() + 1e-8)) < 1e-5


def test_muon_and_m3_fall_back_to_adamw_for_non_matrix_parameters() -> None:
    for cls in (Muon, M3):
        w, bias, emb = (
            torch.nn.Parameter(torch.randn(4, 3)),
            torch.nn.Parameter(torch.randn(4)),
            torch.nn.Parameter(torch.randn(5, 3)),
        )
        ref_bias, ref_emb = torch.nn.Parameter(bias.detach().clone()), torch.nn.Parameter(emb.detach().clone())
        groups = [{"params": [w, bias]}, {"params": [emb], "matrix": False}]
        opt = cls(groups, lr=1e-2, weight_decay=0.1, adam_betas=(0.9, 0.95), fallback_lr_scale=0.5)
        ref = torch.optim.AdamW([ref_bias, ref_emb], lr=5e-3, betas=(0.9, 0.95), weight_decay=0.1)
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            for p, q in ((bias, ref_bias), (emb, ref_emb)):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            w.grad = torch.randn(w.shape, generator=g)
            opt.step()
            ref.step()
        assert rel_rms(bias.detach(), ref_bias.detach()) < 1e-6 and rel_rms(emb.detach(), ref_emb.detach()) < 1e-6
        assert "exp_avg" in opt.state[bias] and "exp_avg" in opt.state[emb] and "exp_avg" not in opt.state[w]


def test_muon_views_conv_weights_as_matrices_and_matches_the_rule() -> None:
    conv = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    opt = Muon([conv], lr=0.1, nesterov=False)
    conv.grad = torch.randn(4, 3, 2, 2)
    before = conv.detach().clone()
    opt.step()
    d = 0.2 * 12**0.5 * newton_schulz(conv.grad.reshape(4, 12))
    assert rel_rms(conv.detach(), before - 0.1 * d.reshape(4, 3, 2, 2)) < 1e-6


def test_closure_is_called_and_its_loss_returned() -> None:
    model, X, Y = least_squares()
    opt = DeltaMomentum(model.parameters(), lr=1e-2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (model(X) - Y).square().mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and opt.step(closure) < first


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("momentum", {"beta": 1.0}, "beta=1.0"),
        ("momentum", {"beta": -0.1}, "beta=-0.1"),
        ("adam", {"betas": (0.9, 1.5)}, "beta2=1.5"),
        ("adam", {"eps": 0.0}, "eps=0.0"),
        ("preconditioned_momentum", {"preconditioner": "shampoo"}, "shampoo"),
        ("delta_momentum", {"erase": -1.0}, "erase=-1.0"),
        ("deep_momentum", {"hidden": 0}, "hidden=0"),
        ("muon", {"ns_steps": 0}, "ns_steps=0"),
        ("m3", {"frequency": 0}, "frequency=0"),
        ("m3", {"betas": (0.9, 0.99)}, "betas="),
    ],
)
def test_bad_rule_hyper_parameters_raise_naming_the_value(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        memory_rule(name, **kwargs)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_negative_lr_raises_naming_the_value(name: str) -> None:
    with pytest.raises(ValueError, match="-0.1"):
        build_optimizer(name, make_model(0).parameters(), lr=-0.1)


def test_bad_names_shapes_and_keywords_raise() -> None:
    with pytest.raises(ValueError, match="'lion'"):
        memory_rule("lion")
    with pytest.raises(ValueError, match="'lion'"):
        build_optimizer("lion", make_model(0).parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="momentum"):
        memory_rule("sgd", momentum=0.9)
    with pytest.raises(TypeError, match="frequency"):
        build_optimizer("muon", make_model(0).parameters(), lr=1e-3, frequency=3)
    for name in ("muon", "m3"):
        with pytest.raises(ValueError, match=r"shape \(5,\)"):
            memory_rule(name).init_state(torch.zeros(5))
    with pytest.raises(ValueError, match="beta=1.2"):
        Momentum(make_model(0).parameters(), beta=1.2)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        AdamMemory(make_model(0).parameters(), weight_decay=-1)
    rule = memory_rule("momentum")
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        rule.update(rule.init_state(torch.zeros(2, 3)), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        DeepMomentumRule(hidden=4, initial_weights=(torch.zeros(2, 4), torch.zeros(4, 3))).init_state(torch.zeros(3))


def load_toy():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "optimizers" / "toy_landscape.py"
    spec = importlib.util.spec_from_file_location("toy_landscape", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_landscape_gradient_and_convergence_bookkeeping() -> None:
    toy = load_toy()
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(toy.psi(x, 10.0, 1.0, 2.0).sum(), x)
    assert rel_rms(toy.grad_psi(x.detach(), 10.0, 1.0, 2.0), auto) < 1e-12
    lrs = torch.tensor([1e-2, 10.0], dtype=torch.float64)
    run = toy.run_grid("momentum", {"beta": 0.9}, lrs, (10.0, 1.0, 2.0), steps=40)
    assert run["loss"][-1, 0] < run["loss"][0, 0] and torch.isinf(run["loss"][-1, 1])  # lr 10 diverges, frozen
    # "Converged" means ψ stays below tol: a run that dips and bounces back out does not count.
    loss = torch.tensor([[5.0, 5.0], [0.5, 0.5], [0.01, 0.01], [2.0, 0.01]])
    s = toy.summarise(loss, torch.tensor([1.0, 2.0]), tol=0.1)
    assert s["steps_to_tol"] == [None, 2] and s["best_lr"] == 2.0
