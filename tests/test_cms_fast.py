"""CMS fast weights: the flat-gradient product and the recorded-output write equal the textbook form (fp64).

The textbook form multiplies by `θ.unsqueeze(0) − Δ` and lets autograd form per-sample gradients of the fast
weights; `hope.layers.mlp.FastWeights` must give the same values, the same outer gradients and the same writes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TextbookFast

from hope import HopeLM
from hope.cms import level as cms
from hope.config import CMSLevel, HopeConfig
from hope.layers.mlp import FastWeights

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_fast_matmul_values_gradients_and_write_gradient():
    g = torch.Generator().manual_seed(0)
    B, T, D, F = 3, 5, 4, 6
    x = torch.randn(B, T, D, generator=g, dtype=F64, requires_grad=True)
    theta = torch.randn(D, F, generator=g, dtype=F64, requires_grad=True)
    delta = torch.randn(B, D, F, generator=g, dtype=F64)
    weight = torch.randn(B, T, F, generator=g, dtype=F64)

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


def test_unreached_product_gives_zero_write():
    fast = FastWeights({"w": torch.zeros(2, 3, 4, dtype=F64, requires_grad=True)})
    fast.matmul(torch.randn(2, 5, 3, dtype=F64), "w", torch.zeros(3, 4, dtype=F64, requires_grad=True))
    assert torch.equal(fast.grads([None])["w"], torch.zeros(2, 3, 4, dtype=F64))


def _model(core: str) -> HopeLM:
    torch.manual_seed(0)
    levels = [CMSLevel(period=4, hidden=16, lr=0.3), CMSLevel(period=8, hidden=16, lr=0.2, optimizer="sgd"),
              CMSLevel(hidden=16)]
    return HopeLM(HopeConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, core=core, cms=levels)).double()


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


@pytest.mark.parametrize("core", ["attention", "self_modifying"])
def test_model_equals_textbook_fast_weights(core, monkeypatch):
    """Logits, every outer gradient and the final fast weights agree with the textbook form over several writes
    of two periods, whole and in pieces."""
    ids = torch.randint(0, 23, (2, 24), generator=torch.Generator().manual_seed(3))
    model = _model(core)
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
