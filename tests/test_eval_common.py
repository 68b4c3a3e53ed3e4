"""Shared benchmark helpers: model building, the multi-task loop, result files (B batch, T time, V vocabulary)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` is a folder of scripts at the repo root

from experiments.common import models as common_models  # noqa: E402
from experiments.common.results import (  # noqa: E402
    line_styles,
    markdown_table,
    plot_lines,
    plot_matrices,
    write_result,
)
from experiments.common.train import Task, TrainConfig, evaluate, train_on_tasks  # noqa: E402

V, T = 13, 8


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)

    def forward(self, ids, state=None):
        return SimpleNamespace(logits=self.head(self.embed(ids)))  # [B, T, V]


def _task(name: str, token: int, n: int = 16) -> Task:
    """A task whose every next token is `token`: easy to learn, easy to forget."""
    x = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(token))
    y = torch.full((n, T), token)
    return Task(name, x, y, x[:4], y[:4])


def test_train_on_tasks_fills_matrix_and_forgets():
    tasks = [_task("a", 1), _task("b", 2)]
    cfg = TrainConfig(steps_per_task=30, batch_size=4, lr=0.05, weight_decay=0.0)
    out = train_on_tasks(TinyLM(), tasks, cfg, log=lambda _: None)
    R = out["R"]
    assert len(R) == 2 and all(len(r) == 2 for r in R) and len(out["baseline"]) == 2
    assert R[0][0] < out["baseline"][0] - 1.0  # task a learned
    assert R[1][0] > R[0][0] + 1.0  # and forgotten after b (sequential fine-tuning)
    again = train_on_tasks(TinyLM(), tasks, cfg, log=lambda _: None)
    assert again["R"] == R  # deterministic by seed


def test_replay_and_ewc_reduce_forgetting_and_share_first_task():
    tasks = [_task("a", 1), _task("b", 2)]
    res = {}
    for strategy in ("sequential", "replay", "ewc"):
        # lr 0.02: task a is learned without saturating; a loss of exactly 0 (float32 softmax of 1.0, as lr 0.05
        # gives on some CPUs) has zero gradients, so a zero Fisher and an EWC that cannot act
        cfg = TrainConfig(steps_per_task=30, batch_size=4, lr=0.02, weight_decay=0.0, strategy=strategy,
                          replay_batch=4, ewc_strength=500.0)
        res[strategy] = train_on_tasks(TinyLM(), tasks, cfg, log=lambda _: None)["R"]
    assert 0 < res["sequential"][0][0] < 1.0  # task a learned, not saturated
    assert res["replay"][0] == res["sequential"][0] == res["ewc"][0]  # first task trained identically
    assert res["replay"][1][0] < res["sequential"][1][0]
    assert res["ewc"][1][0] < res["sequential"][1][0]


def test_evaluate_accuracy_over_candidates():
    model = TinyLM()
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.weight.zero_()
        model.head.bias[5] = 10.0  # always predicts 5, but 5 is not a candidate
        model.head.bias[3] = 1.0
    x = torch.zeros(2, T, dtype=torch.long)
    y = torch.full((2, T), -100)
    y[:, -1] = torch.tensor([3, 4])
    assert evaluate(model, x, y, candidates=torch.tensor([3, 4])) == 0.5


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="'greedy'"):
        TrainConfig(strategy="greedy")
    with pytest.raises(ValueError, match="steps_per_task"):
        TrainConfig(steps_per_task=0)
    with pytest.raises(ValueError, match="none"):
        train_on_tasks(TinyLM(), [], TrainConfig())
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        Task("x", torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(1, 4), torch.zeros(1, 4))


def test_build_model_names_and_unavailable(monkeypatch):
    with pytest.raises(ValueError, match="'gpt'"):
        common_models.build_model("gpt")
    built = common_models.build_model("transformer", "tiny", vocab_size=V)
    assert built.params == common_models.count_params(built.model) > 0

    import hope

    def broken(cfg):
        raise ImportError("no module named hope.layers.titans")

    monkeypatch.setattr(hope, "HopeLM", broken)
    with pytest.raises(common_models.ModelUnavailable, match="titans"):
        common_models.build_model("titans")
    with pytest.raises(common_models.ModelUnavailable, match="none of the models"):
        common_models.build_models(["titans"])


def test_write_result_and_plots(tmp_path):
    path = write_result("demo", {"x": float("nan"), "t": torch.tensor([1.5, 2.0])}, tmp_path)
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "demo" and doc["x"] is None and doc["t"] == [1.5, 2.0]
    assert {"date", "command", "machine"} <= set(doc["meta"]) and doc["meta"]["machine"]["cpu_count"] >= 1
    if Path("/proc/cpuinfo").is_file():  # Linux: the CPU is named, since timings from two CPUs do not compare
        assert doc["meta"]["machine"]["cpu_model"]
    png = plot_lines(tmp_path / "a.png", {"m": ([1, 2], [0.5, None])}, "t", "x", "y")
    png2 = plot_matrices(tmp_path / "b.png", {"m": [[1.0, 2.0], [3.0, 4.0]]}, ["a", "b"], "t")
    assert png.read_bytes()[:4] == b"\x89PNG" and png2.stat().st_size > 1000
    table = markdown_table(["a", "b"], [["x", 0.12345], ["y", None]])
    assert table.splitlines()[2] == "| x | 0.123 |" and "–" in table


def test_line_styles_colour_by_group_dash_by_variant(tmp_path):
    labels = [f"{m} / {s}" for m in ("HOPE", "Titans") for s in ("sequential", "replay", "ewc")]
    st = line_styles(labels)
    assert st["HOPE / replay"]["color"] == st["HOPE / ewc"]["color"] != st["Titans / replay"]["color"]
    assert st["HOPE / replay"]["linestyle"] == st["Titans / replay"]["linestyle"] != st["HOPE / ewc"]["linestyle"]
    assert line_styles(["a", "b"]) == {"a": {}, "b": {}}  # plain labels keep matplotlib's cycle
    assert line_styles(["A / x", "B / x"]) == {"A / x": {}, "B / x": {}}  # one variant: nothing to tell apart
    series = {label: ([1, 2], [0.1 * k, 0.2]) for k, label in enumerate(labels)}
    wide = plot_lines(tmp_path / "c.png", {**series, "extra": ([1], [0.0])}, "t", "x", "y")  # 7 lines: legend beside
    assert wide.stat().st_size > 1000


def test_partial_results_round_trip_and_refuse_another_config(tmp_path, capsys):
    from experiments.common.results import Partial

    p = Partial("demo", tmp_path, {"steps": 3, "lr": 0.1})
    assert p.get("a") is None
    assert p.put("a", {"R": torch.tensor([[1.0, 2.0]])}) == {"R": [[1.0, 2.0]]}  # stored as plain JSON
    assert Partial("demo", tmp_path, {"steps": 3, "lr": 0.1}, resume=True).get("a") == {"R": [[1.0, 2.0]]}
    with pytest.raises(ValueError, match=r"'steps': \(3, 4\)"):
        Partial("demo", tmp_path, {"steps": 4, "lr": 0.1}, resume=True)
    fresh = Partial("demo", tmp_path, {"steps": 4, "lr": 0.1})  # without --resume: start afresh, and say so
    assert fresh.get("a") is None and "--resume" in capsys.readouterr().out
    fresh.finish()
    assert not (tmp_path / "demo.partial.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_nan_loss_stops_training_before_the_update(monkeypatch):
    from experiments.common import train as common_train

    real, calls = common_train.lm_loss, []

    def nan_on_third(model, x, y, window=None):
        calls.append(1)
        loss = real(model, x, y, window)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(common_train, "lm_loss", nan_on_third)
    model = TinyLM()
    with pytest.raises(common_train.Diverged, match=r"loss nan at step 3 of task 'a'; the step before it had \d"):
        train_on_tasks(model, [_task("a", 1)], TrainConfig(steps_per_task=5, batch_size=4), log=lambda _: None)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step never reached the weights
