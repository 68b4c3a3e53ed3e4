"""Reservoir replay and EWC on a tiny stand-in language model (B batch, T time, V vocabulary)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hope.eval.continual import EWC, IGNORE_INDEX, ReplayBuffer, lm_loss, logits_of

V, T = 11, 6


class TinyLM(nn.Module):
    """Embedding -> linear head; returns an object with `.logits` like HopeLM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, ids: torch.Tensor, state=None):
        return SimpleNamespace(logits=self.head(self.embed(ids)), state=None)  # [B, T, V]


def _batches(seed: int, n: int = 3, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (b, T + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def test_lm_loss_ignores_masked_targets():
    torch.manual_seed(0)
    model = TinyLM()
    x, y = _batches(0, n=1)[0]
    masked = y.clone()
    masked[:, :-1] = IGNORE_INDEX
    logits = model(x).logits
    want = nn.functional.cross_entropy(logits[:, -1], y[:, -1])
    assert torch.allclose(lm_loss(model, x, masked), want, rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        lm_loss(model, x, y[:, :-1])


def test_logits_of_output_kinds():
    t = torch.zeros(1, 2, 3)
    assert logits_of(t) is t and logits_of((t, None)) is t and logits_of(SimpleNamespace(logits=t)) is t
    with pytest.raises(TypeError, match="int"):
        logits_of(3)


def test_replay_is_bounded_and_deterministic():
    def fill(seed: int) -> ReplayBuffer:
        buf = ReplayBuffer(capacity=10, seed=seed)
        for start in range(0, 100, 7):
            rows = torch.arange(start, min(start + 7, 100)).unsqueeze(1)  # [b, 1] row ids
            buf.add(rows, rows * 2)
        return buf

    a, b, c = fill(0), fill(0), fill(1)
    assert len(a) == 10 and a.seen == 100
    assert [r[0].item() for r in a.rows] == [r[0].item() for r in b.rows]
    assert [r[0].item() for r in a.rows] != [r[0].item() for r in c.rows]
    xa, ya = a.sample(4)
    xb, _ = b.sample(4)
    assert xa.shape == (4, 1) and torch.equal(xa, xb) and torch.equal(ya, 2 * xa)
    assert len(set(xa.flatten().tolist())) == 4  # without replacement
    assert a.sample(50)[0].shape == (10, 1)  # never more than stored


def test_replay_sampling_does_not_change_contents():
    a, b = ReplayBuffer(5, seed=3), ReplayBuffer(5, seed=3)
    for start in range(0, 40, 4):
        rows = torch.arange(start, start + 4).unsqueeze(1)
        a.add(rows)
        b.add(rows)
        b.sample(2)  # only b samples in between
    assert [r[0].item() for r in a.rows] == [r[0].item() for r in b.rows]


def test_reservoir_is_uniform():
    # Each of 20 rows should be kept with probability 5/20; over 400 seeds each count is ~100 (binomial sd ~8.7).
    counts: Counter[int] = Counter()
    for seed in range(400):
        buf = ReplayBuffer(5, seed=seed)
        buf.add(torch.arange(20).unsqueeze(1))
        counts.update(r[0].item() for r in buf.rows)
    assert min(counts[i] for i in range(20)) > 60 and max(counts.values()) < 140


def test_replay_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    buf = ReplayBuffer(3)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    with pytest.raises(ValueError, match="batch dimension"):
        buf.add(torch.zeros(2, 3), torch.zeros(3, 3))
    buf.add(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="-1"):
        buf.sample(-1)


def test_ewc_penalty_zero_at_anchor_and_grows():
    torch.manual_seed(0)
    model = TinyLM()
    ewc = EWC(strength=2.0)
    ewc.consolidate(model, _batches(1))
    assert ewc.penalty(model).item() == 0.0
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    values = []
    for scale in (0.01, 0.1, 1.0):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(ewc.anchors[0][n][0] + scale * direction[n])
        values.append(ewc.penalty(model).item())
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] / values[1] == pytest.approx(100.0, rel=1e-4)  # quadratic in the distance


def test_ewc_matches_formula_and_fisher():
    torch.manual_seed(0)
    model = TinyLM()
    batches = _batches(2)
    fisher = EWC.fisher_diagonal(model, batches)
    # Reference: explicit backward per batch, squared .grad averaged.
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad()
        lm_loss(model, x, y).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad.pow(2) / len(batches)
    model.zero_grad(set_to_none=True)
    for n in ref:
        assert torch.allclose(fisher[n], ref[n], rtol=1e-6, atol=1e-12)

    ewc = EWC(strength=0.5)
    ewc.consolidate(model, batches)
    with torch.no_grad():
        model.head.bias.add_(0.3)
    want = 0.5 / 2 * (ref["head.bias"] * 0.09).sum()
    assert ewc.penalty(model).item() == pytest.approx(want.item(), rel=1e-5)
    penalty = ewc.penalty(model)
    penalty.backward()  # differentiable: gradient λ F (θ − θ*) on the moved parameter
    assert torch.allclose(model.head.bias.grad, 0.5 * ref["head.bias"] * 0.3, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if n != "head.bias")


def test_ewc_does_not_touch_grads_and_rejects_bad_input():
    model = TinyLM()
    EWC(1.0).consolidate(model, _batches(0))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="-1"):
        EWC(-1)
    with pytest.raises(ValueError, match="none"):
        EWC.fisher_diagonal(model, [])
