"""Memory benchmarks (MQAR, passkey, formal languages): scoring, bad input, tiny modes end to end (N, T)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` is a folder of scripts at the repo root

from experiments.memory_tasks import formal_languages, mqar, passkey  # noqa: E402
from experiments.memory_tasks.harness import score, train_on_synthetic  # noqa: E402
from hope.data.synthetic import formal_language_task, mqar_task  # noqa: E402


class Oracle(nn.Module):
    """Predicts `answers[b, t]` at every position (logit 1 there, 0 elsewhere)."""

    def __init__(self, answers: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.answers, self.vocab = answers, vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        logits = nn.functional.one_hot(self.answers[: ids.shape[0]].clamp(min=0), self.vocab).float()
        return SimpleNamespace(logits=logits)  # [B, T, V]


def test_score_token_accuracy_and_exact_match():
    y = torch.full((2, 4), -100)
    y[0, 1], y[0, 3], y[1, 2] = 5, 6, 7
    guess = y.clone()
    guess[0, 3] = 5  # one of example 0's two answers wrong
    res = score(Oracle(guess, 8), torch.zeros(2, 4, dtype=torch.long), y)
    assert res == {"token_accuracy": 2 / 3, "exact_match": 0.5}
    restricted = score(Oracle(guess, 8), torch.zeros(2, 4, dtype=torch.long), y, candidates=torch.tensor([6, 7]))
    assert restricted["token_accuracy"] == 2 / 3  # 5 is not a candidate: argmax over {6, 7} ties -> first, 6


def test_sequences_longer_than_the_model_limit_raise():
    data = mqar_task(4, n_pairs=8, vocab_size=32, seed=0)  # length 31
    with pytest.raises(ValueError, match="31 exceeds the model's max_seq_len=16"):
        train_on_synthetic("transformer", "tiny", 32, data, data, 1, 2, 1e-3, 0, max_seq_len=16)


def test_formal_comparison_table_and_bad_languages():
    results = {"parity": {"transformer": {"bin0": 75.0, "bin1": 50.0}}}
    table = formal_languages.comparison_table(results, ["parity"])
    assert "| paper: Transformer | 46.4 / 0.0 |" in table and "| ours: Transformer++ | 75.0 / 50.0 |" in table
    with pytest.raises(ValueError, match="'klingon'"):
        formal_languages.run(["--tiny", "--languages", "klingon"])
    with pytest.raises(ValueError, match="--lr must be > 0, got -0.1"):
        formal_languages.run(["--tiny", "--lr", "-0.1"])
    a = formal_language_task("parity", 6, (1, 50), seed=3)
    b = formal_language_task("parity", 6, (1, 50), seed=3)
    assert torch.equal(a.inputs, b.inputs)  # the benchmark's data are reproducible by seed


@pytest.mark.parametrize("bench, key", [(mqar, "pairs"), (passkey, "tokens")])
def test_sweep_tiny_modes(tmp_path, bench, key):
    bench.run(["--tiny", "--models", "transformer", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / f"{bench.NAME}.json").read_text())
    res = doc["results"]["transformer"]
    n = len(doc["test_settings"])
    assert len(res["exact_match"]) == n == len(res["token_accuracy"])
    assert all(0.0 <= v <= 1.0 for v in res["exact_match"] + res["token_accuracy"])
    assert f"{key} {doc['test_settings'][-1]}" in doc["table"] and doc["meta"]["machine"]["cpu_count"]
    assert (tmp_path / f"{bench.NAME}.png").exists()


def test_formal_languages_tiny_mode(tmp_path):
    formal_languages.run(["--tiny", "--models", "transformer", "--languages", "parity", "--lr", "1e-3",
                          "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "formal_languages.json").read_text())
    cell = doc["results"]["parity"]["transformer"]
    assert doc["config"]["lr"] == 1e-3
    assert 0.0 <= cell["bin0"] <= 100.0 and 0.0 <= cell["bin1"] <= 100.0
    assert doc["paper_table5"]["Hope"]["parity"] == [100.0, 100.0]
    assert "ours: Transformer++" in (tmp_path / "formal_languages.md").read_text()
    assert doc["config"]["languages"] == "parity"  # what ran, not the mode's default list


def test_formal_languages_curriculum_trains_short_strings_first(tmp_path, monkeypatch, capsys):
    """`--curriculum LEN:STEPS`: a first phase on strings of length 1–LEN, then the mode's steps on Bin0."""
    from experiments.memory_tasks import formal_languages as fl

    seen = []
    real = fl.train_on_synthetic
    monkeypatch.setattr(fl, "train_on_synthetic", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    fl.run(["--tiny", "--models", "hope", "--languages", "parity", "--curriculum", "6:2", "--out", str(tmp_path)])
    (args, kwargs), = seen
    first, steps, then = args[3], args[5], kwargs["then"]
    lengths = (first.inputs != 0).sum(1) - 1  # symbols before QUERY
    assert steps == 2 and int(lengths.max()) <= 6 and first.inputs.shape[0] == 2 * fl.MODES["tiny"]["batch"]
    assert len(then) == 1 and then[0][2] == fl.MODES["tiny"]["steps"] and then[0][0].inputs.shape[1] > 7
    doc = json.loads((tmp_path / "formal_languages.json").read_text())
    assert doc["config"]["curriculum"] == {"max_len": 6, "steps": 2}
    for bad in ("60:10", "6", "0:5", "6:0"):
        with pytest.raises(SystemExit):
            fl.parser().parse_args(["--tiny", "--curriculum", bad])
        assert "--curriculum is LEN:STEPS" in capsys.readouterr().err


def test_render_rebuilds_table_and_plot_and_keeps_the_run_record(tmp_path):
    from experiments.memory_tasks import harness

    mqar.run(["--tiny", "--models", "transformer", "--out", str(tmp_path)])
    path = tmp_path / "mqar.json"
    doc = json.loads(path.read_text())
    doc["results"]["transformer"]["token_accuracy"] = [0.5] * len(doc["test_settings"])
    doc["table"] = "stale"
    path.write_text(json.dumps(doc))
    (tmp_path / "mqar.png").unlink()
    harness.render(path)
    again = json.loads(path.read_text())
    assert again["meta"] == doc["meta"]  # the run's date, command and commit stay
    assert "/ 50.0 |" in again["table"] and again["table"] == (tmp_path / "mqar.md").read_text().strip()
    assert (tmp_path / "mqar.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_resume_skips_saved_models(tmp_path, monkeypatch):
    """A sweep interrupted after its first model goes on with --resume and trains only the models left."""
    from experiments.common.results import Partial
    from experiments.memory_tasks import harness

    mode = {**mqar.MODES["tiny"], "device": "cpu", "seed": 0, "mode": "tiny"}  # the config mqar.run saves
    saved = Partial(mqar.NAME, tmp_path, mode)
    saved.put("transformer", {"params": 1, "train_seconds": 0.0, "final_train_loss": 9.0,
                              "token_accuracy": [0.25] * 3, "exact_match": [0.0] * 3})
    trained = []
    real = harness.train_on_synthetic
    monkeypatch.setattr(harness, "train_on_synthetic",
                        lambda name, *a, **k: trained.append(name) or real(name, *a, **k))
    mqar.run(["--tiny", "--models", "transformer,titans", "--out", str(tmp_path), "--resume"])
    doc = json.loads((tmp_path / "mqar.json").read_text())
    assert trained == ["titans"]
    assert doc["results"]["transformer"]["final_train_loss"] == 9.0  # read back, not retrained
    assert not (tmp_path / "mqar.partial.json").exists()


def test_a_diverged_model_is_shown_as_such(tmp_path, monkeypatch):
    from experiments.common.train import Diverged
    from experiments.memory_tasks import harness

    real = harness.train_on_synthetic

    def titans_diverges(name, *args, **kwargs):
        if name == "titans":
            raise Diverged("train", 3, float("inf"), None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(harness, "train_on_synthetic", titans_diverges)
    monkeypatch.setattr(formal_languages, "train_on_synthetic", titans_diverges)
    mqar.run(["--tiny", "--models", "transformer,titans", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "mqar.json").read_text())
    assert doc["results"]["titans"]["exact_match"] == [None] * len(doc["test_settings"])
    assert "| Titans |" in doc["table"] and "diverged" in doc["table"]
    assert doc["results"]["titans"]["params"] > 0 and (tmp_path / "mqar.png").exists()
    formal_languages.run(["--tiny", "--models", "transformer,titans", "--languages", "parity", "--out", str(tmp_path)])
    cell = json.loads((tmp_path / "formal_languages.json").read_text())["results"]["parity"]["titans"]
    assert cell["bin0"] is None and "step 3" in cell["diverged"]
    assert "| ours: Titans | diverged |" in (tmp_path / "formal_languages.md").read_text()


def test_passkey_stream_mode_reads_in_windows(tmp_path, monkeypatch):
    """`--stream`: haystacks are read in windows (state carried), after a longer-haystack phase."""
    from experiments.memory_tasks import harness

    seen = []
    real = harness.windowed_logits
    monkeypatch.setattr(harness, "windowed_logits", lambda m, x, w=None, *a: seen.append((x.shape[1], w))
                        or real(m, x, w, *a))
    passkey.run(["--tiny", "--stream", "--models", "hope", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "passkey_stream.json").read_text())
    assert doc["test_settings"] == passkey.STREAM_MODES["tiny"]["test_lens"] and doc["config"]["window"] == 64
    assert {(256, 64), (128, 64)} <= set(seen)  # the test haystacks, read 64 tokens at a time
    assert len(doc["results"]["hope"]["exact_match"]) == 2


def test_passkey_stream_window_and_phases_flags(tmp_path, monkeypatch, capsys):
    """`--window` sets the window of training and test, `--then` the longer-haystack phases; both need `--stream`
    and well-formed values. `--test-lens` sets the lengths tested, `--n-test` the haystacks per length."""
    from experiments.memory_tasks import harness

    seen = []
    real = harness.train_on_synthetic
    monkeypatch.setattr(harness, "train_on_synthetic", lambda *a, **k: seen.append(a) or real(*a, **k))
    passkey.run(["--tiny", "--stream", "--models", "hope", "--window", "128", "--then", "128:1,256:1",
                 "--test-lens", "96,320", "--n-test", "5", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "passkey_stream.json").read_text())
    assert doc["config"]["window"] == 128 and doc["test_settings"] == [96, 320] and doc["config"]["n_test"] == 5
    exact = doc["results"]["hope"]["exact_match"]
    assert all(round(e * 5, 9) == round(e * 5) for e in exact)  # rates of 5 haystacks
    assert doc["config"]["then"] == [{"train_len": 128, "steps": 1}, {"train_len": 256, "steps": 1}]
    window, then = seen[0][10], seen[0][11]
    assert window == 128 and [(t[0].inputs.shape[1], n) for t, n in ((p[:2], p[2]) for p in then)] == \
        [(128, 1), (256, 1)]
    for bad, match in ((["--window", "64"], "add --stream"), (["--stream", "--window", "0"], "--window must"),
                       (["--stream", "--then", "128"], "LEN:STEPS"), (["--stream", "--then", ""], "at least one"),
                       (["--test-lens", "1024,x"], "positive ints"), (["--test-lens", "0"], "positive ints"),
                       (["--n-test", "0"], "--n-test must")):
        with pytest.raises(SystemExit):
            passkey.parse_args(["--tiny", *bad])
        assert match in capsys.readouterr().err


def test_saved_models_are_scored_again_without_training(tmp_path, monkeypatch):
    """`--save-models DIR` writes each trained model; `--from-saved DIR` scores it at other lengths, trains nothing,
    and gives the same scores where the lengths are the same."""
    from experiments.memory_tasks import harness

    first = ["--tiny", "--stream", "--models", "hope", "--memory", "max_horizon=64", "--seed", "3"]
    passkey.run([*first, "--save-models", str(tmp_path / "models"), "--out", str(tmp_path)])
    trained = json.loads((tmp_path / "passkey_stream.json").read_text())["results"]["hope"]
    monkeypatch.setattr(harness, "train_on_synthetic", lambda *a, **k: pytest.fail("--from-saved trained a model"))
    lens = [*passkey.STREAM_MODES["tiny"]["test_lens"], 384]
    passkey.run([*first, "--from-saved", str(tmp_path / "models"), "--test-lens", ",".join(map(str, lens)),
                 "--tag", "_again", "--out", str(tmp_path)])
    again = json.loads((tmp_path / "passkey_stream_again.json").read_text())["results"]["hope"]
    for key in ("exact_match", "token_accuracy"):
        assert again[key][:2] == trained[key]
    assert len(again["exact_match"]) == 3 and again["loaded_from"].endswith("hope.pt")
    assert again["train_seconds"] == trained["train_seconds"] and again["params"] == trained["params"]
    model, info = harness.load_trained(tmp_path / "models" / "hope.pt")
    assert model.config.memory.max_horizon == 64  # the --memory field of the run that saved it
    assert not model.training and info["final_train_loss"] == trained["final_train_loss"]
    with pytest.raises(FileNotFoundError, match="no saved model at .*nowhere.*--save-models"):
        passkey.run([*first, "--from-saved", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_init_from_trains_a_saved_model_on_the_later_phases_only(tmp_path, monkeypatch):
    """`--init-from DIR` starts from the saved model (same weights) and trains only the `--then` phases; it refuses
    a run with no such phase, and `--from-saved` beside it."""
    from experiments.memory_tasks import harness

    first = ["--tiny", "--stream", "--models", "hope"]
    passkey.run([*first, "--save-models", str(tmp_path / "models"), "--out", str(tmp_path)])
    saved, _ = harness.load_trained(tmp_path / "models" / "hope.pt")
    seen = []
    real = harness.train_on_tasks

    def record(model, tasks, cfg, **k):
        seen.append(([t.train_inputs.shape[1] for t in tasks], [p.detach().clone() for p in model.parameters()]))
        return real(model, tasks, cfg, **k)

    monkeypatch.setattr(harness, "train_on_tasks", record)
    passkey.run([*first, "--init-from", str(tmp_path / "models"), "--then", "256:1", "--tag", "_more",
                 "--out", str(tmp_path)])
    (lengths, weights), = seen
    assert lengths == [256] and all(torch.equal(a, b) for a, b in zip(weights, saved.parameters()))
    doc = json.loads((tmp_path / "passkey_stream_more.json").read_text())
    assert doc["results"]["hope"]["started_from"].endswith("hope.pt")
    with pytest.raises(ValueError, match="give one of them"):
        passkey.run([*first, "--init-from", "a", "--from-saved", "b", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="phases of --then, and there are none"):
        passkey.run(["--tiny", "--models", "hope", "--init-from", str(tmp_path / "models"), "--out", str(tmp_path)])


def test_sweep_memory_flag_reaches_the_core_and_tags_the_files(tmp_path, monkeypatch):
    """`--memory` builds HOPE's core with those MemoryConfig fields (shown in the table); `--tag` names the files."""
    from experiments.memory_tasks import harness

    built = []
    real = harness.build_model
    monkeypatch.setattr(harness, "build_model", lambda *a, **kw: built.append(kw) or real(*a, **kw))
    passkey.run(["--tiny", "--models", "hope", "--memory", "retain_toward=init", "--tag", "_init",
                 "--out", str(tmp_path)])
    assert built[0]["memory"] == {"retain_toward": "init"}
    doc = json.loads((tmp_path / "passkey_init.json").read_text())
    assert doc["config"]["memory"] == {"retain_toward": "init"} and "(retain_toward=init)" in doc["table"]
    with pytest.raises(ValueError, match="unknown MemoryConfig field 'retain'"):
        passkey.run(["--tiny", "--models", "hope", "--memory", "retain=init", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--memory sets the core of"):
        passkey.run(["--tiny", "--models", "transformer", "--memory", "retain_toward=init", "--out", str(tmp_path)])


def test_windowed_logits_carry_the_state_and_skip_autograd_where_nothing_is_scored():
    from hope import CMSLevel, HopeLM, preset
    from hope.eval import windowed_logits

    torch.manual_seed(0)
    model = HopeLM(preset("hope", "tiny", vocab_size=32, cms=[CMSLevel()])).double()
    x = torch.randint(0, 32, (2, 24))
    state, pieces = None, []
    with torch.no_grad():
        for a in range(0, 24, 8):
            out = model(x[:, a : a + 8], state)
            pieces.append(out.logits)
            state = model.detach_state(out.state)
        whole = windowed_logits(model, x, 8)
        one_call = model(x).logits
    assert torch.equal(whole, torch.cat(pieces, 1))
    torch.testing.assert_close(whole, one_call, rtol=1e-9, atol=1e-9)  # windows, state carried == one call
    grad_modes = []
    model.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    scored = torch.zeros(2, 24, dtype=torch.bool)
    scored[:, -1] = True
    windowed_logits(model, x, 8, scored)[:, -1].sum().backward()
    assert grad_modes == [False, False, True] and model.embed.weight.grad is not None
    with pytest.raises(ValueError, match="window must be a positive"):
        windowed_logits(model, x, 0)
