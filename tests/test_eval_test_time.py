"""Test-time memory benchmark: stream building, state forking, windowed probe, tiny mode (L tokens per doc)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` is a folder of scripts at the repo root

from experiments.common.models import build_model  # noqa: E402
from experiments.continual import test_time as tt  # noqa: E402
from hope.data.corpora import Document  # noqa: E402


def fake_docs(n: int = 6, chars: int = 1200) -> list[Document]:
    rng = random.Random(0)
    return [Document("text", f"doc-{i}", "".join(rng.choice("abcdefgh \n") for _ in range(chars))) for i in range(n)]


def read_in_turn(model, docs):
    """Each document's loss when the documents are read one after another with the state carried."""
    state, losses = None, []
    for doc in docs:
        loss, state = tt.read(model, doc, state)
        losses.append(loss)
    return losses


@pytest.fixture(scope="module")
def model():
    return build_model("transformer", "tiny", seed=0).model.eval()


def test_build_stream_and_errors():
    docs = tt.build_stream(fake_docs(), n_docs=3, doc_len=16)
    assert docs.shape == (3, 16) and docs.dtype == torch.long
    assert torch.equal(docs, tt.build_stream(fake_docs(), n_docs=3, doc_len=16))
    with pytest.raises(ValueError, match=r"n_docs must be >= 2 .*got 1"):
        tt.build_stream(fake_docs(), n_docs=1, doc_len=16)
    with pytest.raises(ValueError, match="only 6 documents .* need n_docs=9"):
        tt.build_stream(fake_docs(), n_docs=9, doc_len=16)


def test_probes_do_not_disturb_the_stream(model):
    docs = tt.build_stream(fake_docs(), n_docs=3, doc_len=16)
    res = tt.probe_carried(model, docs)
    assert res["stream_loss"] == pytest.approx(read_in_turn(model, docs), rel=1e-6)
    assert res["distance"] == [0, 16, 32] and len(res["probe_loss"]) == 3
    assert res["memory_gain"][0] == pytest.approx(res["fresh_loss"] - res["probe_loss"][0])


def test_fork_keeps_cms_streams_intact():
    """Hope-Attention's state holds CMS fast weights built from the parameters; forking must still be exact."""
    from experiments.common.models import ModelUnavailable

    try:
        cms_model = build_model("hope_attention", "tiny", seed=0).model.eval()
    except ModelUnavailable as err:
        pytest.skip(str(err))
    docs = tt.build_stream(fake_docs(), n_docs=2, doc_len=64)  # 64 = a multiple of every CMS period of the preset
    res = tt.probe_carried(cms_model, docs)
    assert res["stream_loss"] == pytest.approx(read_in_turn(cms_model, docs), rel=1e-5)


def test_window_covering_everything_matches_carried_state(model):
    # With a window as long as the stream, the windowed probe sees exactly the carried context.
    docs = tt.build_stream(fake_docs(), n_docs=3, doc_len=16)
    carried = tt.probe_carried(model, docs)["probe_loss"]
    windowed = tt.probe_windowed(model, docs, window=48)["probe_loss"]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(carried, windowed))
    narrow = tt.probe_windowed(model, docs, window=16)["probe_loss"]
    assert narrow[0] == pytest.approx(carried[0], rel=1e-5) and narrow[2] != pytest.approx(carried[2], rel=1e-5)


def test_tiny_mode_end_to_end(tmp_path):
    tt.run(["--tiny", "--models", "transformer", "--out", str(tmp_path)], docs=fake_docs())
    doc = json.loads((tmp_path / "test_time.json").read_text())
    assert set(doc["models"]) == {"transformer", "transformer_window"}
    for res in doc["models"].values():
        assert len(res["probe_loss"]) == tt.MODES["tiny"]["n_docs"] and 0 < res["fresh_loss"] < 10
    assert doc["models"]["transformer_window"]["stream_loss"] == []
    assert (tmp_path / "test_time.png").exists() and "state carried" in doc["table"]


def test_a_diverged_model_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    from experiments.common.train import Diverged

    real = tt.train_on_tasks

    def titans_diverges(model, tasks, cfg, **kwargs):
        if type(model.blocks[0].core).__name__ == "TitansCore":
            raise Diverged("pretrain", 4, float("nan"), 3.0)
        return real(model, tasks, cfg, **kwargs)

    monkeypatch.setattr(tt, "train_on_tasks", titans_diverges)
    tt.run(["--tiny", "--models", "transformer,titans", "--out", str(tmp_path)], docs=fake_docs())
    doc = json.loads((tmp_path / "test_time.json").read_text())
    assert "step 4" in doc["models"]["titans"]["diverged"] and "probe_loss" not in doc["models"]["titans"]
    assert len(doc["models"]["transformer"]["probe_loss"]) == tt.MODES["tiny"]["n_docs"]
    assert "| Titans (state carried) |" in doc["table"] and "diverged: training loss nan" in doc["table"]


def write_checkpoint(path: Path, preset: str, source: str) -> Path:
    """A checkpoint in train.py's format (weights, hyper-parameters, resolved config) of an untrained tiny model."""
    from hope.training.module import LMModule

    torch.manual_seed(0)
    module = LMModule(preset=preset, size="tiny", vocab_size=256)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "hydra_config": {"data": {"source": source}}}, path)
    return path


def test_checkpoints_are_probed_as_they_are(tmp_path):
    specs = [f"hope_stream={write_checkpoint(tmp_path / 'h.ckpt', 'hope', 'shakespeare')}",
             f"xl={write_checkpoint(tmp_path / 'x.ckpt', 'transformer', 'shakespeare')}"]
    doc = tt.run(["--tiny", "--out", str(tmp_path), "--tag", "_ckpt", *(f"--ckpt={s}" for s in specs)],
                 docs=fake_docs())
    assert (tmp_path / "test_time_ckpt.json").is_file() and doc["corpus"] == "shakespeare"
    assert set(doc["models"]) == {"hope_stream", "xl", "xl_window"}  # attention models are also probed windowed
    assert doc["config"]["steps"] == 0 and doc["models"]["hope_stream"]["pretrain_seconds"] == 0.0
    # no training happened: the loaded model's own first-document loss is what the probe reports
    model, _ = tt.load_checkpoints([specs[0]])["hope_stream"]
    docs = tt.build_stream(tt.split_held_out(fake_docs()), tt.MODES["tiny"]["n_docs"], tt.MODES["tiny"]["doc_len"])
    assert doc["models"]["hope_stream"]["fresh_loss"] == pytest.approx(tt.read(model.eval(), docs[0], None)[0])


def test_checkpoints_of_different_corpora_need_corpus(tmp_path):
    specs = [f"a={write_checkpoint(tmp_path / 'a.ckpt', 'transformer', 'shakespeare')}",
             f"b={write_checkpoint(tmp_path / 'b.ckpt', 'transformer', 'kjv')}"]
    with pytest.raises(ValueError, match="different corpora .*--corpus"):
        tt.run(["--tiny", "--out", str(tmp_path), *(f"--ckpt={s}" for s in specs)], docs=fake_docs())
