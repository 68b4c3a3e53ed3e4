"""HopeLM invariants of docs/design.md §8 for every core, in fp64 on CPU."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

from hope import CMSLevel, HopeConfig, HopeLM, preset
from hope.cms import level as cms
from hope.cms.schedule import CMSSchedule

CORES = ["attention"]
if importlib.util.find_spec("hope.layers.self_modifying") is not None:
    CORES.append("self_modifying")
if importlib.util.find_spec("hope.layers.titans") is not None:
    CORES.append("titans")


def tiny(core: str = "attention", cms=None, n_layers: int = 2, **kw) -> HopeLM:
    torch.manual_seed(0)
    cfg = HopeConfig(vocab_size=23, d_model=32, n_layers=n_layers, n_heads=2, core=core,
                     cms=cms or [CMSLevel()], ffn_hidden=48, **kw)
    return HopeLM(cfg).double()


def fast_cms():
    return [CMSLevel(period=4, hidden=16, lr=0.5), CMSLevel(period=8, hidden=16, lr=0.5), CMSLevel(hidden=16)]


def run_pieces(model, ids, cuts):
    state, outs = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out = model(ids[:, a:b], state)
        state = out.state
        outs.append(out.logits)
    return torch.cat(outs, dim=1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("with_cms", [False, True])
def test_pieces_equal_whole(core, with_cms):
    model = tiny(core, fast_cms() if with_cms else None)
    ids = torch.randint(0, 23, (2, 21))
    whole = model(ids).logits
    assert rel_err(run_pieces(model, ids, [0, 3, 4, 11, 16, 21]), whole) < 1e-10
    assert rel_err(run_pieces(model, ids, list(range(22))), whole) < 1e-10  # one token per call


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("with_cms", [False, True])
def test_causal(core, with_cms):
    model = tiny(core, fast_cms() if with_cms else None)
    ids = torch.randint(0, 23, (1, 17))
    base = model(ids).logits
    ids2 = ids.clone()
    ids2[0, 9] = (ids2[0, 9] + 1) % 23
    changed = model(ids2).logits
    assert torch.equal(base[:, :9], changed[:, :9])
    assert not torch.allclose(base[:, 9:], changed[:, 9:])


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("with_cms", [False, True])
def test_batch_equals_single_runs(core, with_cms):
    model = tiny(core, fast_cms() if with_cms else None)
    ids = torch.randint(0, 23, (3, 19))
    batch = model(ids).logits
    singles = torch.cat([model(ids[i : i + 1]).logits for i in range(3)])
    assert rel_err(batch, singles) < 1e-10


def test_cms_weights_change_only_at_period_multiples():
    model = tiny("attention", [CMSLevel(period=4, hidden=16, lr=0.5), CMSLevel(hidden=16)])
    ids = torch.randint(0, 23, (2, 13))
    state = None
    previous = None
    for t in range(13):
        state = model(ids[:, t : t + 1], state).state
        # the weights token t was processed with (a write due after token count t is applied before token t)
        weights = state.layers[0].cms[0].fast["w_up"].detach().clone()
        if previous is not None:
            changed = not torch.equal(weights, previous)
            assert changed == (t % 4 == 0), f"weights for token {t}"
        previous = weights
    assert state.schedule.due == [] and state.schedule.acc[4] is not None  # 13 tokens: inside the 4th chunk
    assert state.layers[0].cms[1] is None  # frozen level keeps no fast state


def test_write_at_end_of_call_is_deferred_not_lost():
    model = tiny("attention", [CMSLevel(period=4, hidden=16, lr=0.5), CMSLevel(hidden=16)])
    ids = torch.randint(0, 23, (1, 8))
    out = model(ids)
    assert out.state.schedule.due == [4]  # the chunk ending at token count 8 is written when the weights are needed
    exported = model.export_state(out.state)  # exporting applies it
    direct = model(ids[:, :4]).state
    assert not torch.equal(exported["layers"][0]["cms"][0]["delta"]["w_up"],
                           model.export_state(direct)["layers"][0]["cms"][0]["delta"]["w_up"])


def test_inference_defers_the_last_writes_then_cuts_the_graph(monkeypatch):
    """Under no_grad a call that ends at a multiple of every period leaves its last writes to whoever needs the
    weights (an evaluation that drops the state never pays them); the next call applies them first, then cuts the
    graph so memory stays bounded, and the stream still equals one call."""
    model = tiny(CORES[-1], fast_cms())
    ids = torch.randint(0, 23, (2, 24), generator=torch.Generator().manual_seed(3))
    events = []
    write, detach = CMSSchedule._write, CMSSchedule.detach_
    monkeypatch.setattr(CMSSchedule, "_write", lambda self, Cs, st: (events.append(sorted(Cs)), write(self, Cs, st)))
    monkeypatch.setattr(CMSSchedule, "detach_", lambda self, st: (events.append("cut"), detach(self, st)))
    with torch.no_grad():
        first = model(ids[:, :16])
        assert events == [[4], [4, 8], "cut", [4]]  # writes at 4, 8 (both periods, then the cut), 12; 16's wait
        assert first.state.schedule.due == [4, 8] and first.state.schedule.acc[8].requires_grad
        second = model(ids[:, 16:], first.state)
    assert events[4:] == [[4, 8], "cut", [4]]  # applied before the first token that needs them, then the cut
    whole = model(ids).logits
    assert rel_err(torch.cat([first.logits, second.logits], dim=1), whole) < 1e-10


@pytest.mark.parametrize("core", CORES)
def test_nested_periods_share_one_write_backward(core, monkeypatch):
    """Where chunks of several periods end together, one backward of the largest chunk's loss writes them all: the
    same logits, outer gradients and fast weights as one backward per period, recorded or replayed."""
    ids = torch.randint(0, 23, (2, 24), generator=torch.Generator().manual_seed(4))

    def separate(self, periods, state):
        for C in sorted(periods):
            cms.write_levels(self._levels_with_period(C, state), state.schedule.acc.get(C))
            self._end_chunk(C, state)

    def run(model):
        model.zero_grad()
        out = model(ids)
        exported = model.export_state(out.state)["layers"]  # makes the writes due at 24 (both periods)
        out.logits.square().mean().backward()
        with torch.no_grad():
            stepped = run_pieces(model, ids, list(range(25)))  # one-token calls: replayed chunks
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        deltas = [st["delta"]["w_up"] for layer in exported for st in layer["cms"] if st is not None]
        return [out.logits.detach(), stepped, *grads, *deltas]

    model = tiny(core, fast_cms())
    shared = run(model)
    monkeypatch.setattr(CMSSchedule, "_write", separate)
    reference = run(model)
    assert len(shared) == len(reference)
    for got, ref in zip(shared, reference):
        assert rel_err(got, ref) < 1e-10


def test_cms_write_is_per_sample_and_learns():
    """A fast level that sees the same text twice predicts it better the second time (dynamic evaluation)."""
    model = tiny("attention", [CMSLevel(period=8, hidden=16, lr=0.05, optimizer="sgd"), CMSLevel(hidden=16)])
    torch.manual_seed(1)
    chunk = torch.randint(0, 23, (1, 8))
    ids = torch.cat([chunk, chunk, chunk], dim=1)
    logits = model(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    frozen = tiny("attention", [CMSLevel(period=None, hidden=16), CMSLevel(hidden=16)])
    frozen.load_state_dict(model.state_dict())
    ce_frozen = torch.nn.functional.cross_entropy(frozen(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    assert torch.allclose(ce[:7], ce_frozen[:7])  # first chunk: identical weights
    assert ce[16:23].sum() < ce_frozen[16:23].sum()  # after two writes on this text


def test_outer_gradients_reach_fast_level_initial_weights():
    model = tiny("attention", fast_cms())
    ids = torch.randint(0, 23, (2, 16))
    loss = model(ids).logits.sum()
    loss.backward()
    for block in model.blocks:
        for mlp in block.cms:
            for name, w in mlp.weights().items():
                assert w.grad is not None and w.grad.abs().sum() > 0, name


@pytest.mark.parametrize("core", CORES)
def test_cached_generation_equals_uncached(core):
    model = tiny(core, fast_cms())
    prompt = torch.randint(0, 23, (2, 5))
    out = model.generate(prompt, max_new_tokens=9, temperature=0)
    assert out.shape == (2, 14)
    with torch.no_grad():
        full = model(out).logits
    # greedy: every generated token is the argmax of the uncached forward at the previous position
    assert torch.equal(full[:, 4:-1].argmax(-1), out[:, 5:])


def test_export_import_state_roundtrip(tmp_path):
    model = tiny("attention", fast_cms())
    ids = torch.randint(0, 23, (2, 24))
    out = model(ids[:, :16])  # 16 is a multiple of every period: the export is exact
    path = tmp_path / "state.pt"
    torch.save(model.export_state(out.state), path)
    restored = model.import_state(torch.load(path, weights_only=False))
    cont = model(ids[:, 16:], restored).logits
    ref = model(ids).logits[:, 16:]
    assert rel_err(cont, ref) < 1e-10


def test_saved_state_format_is_versioned():
    """A saved state without a "version" key (written before the typed state) loads as version 1; an unknown
    version is refused by name."""
    model = tiny(CORES[-1], fast_cms())
    ids = torch.randint(0, 23, (2, 24))
    saved = model.export_state(model(ids[:, :16]).state)
    assert saved["version"] == 1
    legacy = {k: v for k, v in saved.items() if k != "version"}
    cont = model(ids[:, 16:], model.import_state(legacy)).logits
    assert rel_err(cont, model(ids).logits[:, 16:]) < 1e-10
    with pytest.raises(ValueError, match="format version 2"):
        model.import_state({**saved, "version": 2})


def test_detach_inside_chunk_carries_its_gradient():
    """Cut at 6, inside chunks of periods 4 (from 4) and 8 (from 0): both levels carry their chunk's gradient so
    far (stream training, tests/test_stream.py), with no warning."""
    model = tiny("attention", fast_cms())
    out = model(torch.randint(0, 23, (1, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = model.detach_state(out.state)
    carried = [st.grad for st in cut.layers[0].cms[:2]]
    assert all(g is not None and g["w_up"].abs().sum() > 0 for g in carried)
    assert cut.layers[0].cms[2] is None


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros(3, dtype=torch.long), r"\[B, T\] tensor"),
        (torch.zeros(1, 3), "int64 or int32"),
        (torch.full((1, 3), 23), r"out of range \[0, 23\)"),
        (torch.full((1, 3), -1), "out of range"),
    ],
)
def test_bad_input_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        tiny()(ids)


def test_max_seq_len_enforced():
    model = tiny(max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"core": "mamba"}, "core must be one of"),
        ({"n_layers": 0}, "n_layers must be a positive int"),
        ({"cms": []}, "at least one level"),
        ({"cms": [{"period": 1}]}, "period must be an int >= 2"),
        ({"cms": [{"period": 4, "lr": -1.0}]}, "lr must be >= 0"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HopeConfig(**kwargs)


def test_presets_param_budget_matched():
    def count(name):
        return sum(p.numel() for p in HopeLM(preset(name, "small")).parameters())

    ref = count("transformer")
    for name in ["hope_attention", *(["hope"] if "self_modifying" in CORES else []),
                 *(["titans"] if "titans" in CORES else [])]:
        assert abs(count(name) / ref - 1) < 0.05, name


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt'"):
        preset("gpt")


NOT_NESTED = [CMSLevel(period=4, hidden=16, lr=0.5), CMSLevel(period=6, hidden=16, lr=0.5), CMSLevel(hidden=16)]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("cuts", [list(range(30)), [0, 7, 8, 9, 10, 11, 20, 21, 29]])
@pytest.mark.parametrize("levels", [fast_cms(), NOT_NESTED], ids=["periods 4, 8", "periods 4, 6"])
def test_inference_pieces_replay_their_chunks(core, cuts, levels, monkeypatch):
    """Under no_grad, pieces shorter than the smallest period run without a graph and their chunks are replayed at
    the write: logits and final fast weights equal one parallel call (whole chunks recorded in one piece). With
    periods that do not divide each other, a replayed chunk crosses the other period's boundaries: it takes the
    writes made there from the stream, since it could not redo them from its own start."""
    model = tiny(core, levels)
    periods = {lvl.period for lvl in levels if lvl.period}
    ids = torch.randint(0, 23, (2, 29), generator=torch.Generator().manual_seed(2))
    replays = []
    original = CMSSchedule._replay_write
    monkeypatch.setattr(CMSSchedule, "_replay_write",
                        lambda self, step, C, *a: (replays.append(C), original(self, step, C, *a))[1])
    with torch.no_grad():
        whole = model(ids[:, :24])
        assert replays == []  # one 24-token call records its graph: nothing to replay
        state, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            out = model(ids[:, a:b], state)
            state, outs = out.state, outs + [out.logits]
    assert set(replays) == periods
    assert rel_err(torch.cat(outs, dim=1)[:, :24], whole.logits) < 1e-10
    with torch.no_grad():
        ref = model(ids[:, 24:], whole.state).logits  # the writes due at 24 are applied by this call
    assert rel_err(torch.cat(outs, dim=1)[:, 24:], ref) < 1e-10
    mid = model.export_state(model(ids[:, :24]).state)
    with torch.no_grad():
        state = None
        for t in range(24):
            state = model(ids[:, t : t + 1], state).state
    stepped = model.export_state(state)
    for layer, layer_ref in zip(stepped["layers"], mid["layers"]):
        for st, st_ref in zip(layer["cms"], layer_ref["cms"]):
            if st is not None:
                assert rel_err(st["delta"]["w_up"], st_ref["delta"]["w_up"]) < 1e-10


def test_inference_detach_inside_a_replayed_chunk_warns():
    model = tiny("attention", fast_cms())
    with torch.no_grad():
        state = model(torch.randint(0, 23, (1, 8))).state
        state = model(torch.randint(0, 23, (1, 2)), state).state  # 2 < smallest period: no graph recorded
    with pytest.warns(UserWarning, match="inside a CMS chunk"):
        model.detach_state(state)


# --- cms_signal="residual": writes driven by δ = ∂ℓ/∂h_L through each level's own MLP ---------------------------


def level_input_and_delta(model, ids, layer, level):
    """(input of CMS level `level` of block `layer`, δ = ∂(chunk loss)/∂h_L) of one frozen forward over `ids`."""
    seen = {}
    model.blocks[layer].cms[level].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    logits = model(ids).logits  # the chunk loss is taken in fp64 for an fp64 model, as `hope.cms.level` does
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    (delta,) = torch.autograd.grad(loss, seen["h"])
    return seen["x"].detach(), delta


@pytest.mark.parametrize("core", CORES)
def test_residual_write_is_the_level_local_gradient_of_delta(core):
    """The first write of a period-4 level in the lower block equals, per sample, lr · ∂⟨δ, MLP(x)⟩/∂W at θ_0 with
    x the level's input held constant and δ = ∂(chunk loss)/∂h_L, computed here from a frozen copy by autograd."""
    levels = [CMSLevel(period=4, hidden=16, lr=0.5, optimizer="sgd"), CMSLevel(hidden=16)]
    model = tiny(core, levels, cms_signal="residual")
    ids = torch.randint(0, 23, (2, 4), generator=torch.Generator().manual_seed(3))
    written = model.export_state(model(ids).state)["layers"][0]["cms"][0]["delta"]
    frozen = tiny(core, [CMSLevel(hidden=16), CMSLevel(hidden=16)])
    frozen.load_state_dict(model.state_dict())
    x, delta = level_input_and_delta(frozen, ids, layer=0, level=0)
    mlp = frozen.blocks[0].cms[0]
    for b in range(2):
        weights = {name: w.detach().clone().requires_grad_() for name, w in mlp.weights().items()}
        out = torch.nn.functional.silu(x[b] @ weights["w_gate"]) * (x[b] @ weights["w_up"]) @ weights["w_down"]
        grads = torch.autograd.grad((out * delta[b]).sum(), list(weights.values()))
        for (name, _), g in zip(weights.items(), grads):
            assert rel_err(written[name][b], 0.5 * g) < 1e-10, (name, b)
    exact = tiny(core, levels)  # the default signal differentiates through block 1 as well: a different write
    exact_delta = exact.export_state(exact(ids).state)["layers"][0]["cms"][0]["delta"]
    assert rel_err(written["w_up"], exact_delta["w_up"]) > 1e-3


def test_residual_signal_is_exact_for_the_last_level_of_the_last_block():
    levels = [CMSLevel(hidden=16), CMSLevel(period=4, hidden=16, lr=0.5)]
    ids = torch.randint(0, 23, (2, 13), generator=torch.Generator().manual_seed(4))
    residual = tiny("attention", levels, n_layers=1, cms_signal="residual")
    exact = tiny("attention", levels, n_layers=1)
    assert rel_err(residual(ids).logits, exact(ids).logits) < 1e-12
    moved = tiny("attention", [CMSLevel(hidden=16), CMSLevel(hidden=16)], n_layers=1)
    assert rel_err(moved(ids).logits, exact(ids).logits) > 1e-3  # the writes did change the logits


@pytest.mark.parametrize("core", CORES)
def test_residual_signal_keeps_the_streaming_contract(core):
    """Pieces == whole, one-token inference calls (replayed chunks) == whole, batch of B == B runs of one."""
    model = tiny(core, fast_cms(), cms_signal="residual")
    ids = torch.randint(0, 23, (2, 21), generator=torch.Generator().manual_seed(5))
    whole = model(ids).logits
    assert rel_err(run_pieces(model, ids, [0, 3, 4, 11, 16, 21]), whole) < 1e-10
    with torch.no_grad():
        assert rel_err(run_pieces(model, ids, list(range(22))), whole) < 1e-10
    singles = torch.cat([model(ids[i : i + 1]).logits for i in range(2)])
    assert rel_err(singles, whole) < 1e-10
    assert rel_err(tiny(core, fast_cms())(ids).logits, whole) > 1e-3  # not the default signal's result


def test_bad_cms_signal():
    with pytest.raises(ValueError, match="cms_signal must be one of .* got 'local'"):
        HopeConfig(cms_signal="local")


@pytest.mark.parametrize("core", CORES)
def test_compiled_cores_match_eager(core):
    """`compile_cores` changes speed only: the same logits and gradients for a stream fed in pieces (a one-token
    call and CMS writes included) and the same state-dict keys; self-modifying cores really are compiled, the
    others stay eager (see `hope.models.lm.compile_model`)."""
    eager = tiny(core, fast_cms())
    compiled = copy.deepcopy(eager).compile_cores()
    want = core == "self_modifying"
    assert all((block.core._compiled_call_impl is not None) == want for block in compiled.blocks)
    ids = torch.randint(0, 23, (2, 19))
    results = []
    for model in (eager, compiled):
        logits = run_pieces(model, ids, [0, 9, 10, 19])
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (logits_e, grads_e), (logits_c, grads_c) = results
    # fp64 model, but the cores' output norm runs in fp32 (`MemoryOutput`) and Inductor does not round that cast
    # as eager does (`emulate_precision_casts` is off): agreement to fp32 round-off, not fp64
    assert rel_err(logits_c, logits_e) < 1e-6
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():
        assert rel_err(grads_c[name], g) < 1e-5, name
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_trainer_compile_compiles_what_matches_eager():
    from hope.training.module import LMModule

    hope = LMModule(preset="hope", size="tiny", config={"vocab_size": 64}, compile=True)
    assert hope.model._compiled_call_impl is None  # the segment loop and the writes stay eager
    assert all(block.core._compiled_call_impl is not None for block in hope.model.blocks)
    plain = LMModule(preset="transformer", size="tiny", config={"vocab_size": 64}, compile=True)
    assert plain.model._compiled_call_impl is not None  # the whole model
    titans = LMModule(preset="titans", size="tiny", config={"vocab_size": 64}, compile=True)
    assert titans.model._compiled_call_impl is None
    assert all(block.core._compiled_call_impl is None for block in titans.model.blocks)
    assert list(plain.state_dict()) == list(LMModule(preset="transformer", size="tiny",
                                                     config={"vocab_size": 64}).state_dict())
