"""Streams longer than a window: CMS levels whose period spans several windows, with the state carried and cut
from the graph between windows (truncated backpropagation through time, docs/design.md §5), in fp64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TextbookFast

from hope import CMSLevel, HopeConfig, HopeLM
from hope.cms import level as level_module
from hope.cms.level import level_grads

LR = 0.5


def tiny(core: str, levels: list[CMSLevel]) -> HopeLM:
    torch.manual_seed(0)
    config = HopeConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=2, core=core, cms=levels, ffn_hidden=48)
    return HopeLM(config).double()


def long_levels(*periods: int) -> list[CMSLevel]:
    return [*(CMSLevel(period=C, hidden=16, lr=LR, optimizer="sgd") for C in periods), CMSLevel(hidden=16)]


def stream(T: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 23, (B, T), generator=torch.Generator().manual_seed(seed))


def windows(model: HopeLM, ids: torch.Tensor, size: int, state=None, detach: bool = True):
    """Feed `ids` in windows of `size` with the state carried (cut from the graph after each window when
    `detach`, as stream training does); returns the logits and the final state."""
    logits = []
    for a in range(0, ids.shape[1], size):
        out = model(ids[:, a : a + size], state)
        logits.append(out.logits)
        state = model.detach_state(out.state) if detach else out.state
    return torch.cat(logits, dim=1), state


def deltas(model: HopeLM, state) -> list[torch.Tensor]:
    saved = model.export_state(state)
    return [st["delta"][n] for layer in saved["layers"] for st in layer["cms"] if st is not None for n in st["delta"]]


@pytest.mark.parametrize("core", ["attention", "self_modifying", "titans"])
def test_long_period_in_pieces_equals_one_call(core):
    """A level of period 16 fed in 4-token calls with the graph carried writes what one call writes."""
    model, ids = tiny(core, long_levels(4, 16)), stream(32)
    whole = model(ids)
    pieces, state = windows(model, ids, 4, detach=False)
    assert (pieces - whole.logits).abs().max() < 1e-10
    for got, ref in zip(deltas(model, state), deltas(model, whole.state)):
        assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_window_cut_write_sums_each_windows_gradient(monkeypatch):
    """With the state cut from the graph after every 4-token window, the period-16 write is −lr·Σ_w ∂L_w/∂W, L_w
    the chunk's next-token losses inside window w: each checked by autograd on the fast weights of that window
    (a prediction whose target opens the next window adds nothing, its logits being cut from the graph)."""
    model, ids = tiny("attention", long_levels(16)), stream(16)
    state, expected = None, None
    for a in range(0, 16, 4):
        with monkeypatch.context() as m:  # fast weights that autograd differentiates directly
            m.setattr(level_module, "FastWeights", TextbookFast)
            ref = model.import_state(model.export_state(state)) if state is not None else model.init_state(2)
            leaves = [ref.layers[b].cms[0].fast.weights[n] for b in range(2) for n in ("w_gate", "w_up", "w_down")]
            logits = model(ids[:, a : a + 4], ref).logits  # fp64, as hope.cms.level takes an fp64 chunk loss
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, a + 1 : a + 4].flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, leaves)
        expected = grads if expected is None else [e + g for e, g in zip(expected, grads)]
        state = model.detach_state(model(ids[:, a : a + 4], state).state)
    got = deltas(model, state)
    for g, e in zip(got, expected):
        assert (g - LR * e).abs().max() <= 1e-6 * e.abs().max()


def test_chunks_in_progress_share_one_backward():
    """Periods 4 and 6 cut at position 19: the period-4 chunk (from 16) started before the period-6 one (from 18),
    so the shared backward is the period-4 chunk's; it equals one backward per period."""
    model, ids = tiny("attention", long_levels(4, 6)), stream(19)
    out = model(ids)
    state = out.state
    sched = model.cms_schedule
    shared = sched._partial_grads(state)
    for C in (4, 6):
        keys = [(b, i) for b in range(2) for i, lvl in enumerate(model.blocks[b].levels) if lvl.period == C]
        levels = [(model.blocks[b].cms[i], model.blocks[b].levels[i], state.layers[b].cms[i]) for b, i in keys]
        for key, ref in zip(keys, level_grads(levels, state.schedule.acc[C])):
            for name, g in ref.items():
                assert (shared[key][name] - g).abs().max() <= 1e-12 * g.abs().max().clamp_min(1e-30), (C, name)


@pytest.mark.parametrize("core", ["attention", "self_modifying", "titans"])
def test_resume_inside_a_long_period_is_exact(core):
    """Export at a window boundary inside a period-16 chunk, restore, continue: the same logits and writes as the
    stream that was never saved (the carried gradient travels in the export)."""
    model, ids = tiny(core, long_levels(4, 16)), stream(32)
    _, mid = windows(model, ids[:, :8], 4)
    cont, end = windows(model, ids[:, 8:], 4, model.import_state(model.export_state(mid)))
    ref_logits, ref_end = windows(model, ids[:, 8:], 4, mid)
    assert torch.equal(cont, ref_logits)
    for got, ref in zip(deltas(model, end), deltas(model, ref_end)):
        assert torch.equal(got, ref)


def test_no_grad_one_token_pieces_warn_when_cut_inside_a_chunk():
    model = tiny("attention", long_levels(4))
    state = None
    with torch.no_grad():
        for t in range(6):
            state = model(stream(6)[:, t : t + 1], state).state
    with pytest.warns(UserWarning, match="run without a graph"):
        model.detach_state(state)


def test_no_grad_windows_shorter_than_a_period_go_on_past_the_chunk_end():
    """Cut after every 2-token window under no_grad with period 4: each cut drops the partial chunk's loss (with
    the warning), and the stream goes on through the chunk ends, its level writing from the loss it still has."""
    model, ids = tiny("attention", long_levels(4)), stream(12)
    state, seen = None, []
    with torch.no_grad(), pytest.warns(UserWarning, match="run without a graph"):
        for a in range(0, 12, 2):
            out = model(ids[:, a : a + 2], state)
            seen.append(out.logits)
            state = model.detach_state(out.state)
    assert int(state.pos[0]) == 12 and all(torch.isfinite(x).all() for x in seen)


@pytest.mark.parametrize("core", ["attention", "self_modifying"])
def test_writes_taken_from_the_outer_backward_equal_their_own_backward(core):
    """Stream training takes the window-end CMS gradients from the outer backward (`detach_after_backward`) when
    the outer loss leaves out the window's last prediction: the same outer gradients, writes and carried chunk
    gradients as cutting the state before the backward (`detach_state`), over three 8-token windows with
    periods 4 (due at every window end) and 16 (in progress across windows)."""
    ids = stream(25)
    runs = {}
    for mode in ("detach", "deferred"):
        model = tiny(core, long_levels(4, 16))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state, grads = None, []
        for a in range(0, 24, 8):
            out = model(ids[:, a : a + 8], state)
            logits = out.logits[:, :-1].float()  # fp32, as the trainer takes them
            losses = F.cross_entropy(logits.flatten(0, 1), ids[:, a + 1 : a + 8].flatten(), reduction="none")
            loss = losses.mean()
            if mode == "detach":
                state = model.detach_state(out.state)
                loss.backward()
            else:
                end = model.detach_after_backward(out.state)
                loss.backward()
                state = end.finish(losses.numel())
            grads += [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
            opt.zero_grad()
        runs[mode] = grads, deltas(model, state), [st.grad for ls in state.layers for st in ls.cms if st is not None]
    # both differentiate the same fp32 losses, one as their sum, one as their mean times n: equal to fp32 round-off
    (g1, d1, c1), (g2, d2, c2) = runs["detach"], runs["deferred"]
    for a, b in zip(g1 + d1, g2 + d2):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-9
    assert all(x is None for x in c1[::2]) and all(x is not None for x in c1[1::2])  # period 4 written, 16 carried
    for x, y in zip(c1[1::2], c2[1::2]):
        for n in x:
            assert (x[n] - y[n]).abs().max() <= 1e-6 * x[n].abs().max()


def test_level_decay_bounds_the_writes():
    """A write is Δ ← (1 − λ)·Δ + lr·d: under a constant push d (sgd, fixed gradient) Δ_n = lr·d·(1 − (1 − λ)ⁿ)/λ,
    bounded by lr·d/λ, where without retention it grows as n·lr·d."""
    from hope.cms.level import apply_writes
    from hope.layers.mlp import SwiGLU
    from hope.optim import memory_rule
    from hope.state import LevelState

    torch.manual_seed(0)
    mlp = SwiGLU(4, 6).double()
    g = {n: torch.randn(1, *w.shape, dtype=torch.float64) for n, w in mlp.weights().items()}
    for decay in (0.0, 0.25):
        level = CMSLevel(period=4, hidden=6, lr=LR, optimizer="sgd", decay=decay)
        delta = {n: torch.zeros_like(t) for n, t in g.items()}
        st = LevelState(delta, {n: memory_rule("sgd").init_state(t) for n, t in delta.items()})
        for _ in range(20):
            apply_writes([(mlp, level, st)], [g])
        factor = 20 if decay == 0 else (1 - (1 - decay) ** 20) / decay
        for n in g:
            assert torch.allclose(st.delta[n], LR * factor * g[n], rtol=1e-12, atol=0)


def test_bad_decay_is_named():
    with pytest.raises(ValueError, match="decay must be a number in \\[0, 1\\), got 1.0"):
        CMSLevel(period=4, decay=1.0)


def test_carry_core_false_keeps_only_the_cms_across_a_cut():
    """With carry_core=False a cut resets every core (the next window starts from the meta-learned initial
    memories) and keeps the CMS levels as carry_core=True does; the next window then reads differently."""
    torch.manual_seed(0)
    config = HopeConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=2, core="self_modifying",
                        cms=long_levels(4, 16), ffn_hidden=48, carry_core=False)
    model, ids = HopeLM(config).double(), stream(16)
    cut = model.detach_state(model(ids[:, :8]).state)
    assert all(layer.core is None for layer in cut.layers)
    assert cut.layers[0].cms[1].grad is not None  # the period-16 chunk still carries its gradient
    model.cms_schedule.carry_core = True
    carried = model.detach_state(model(ids[:, :8]).state)
    assert all(layer.core is not None for layer in carried.layers)
    for a, b in zip(carried.layers, cut.layers):  # the same CMS levels either way
        assert all(torch.equal(x.delta[n], y.delta[n]) for x, y in zip(a.cms[:2], b.cms[:2]) for n in x.delta)
    assert not torch.allclose(model(ids[:, 8:], carried).logits, model(ids[:, 8:], cut).logits)
