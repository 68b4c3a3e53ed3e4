"""Class-incremental benchmark: class grouping, example builder, bad configurations, local-file and HF paths."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` is a folder of scripts at the repo root

from experiments.continual import class_incremental as ci  # noqa: E402
from hope.data.corpora import Document  # noqa: E402
from hope.eval import IGNORE_INDEX  # noqa: E402

CLASSES = ("red", "green", "blue", "gold")


def fake_docs(per_class: int = 24, chars: int = 120) -> list[Document]:
    """Each class writes with its own letters, so a byte model can tell the classes apart."""
    docs = []
    for k, label in enumerate(CLASSES):
        rng = random.Random(k)
        letters = "abcdefghijklmnopqrstuvwxyz"[5 * k : 5 * k + 6] + " "
        docs += [Document("text", f"{label}-{i}", "".join(rng.choice(letters) for _ in range(chars)), label)
                 for i in range(per_class)]
    return docs


def test_group_classes_deterministic():
    a = ci.group_classes(list(CLASSES) * 3, 2, seed=0)
    assert a == ci.group_classes(list(CLASSES), 2, seed=0)
    assert sorted(c for g in a for c in g) == sorted(CLASSES) and [len(g) for g in a] == [2, 2]
    assert ci.group_classes(CLASSES, 3, seed=0)[1].__len__() == 1
    with pytest.raises(ValueError, match="classes_per_task.*0"):
        ci.group_classes(CLASSES, 0, seed=0)


def test_build_tasks_examples_and_labels():
    groups = [["red", "green"], ["blue", "gold"]]
    tasks, cand = ci.build_tasks(fake_docs(), groups, seq_len=32, max_per_class=10, eval_per_class=3, seed=0)
    again, _ = ci.build_tasks(fake_docs(), groups, seq_len=32, max_per_class=10, eval_per_class=3, seed=0)
    assert torch.equal(cand, torch.tensor([252, 253, 254, 255]))
    assert [t.name for t in tasks] == ["t0", "t1"]
    for t, u in zip(tasks, again):
        assert torch.equal(t.train_inputs, u.train_inputs) and torch.equal(t.eval_targets, u.eval_targets)
    t0 = tasks[0]
    assert t0.train_inputs.shape == (20, 32) and t0.eval_inputs.shape == (6, 32)
    assert (t0.train_inputs[:, -1] == ci.SEP).all()
    assert (t0.train_targets[:, :-1] == IGNORE_INDEX).all()
    assert set(t0.train_targets[:, -1].tolist()) == {252, 253}
    # held-out examples are not training examples
    train_rows = {tuple(r.tolist()) for r in t0.train_inputs}
    assert not any(tuple(r.tolist()) in train_rows for r in t0.eval_inputs)


@pytest.mark.parametrize(
    "groups, match",
    [
        ([], "at least one task"),
        ([["red"], []], "task 1 has no classes"),
        ([["red", "green"], ["green", "blue"]], "'green' is in task 0 and task 1"),
        ([["red", "purple"]], "'purple' has no train text"),
    ],
)
def test_build_tasks_rejects_bad_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        ci.build_tasks(fake_docs(), groups, seq_len=32, max_per_class=4, eval_per_class=2, seed=0)


def test_build_tasks_rejects_too_many_classes_and_long_sequences():
    with pytest.raises(ValueError, match="4 classes do not fit a vocabulary of 5"):
        ci.build_tasks(fake_docs(), [list(CLASSES)], 32, 4, 2, seed=0, vocab_size=5)
    from experiments.common.data import check_fits
    from experiments.common.models import build_model

    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        check_fits(build_model("transformer", "tiny", max_seq_len=16).model, ci.MODES["tiny"]["seq_len"])


def test_tiny_mode_from_local_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d.text, "label": d.label}) for d in fake_docs()) + "\n")
    ci.run(["--tiny", "--models", "transformer", "--strategies", "sequential,replay", "--sources",
            f"file:{path}", "--out", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out" / "class_incremental.json").read_text())
    res = doc["sources"][f"file:{path}"]
    assert sorted(c for g in res["groups"] for c in g) == sorted(CLASSES)
    for run in res["models"]["transformer"]["strategies"].values():
        R = run["R"]
        assert len(R) == 2 and all(0.0 <= v <= 1.0 for row in R for v in row)
        assert run["metrics"]["higher_is_better"] is True
    png = tmp_path / "out" / "class_incremental.png"
    assert png.exists() and doc["meta"]["command"]
    png.unlink()
    assert ci.run(["--replot", str(tmp_path / "out" / "class_incremental.json")])["table"] == doc["table"]
    assert png.stat().st_size > 1000  # redrawn from the JSON alone


def test_file_source_needs_labels(tmp_path):
    path = tmp_path / "nolabel.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="label"):
        ci.labelled_documents(f"file:{path}")
    with pytest.raises(ValueError, match="'hf:imagenet'"):
        ci.labelled_documents("hf:imagenet")


def test_hf_path_with_local_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["book a flight", "what is my balance", "cancel it"], "intent": [0, 1, 2]}
    local = datasets.Dataset.from_dict(
        rows, features=datasets.Features({"text": datasets.Value("string"),
                                          "intent": datasets.ClassLabel(names=["book_flight", "balance", "oos"])}))
    calls = []

    def fake_load(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = ci.labelled_documents("hf:clinc150")
    assert calls == [("clinc_oos", "plus", "train")]
    assert [(d.text, d.label) for d in docs] == [("book a flight", "book_flight"), ("what is my balance", "balance")]


def tiny_checkpoint(path: Path, name: str) -> None:
    """A train.py-style checkpoint of a tiny `name` model (random weights)."""
    from hope.training.module import LMModule

    torch.manual_seed(3)
    module = LMModule(preset=name, size="tiny")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "hydra_config": {"data": {"tokenizer": "bytes"}}}, path)


def test_backbone_and_joint_upper_bound(tmp_path):
    from experiments.common.train import evaluate
    from hope.training.inference import load_checkpoint

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    tiny_checkpoint(ckpt, "transformer")
    docs = fake_docs()
    doc = ci.run(["--tiny", "--models", "transformer", "--strategies", "joint,sequential", "--backbone",
                  f"transformer={ckpt}", "--out", str(tmp_path / "out")], sources={"colours": docs})
    res = doc["sources"]["colours"]
    entry = res["models"]["transformer"]
    assert res["chance"] == 1 / len(CLASSES) and entry["backbone"] == str(ckpt)
    joint, seq = entry["strategies"]["joint"], entry["strategies"]["sequential"]
    assert joint["steps"] == 2 * ci.MODES["tiny"]["steps"] and len(joint["accuracy"]) == 2
    assert joint["average_accuracy"] == pytest.approx(sum(joint["accuracy"]) / 2)
    assert entry["informative"] == (joint["average_accuracy"] >= 2 * res["chance"])
    assert all(len(u["load_average"]) == 2 for u in (joint, seq))  # the machine's load, start and end
    # the sequential run starts from the checkpoint: its untrained scores are the checkpoint's
    tasks, cand = ci.build_tasks(docs, res["groups"], ci.MODES["tiny"]["seq_len"], ci.MODES["tiny"]["max_per_class"],
                                 ci.MODES["tiny"]["eval_per_class"], 0)
    model = load_checkpoint(ckpt)[0].model
    assert seq["baseline"] == [evaluate(model, t.eval_inputs, t.eval_targets, candidates=cand) for t in tasks]
    assert "| run | joint (upper bound," in doc["table"] and "| run | sequential |" in doc["table"]


def test_bad_backbones_and_strategies_are_refused(tmp_path):
    ckpt = tmp_path / "hope.ckpt"
    tiny_checkpoint(ckpt, "hope")
    sources = {"colours": fake_docs(per_class=4)}
    with pytest.raises(ValueError, match=r"--backbone transformer=.*holds a hope model \(core 'self_modifying'"):
        ci.run(["--tiny", "--models", "transformer", "--backbone", f"transformer={ckpt}", "--out",
                str(tmp_path)], sources=sources)
    with pytest.raises(ValueError, match="NAME one of the --models \\['transformer'\\], got 'hope=x'"):
        ci.run(["--tiny", "--models", "transformer", "--backbone", "hope=x"], sources=sources)
    with pytest.raises(FileNotFoundError, match="checkpoint 'missing.ckpt' does not exist"):
        ci.run(["--tiny", "--models", "transformer", "--backbone", "transformer=missing.ckpt"], sources=sources)
    with pytest.raises(ValueError, match="--strategies must list names from .*got 'joint,gem'"):
        ci.run(["--tiny", "--models", "transformer", "--strategies", "joint,gem"], sources=sources)
