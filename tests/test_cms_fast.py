"""CMS fast weights: the flat-gradient product and the recorded-output write equal the textbook form (fp64).

The textbook form multiplies by `θ.unsqueeze(0) − Δ` and lets autograd form per-sample gradients of the fast
weights; `hope.layers.mlp.FastWeights` must give the same values, the same outer gradients and the same writes.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TextbookFast

from hope import HopeLM
from hope.cms import level as cms
from hope.config import CMSLevel, HopeConfig
from hope.layers.mlp import FastWeights, SecondOrderFast

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _operands(seed: int) -> tuple[torch.Tensor, ...]:
    """x `[B, T, D]` and θ `[D, F]` (requiring grad), Δ `[B, D, F]` and a loss weight `[B, T, F]`, fp64."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, F = 3, 5, 4, 6
    x = torch.randn(B, T, D, generator=g, dtype=F64, requires_grad=True)
    theta = torch.randn(D, F, generator=g, dtype=F64, requires_grad=True)
    return x, theta, torch.randn(B, D, F, generator=g, dtype=F64), torch.randn(B, T, F, generator=g, dtype=F64)


def test_fast_matmul_values_gradients_and_write_gradient():
    x, theta, delta, weight = _operands(0)

    fast = FastWeights({"w": (theta.detach() - delta).requires_grad_()})
    y = fast.matmul(x, "w", theta)
    y2 = fast.matmul(x.sin(), "w", theta)  # two uses of one fast weight (two segments of a chunk)
    loss = (weight * (y + y2.cos())).sum()
    (gy, gy2) = torch.autograd.grad(loss, fast.grad_targets(), retain_graph=True)
    write = fast.grads([gy, gy2])["w"]
    gx, gtheta = torch.autograd.grad(loss, (x, theta))

    w_ref = (theta.detach().unsqueeze(0) - delta).requires_grad_()
    x_ref = x.detach().requires_grad_()
    theta_ref = theta.detach().requires_grad_()
    full = theta_ref.unsqueeze(0) - delta + (w_ref - w_ref.detach())  # value θ − Δ; gradient to θ and to W
    loss_ref = (weight * (x_ref @ full + (x_ref.sin() @ full).cos())).sum()
    gx_ref, gtheta_ref, write_ref = torch.autograd.grad(loss_ref, (x_ref, theta_ref, w_ref))

    assert torch.allclose(y, x @ (theta.detach() - delta), rtol=0, atol=1e-12)
    assert rel_err(gx, gx_ref) < 1e-12
    assert rel_err(gtheta, gtheta_ref) < 1e-12
    assert rel_err(write, write_ref) < 1e-12


def test_fast_matmul_learned_write_scale_gradient():
    """With fast weights θ − s·Δ, ∂/∂s (and ∂/∂x, ∂/∂θ) equal autograd's on the plain product."""
    x, theta, delta, weight = _operands(1)
    rho = torch.tensor(0.3, dtype=F64, requires_grad=True)

    s = rho.exp()
    fast = FastWeights({"w": (theta.detach() - s.detach() * delta).requires_grad_()}, s, {"w": delta})
    loss = (weight * (fast.matmul(x, "w", theta) + fast.matmul(x.sin(), "w", theta).cos())).sum()
    got = torch.autograd.grad(loss, (x, theta, rho))

    x_ref, theta_ref, rho_ref = (t.detach().requires_grad_() for t in (x, theta, rho))
    full = theta_ref.unsqueeze(0) - rho_ref.exp() * delta
    loss_ref = (weight * (x_ref @ full + (x_ref.sin() @ full).cos())).sum()
    ref = torch.autograd.grad(loss_ref, (x_ref, theta_ref, rho_ref))
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12
    assert abs(float(got[2])) > 0
    with pytest.raises(ValueError, match="write scale"):
        FastWeights({"w": delta}, s)


def test_learned_write_scale_equals_scaled_inner_rate():
    """A level whose learned write scale is s behaves as the fixed level with η·s: same logits over many writes
    (fp64), and at s = 1 it is the fixed model exactly; ρ gets a gradient."""
    ids = torch.randint(0, 23, (2, 24), generator=torch.Generator().manual_seed(4))

    def build(lr_scale: float, learn: bool) -> HopeLM:
        torch.manual_seed(0)
        levels = [CMSLevel(period=4, hidden=16, lr=0.3 * lr_scale, decay=0.1),
                  CMSLevel(period=8, hidden=16, lr=0.2 * lr_scale, optimizer="sgd"), CMSLevel(hidden=16)]
        config = HopeConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, core="attention", cms=levels,
                            cms_learn_lr=learn)
        return HopeLM(config).double()

    fixed, fixed2 = build(1.0, False), build(2.0, False)
    learned = build(1.0, True)
    scales = [n for n, _ in learned.named_parameters() if n.endswith("log_write_scale")]
    assert scales == [f"blocks.{b}.cms.{i}.log_write_scale" for b in range(2) for i in range(2)]  # not the FFN
    assert not learned.load_state_dict(fixed.state_dict(), strict=False).unexpected_keys
    logits, grads, _ = _run(learned, ids, [24])
    logits_ref, grads_ref, _ = _run(fixed, ids, [24])
    assert rel_err(logits, logits_ref) < 1e-12
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-10, name
    assert all(grads[n].abs() > 0 for n in scales)
    with torch.no_grad():
        for n in scales:
            learned.get_parameter(n).fill_(math.log(2.0))
    logits, _, _ = _run(learned, ids, [3, 9, 1, 11])
    logits_ref, _, _ = _run(fixed2, ids, [24])
    assert rel_err(logits, logits_ref) < 1e-10
    assert rel_err(logits, _run(fixed, ids, [24])[0]) > 1e-3  # the scale matters


def test_learn_lr_needs_a_writing_level():
    with pytest.raises(ValueError, match="cms_learn_lr"):
        HopeConfig(cms=[CMSLevel()], cms_learn_lr=True)
    with pytest.raises(ValueError, match="cms_learn_lr"):
        HopeConfig(cms=[CMSLevel(period=4)], cms_learn_lr=1)


@pytest.mark.parametrize("core,learn_lr", [("attention", False), ("self_modifying", True), ("titans", False)])
def test_second_order_writes_give_the_exact_gradient(core, learn_lr):
    """With `cms_second_order` the outer gradient is the exact derivative of the loss, writes included: it
    matches central finite differences of the loss along a random direction of every parameter (fp64), where
    the first-order gradient does not; logits are the same, and `model.eval()` is first-order."""
    torch.manual_seed(0)
    levels = [CMSLevel(period=4, hidden=16, lr=0.5, decay=0.1), CMSLevel(period=8, hidden=16, lr=0.3, optimizer="sgd"),
              CMSLevel(hidden=16)]
    config = dict(vocab_size=23, d_model=16, n_layers=2, n_heads=2, core=core, cms=levels, cms_learn_lr=learn_lr)
    second = HopeLM(HopeConfig(**config, cms_second_order=True)).double()
    first = HopeLM(HopeConfig(**config)).double()
    first.load_state_dict(second.state_dict())
    ids = torch.randint(0, 23, (2, 24), generator=torch.Generator().manual_seed(6))

    def loss(model):
        logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    assert rel_err(second(ids).logits, first(ids).logits) < 1e-12  # the same values
    params = dict(second.named_parameters())
    g = torch.Generator().manual_seed(7)
    direction = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
    slopes = {}
    for name, model in (("second", second), ("first", first)):
        model.zero_grad()
        loss(model).backward()
        slopes[name] = sum(float((p.grad * direction[n]).sum()) for n, p in model.named_parameters())
    eps, values = 1e-6, []
    with torch.no_grad():
        for sign in (1, -1):
            for n, p in params.items():
                p.add_(direction[n], alpha=sign * eps)
            with torch.enable_grad():
                values.append(float(loss(second).detach()))
            for n, p in params.items():
                p.sub_(direction[n], alpha=sign * eps)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(slopes["second"] - numeric) < 2e-7 * abs(numeric)
    assert abs(slopes["first"] - numeric) > 1e-3 * abs(numeric)  # first-order misses the paths through the writes
    second.eval()
    assert not isinstance(second(ids).state.layers[0].cms[0].fast, SecondOrderFast)


def test_second_order_config_errors():
    fast = [CMSLevel(period=4)]
    with pytest.raises(ValueError, match="cms_signal"):
        HopeConfig(cms=fast, cms_second_order=True, cms_signal="residual")
    with pytest.raises(ValueError, match="persist"):
        HopeConfig(cms=fast, cms_second_order=True, persist=True)
    with pytest.raises(ValueError, match="finite period"):
        HopeConfig(cms=[CMSLevel()], cms_second_order=True)
    model = HopeLM(HopeConfig(vocab_size=23, d_model=16, n_layers=1, n_heads=2, cms=fast, cms_second_order=True))
    with pytest.raises(ValueError, match="compile: false"):
        model.compile_cores()


def test_unreached_product_gives_zero_write():
    fast = FastWeights({"w": torch.zeros(2, 3, 4, dtype=F64, requires_grad=True)})
    fast.matmul(torch.randn(2, 5, 3, dtype=F64), "w", torch.zeros(3, 4, dtype=F64, requires_grad=True))
    assert torch.equal(fast.grads([None])["w"], torch.zeros(2, 3, 4, dtype=F64))


def _model(core: str, learn_lr: bool = False) -> HopeLM:
    torch.manual_seed(0)
    levels = [CMSLevel(period=4, hidden=16, lr=0.3), CMSLevel(period=8, hidden=16, lr=0.2, optimizer="sgd"),
              CMSLevel(hidden=16)]
    config = HopeConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, core=core, cms=levels, cms_learn_lr=learn_lr)
    model = HopeLM(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_write_scale"):
                p.fill_(0.4)
    return model


def _run(model: HopeLM, ids: torch.Tensor, pieces: list[int]):
    model.zero_grad()
    state, logits, start = None, [], 0
    for n in pieces:
        out = model(ids[:, start : start + n], state)
        state, start = out.state, start + n
        logits.append(out.logits)
    logits = torch.cat(logits, dim=1)
    exported = model.export_state(state)  # applies the write due at the end (as the trainer does before backward)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, exported


@pytest.mark.parametrize("core,learn_lr", [("attention", False), ("self_modifying", False), ("attention", True)])
def test_model_equals_textbook_fast_weights(core, learn_lr, monkeypatch):
    """Logits, every outer gradient and the final fast weights agree with the textbook form over several writes
    of two periods, whole and in pieces (with a learned write scale too, moved off 1 so that it matters)."""
    ids = torch.randint(0, 23, (2, 24), generator=torch.Generator().manual_seed(3))
    model = _model(core, learn_lr)
    for pieces in ([24], [3, 9, 1, 11]):
        logits, grads, exported = _run(model, ids, pieces)
        with monkeypatch.context() as m:
            m.setattr(cms, "FastWeights", TextbookFast)
            logits_ref, grads_ref, exported_ref = _run(model, ids, pieces)
        assert rel_err(logits, logits_ref) < 1e-10
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            assert rel_err(grads[name], grads_ref[name]) < 1e-9, name
        for layer, layer_ref in zip(exported["layers"], exported_ref["layers"]):
            for st, st_ref in zip(layer["cms"], layer_ref["cms"]):
                if st is not None:
                    for name in st["delta"]:
                        assert rel_err(st["delta"][name], st_ref["delta"][name]) < 1e-10
                        assert st["delta"][name].abs().max() > 0  # the levels did write


def test_frozen_parameters_still_write_in_context():
    """In-context writes do not depend on the outer parameters requiring gradients."""
    model = _model("attention").requires_grad_(False)
    out = model(torch.randint(0, 23, (1, 8)))
    delta = model.export_state(out.state)["layers"][0]["cms"][0]["delta"]["w_up"]
    assert delta.abs().max() > 0


def test_autograd_grad_wrt_parameters_equals_backward():
    """`torch.autograd.grad(loss, params)` (as EWC's Fisher uses) sees the same gradients as `.backward()`."""
    model = _model("attention")
    ids = torch.randint(0, 23, (2, 16), generator=torch.Generator().manual_seed(5))

    def loss():
        logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    model.zero_grad()
    loss().backward()
    for (name, p), g in zip(model.named_parameters(), grads):
        assert g is not None and rel_err(g, p.grad) < 1e-12, name
