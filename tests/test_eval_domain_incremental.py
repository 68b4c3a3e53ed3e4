"""Domain-incremental benchmark: task builder and the tiny mode end to end (N windows, T time)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` is a folder of scripts at the repo root

from experiments.common import train as common_train  # noqa: E402
from experiments.common.data import check_fits  # noqa: E402
from experiments.common.models import build_model  # noqa: E402
from experiments.continual import domain_incremental as di  # noqa: E402
from hope.data.corpora import Document  # noqa: E402


def fake_corpora(chars: int = 3000) -> dict[str, list[Document]]:
    """Four small 'domains', each drawn from its own alphabet, so the domains differ and forgetting shows."""
    out = {}
    for d, domain in enumerate(("alpha", "beta", "gamma", "delta")):
        rng = random.Random(d)
        letters = "abcdefghijklmnopqrstuvwxyz"[6 * d : 6 * d + 8] + " \n"
        out[domain] = [
            Document("text", f"{domain}-{k}", "".join(rng.choice(letters) for _ in range(chars))) for k in range(3)
        ]
    return out


def test_build_tasks_deterministic_and_split():
    a = di.build_tasks(fake_corpora(), seq_len=16, n_train=8, n_eval=3, seed=0)
    b = di.build_tasks(fake_corpora(), seq_len=16, n_train=8, n_eval=3, seed=0)
    c = di.build_tasks(fake_corpora(), seq_len=16, n_train=8, n_eval=3, seed=1)
    assert [t.name for t in a] == ["alpha", "beta", "gamma", "delta"]
    assert a[0].train_inputs.shape == (8, 16) and a[0].eval_inputs.shape == (3, 16)
    assert all(torch.equal(x.train_inputs, y.train_inputs) for x, y in zip(a, b))
    assert not torch.equal(a[0].train_inputs, c[0].train_inputs)
    assert torch.equal(a[0].eval_inputs, c[0].eval_inputs)  # evaluation windows do not move with the seed
    assert torch.equal(a[0].train_inputs[:, 1:], a[0].train_targets[:, :-1])  # targets are the next tokens


def test_build_tasks_rejects_bad_configurations():
    with pytest.raises(ValueError, match="none"):
        di.build_tasks({}, seq_len=16, n_train=8, n_eval=3, seed=0)
    with pytest.raises(ValueError, match="'alpha'.*seq_len=4096"):
        di.build_tasks(fake_corpora(), seq_len=4096, n_train=8, n_eval=3, seed=0)
    with pytest.raises(ValueError, match="'empty' has no documents"):
        di.build_tasks({"empty": []}, seq_len=16, n_train=8, n_eval=3, seed=0)
    model = build_model("transformer", "tiny", max_seq_len=16).model
    with pytest.raises(ValueError, match="32 exceeds the model's max_seq_len=16"):
        check_fits(model, 32)


def test_tiny_mode_end_to_end(tmp_path):
    doc = di.run(["--tiny", "--models", "transformer", "--out", str(tmp_path)],
                 corpora=fake_corpora())
    saved = json.loads((tmp_path / "domain_incremental.json").read_text())
    assert saved["benchmark"] == "domain_incremental" and saved["mode"] == "tiny"
    assert {"date", "command", "machine"} <= set(saved["meta"])
    runs = saved["models"]["transformer"]["strategies"]
    assert set(runs) == {"sequential", "replay", "ewc"}
    for res in runs.values():
        assert len(res["R"]) == 4 and all(len(row) == 4 for row in res["R"])
        assert res["metrics"]["higher_is_better"] is False and res["metrics"]["backward_transfer"] is not None
        assert all(0 < v < 10 for row in res["R"] for v in row)  # nats per byte, ln 256 ≈ 5.5 untrained
    assert runs["sequential"]["R"][0] == runs["replay"]["R"][0] == runs["ewc"]["R"][0]
    assert (tmp_path / "domain_incremental.png").stat().st_size > 1000
    assert "| Transformer++ | sequential |" in (tmp_path / "domain_incremental.md").read_text()
    assert doc["tasks"] == saved["tasks"]
    png = tmp_path / "domain_incremental.png"
    png.unlink()
    assert di.run(["--replot", str(tmp_path / "domain_incremental.json")])["table"] == saved["table"]
    assert png.stat().st_size > 1000  # redrawn from the JSON alone


def test_interrupted_run_resumes_without_redoing_finished_units(tmp_path, monkeypatch):
    """A run killed in its second (model, strategy) unit goes on with --resume: the first unit is read back from
    `domain_incremental.partial.json`, only the rest is trained, and the partial file is gone at the end."""
    real = common_train.train_on_tasks
    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    argv = ["--tiny", "--models", "transformer", "--strategies", "sequential,replay", "--out", str(tmp_path)]
    monkeypatch.setattr(common_train, "train_on_tasks", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        di.run(argv, corpora=fake_corpora())
    partial = json.loads((tmp_path / "domain_incremental.partial.json").read_text())
    assert list(partial["units"]) == ["transformer/sequential"]
    assert not (tmp_path / "domain_incremental.json").exists()

    calls.clear()
    monkeypatch.setattr(common_train, "train_on_tasks", lambda *a, **k: calls.append(k) or real(*a, **k))
    with pytest.raises(ValueError, match="steps"):  # another budget cannot mix with the saved units
        di.run([*argv, "--resume", "--steps", "5"], corpora=fake_corpora())
    doc = di.run([*argv, "--resume"], corpora=fake_corpora())
    assert len(calls) == 1  # only the replay unit ran again
    runs = doc["models"]["transformer"]["strategies"]
    assert runs["sequential"]["R"] == partial["units"]["transformer/sequential"]["R"]
    assert runs["replay"]["R"][0] == runs["sequential"]["R"][0]  # same init and first task either way
    assert not (tmp_path / "domain_incremental.partial.json").exists()
    assert "| Transformer++ | replay |" in (tmp_path / "domain_incremental.md").read_text()


def test_a_diverged_run_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    from experiments.common.train import Diverged

    real = common_train.train_on_tasks

    def replay_diverges(model, tasks, cfg, **kwargs):
        if cfg.strategy == "replay":
            raise Diverged(tasks[1].name, 2, float("nan"), 2.5)
        return real(model, tasks, cfg, **kwargs)

    monkeypatch.setattr(common_train, "train_on_tasks", replay_diverges)
    doc = di.run(["--tiny", "--models", "transformer", "--strategies", "sequential,replay", "--out", str(tmp_path)],
                 corpora=fake_corpora())
    runs = json.loads((tmp_path / "domain_incremental.json").read_text())["models"]["transformer"]["strategies"]
    assert runs["replay"] == {"diverged": "diverged: training loss nan at step 2 of task 'beta'; the step before "
                                          "it had 2.500"}
    assert len(runs["sequential"]["R"]) == 4
    assert "| Transformer++ | replay | " in doc["table"] and "diverged: training loss nan" in doc["table"]


def test_stream_protocol_tiny(tmp_path):
    """--stream: the fast state is carried through the domain sequence; both R matrices, the switch probe, and the
    models in their stream configurations (long CMS periods with retention; a one-window KV cache)."""
    di.run(["--tiny", "--stream", "--out", str(tmp_path)], corpora=fake_corpora())
    doc = json.loads((tmp_path / "domain_incremental_stream_carried.json").read_text())
    assert (tmp_path / "domain_incremental_stream_carried.png").is_file()
    assert set(doc["models"]) == {"hope/carried", "transformer/carried"} and doc["tasks"][0] == "alpha"
    for unit in doc["models"].values():
        n = len(doc["tasks"])
        assert len(unit["R_stream"]) == len(unit["R_weights"]) == n and len(unit["switches"]) == n - 1
        assert unit["switches"][0]["to"] == "beta" and len(unit["switches"][0]["per_window"]) == 4
        assert 0 < unit["metrics_stream"]["average_accuracy"] < 10
        assert unit["R_stream"] != unit["R_weights"]  # the carried state changes what the model predicts
    cfg = di.stream_model("hope", "tiny", 0, 64).model.config
    assert [lvl.period for lvl in cfg.cms] == [64, 512, 4096] and cfg.carry_core and cfg.persist
    assert cfg.memory.retain_toward == "init"
    assert di.stream_model("transformer", "tiny", 0, 64).model.config.kv_cache == 64


def test_stream_outer_periods_hold_the_slow_levels(tmp_path, monkeypatch):
    """--outer-periods 1,1,1000: HOPE's period-4,096 CMS level never takes an outer step in the tiny run (its
    initial weights stay as built) while level 0 moves; the result goes to files named with --tag."""
    seen = {}
    real = di.train_stream

    def keep(model, *a, **k):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = real(model, *a, **k)
        seen["after"] = dict(model.named_parameters())
        return out

    monkeypatch.setattr(di, "train_stream", keep)
    di.run(["--tiny", "--stream", "--models", "hope", "--outer-periods", "1,1,1000", "--tag", "_slow",
            "--out", str(tmp_path)], corpora=fake_corpora())
    doc = json.loads((tmp_path / "domain_incremental_stream_carried_slow.json").read_text())
    assert doc["config"]["outer_periods"] == [1, 1, 1000]
    moved = {n for n, p in seen["after"].items() if not torch.equal(p, seen["before"][n])}
    assert not any(".cms.2." in n for n in moved) and any(".cms.0." in n for n in moved)
    assert any(".core." in n for n in moved)


def test_stream_protocol_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="add --stream"):
        di.run(["--tiny", "--outer-periods", "1,8,64", "--out", str(tmp_path)], corpora=fake_corpora())
    with pytest.raises(SystemExit):
        di.parser().parse_args(["--tiny", "--stream", "--outer-periods", "1,0"])
    assert "--outer-periods takes ints >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stream configuration.*'titans'"):
        di.run(["--tiny", "--stream", "--models", "titans", "--out", str(tmp_path)], corpora=fake_corpora())
    with pytest.raises(ValueError, match="sequential strategy only.*'replay'"):
        di.run(["--tiny", "--stream", "--strategies", "replay", "--out", str(tmp_path)], corpora=fake_corpora())
