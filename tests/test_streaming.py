"""Streamed corpora (hope/data/streaming.py) and the tokenizer trainer, offline on local .jsonl files read through
the same `datasets` streaming path as a Hub dataset: packing, held-out documents, sharding over ranks and
workers, exact mid-stream resume with 2 workers, and the one-line errors.

Dimension legend: B batch, T sequence length, W world size, K dataloader workers.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_two_ranks

pytest.importorskip("datasets")

from hope.data.datamodule import DOC_SEPARATOR, DataConfig, LMDataModule  # noqa: E402
from hope.data.streaming import PackedStream, StreamExhausted, StreamSource  # noqa: E402
from hope.data.tokenizers import ByteTokenizer, build_tokenizer  # noqa: E402
from hope.data.train_tokenizer import main as train_tokenizer_main  # noqa: E402

N_FILES, PER_FILE = 4, 24


def _text(f: int, i: int) -> str:
    return f"<{f}-{i:02d}> " + " ".join(["night", "king", "über", "日本"][(f + i + k) % 4] for k in range(i % 9 + 1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """4 .jsonl files (4 shards) of 24 records each, every text unique and tagged <file-record>."""
    root = tmp_path_factory.mktemp("stream_corpus")
    files = []
    for f in range(N_FILES):
        path = root / f"part{f}.jsonl"
        path.write_text("".join(json.dumps({"text": _text(f, i), "id": i}) + "\n" for i in range(PER_FILE)))
        files.append(str(path))
    return files


def _config(files: list[str], tmp_path: Path, **kw) -> DataConfig:
    args = dict(source="hf_stream", hf_name="json", hf_data_files=files, seq_len=16, batch_size=3, num_workers=2,
                val_docs=3, test_docs=2, max_val_tokens=64, cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**args, **kw})


def _tags(tokens: torch.Tensor) -> list[str]:
    return re.findall(r"<\d-\d\d>", bytes(tokens.tolist()).decode("utf-8", errors="replace"))


def _until_exhausted(loader) -> list[dict[str, torch.Tensor]]:
    """Every batch of a loader whose stream ends, checking that the end is the one-line error, not a new pass."""
    batches, it = [], iter(loader)
    with pytest.raises(StreamExhausted, match="reader 0 of rank 0 reached the end of dataset 'json'"):
        while True:
            batches.append(next(it))
    return batches


def test_one_reader_packs_the_train_records_in_order(corpus, tmp_path) -> None:
    """W = K = 1: the windows, overlapping by one token, are the tokens of every record but the held-out ones,
    each followed by the separator, in file order; the val/test splits are the first records."""
    dm = LMDataModule(_config(corpus, tmp_path, num_workers=0))
    dm.prepare_data()
    heldout = [d.text for s in ("val", "test") for d in dm.documents[s]]
    assert heldout == [_text(0, i) for i in range(5)] and not dm.documents["train"]
    batches = _until_exhausted(dm.train_dataloader())  # 91 records of ~40 bytes
    stream = torch.cat([b["input_ids"].flatten() for b in batches] + [batches[-1]["labels"][-1, -1:]])
    expected = "".join(_text(f, i) + DOC_SEPARATOR for f in range(N_FILES) for i in range(PER_FILE) if f or i >= 5)
    expected = torch.tensor(list(expected.encode()))
    assert stream.numel() > 0.9 * expected.numel()  # all but the last partial batch
    assert torch.equal(stream, expected[: stream.numel()])
    for b in batches:
        assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1]) and set(b) == {"input_ids", "labels"}


def test_readers_shard_records_over_ranks_and_workers(corpus, tmp_path) -> None:
    """W = 2 ranks × K = 2 workers, 4 files: each train record is read by exactly one reader."""
    seen: dict[str, int] = {}
    for rank in range(2):
        for reader in range(2):
            ds = PackedStream(StreamSource("json", data_files=tuple(corpus)), ByteTokenizer(), 16, DOC_SEPARATOR,
                              frozenset(), rank, 2, 2)
            tokens = torch.cat([w["input_ids"] for w in ds.windows(reader)])
            for tag in set(_tags(tokens)):
                assert tag not in seen, f"{tag} read by readers {seen[tag]} and {rank * 2 + reader}"
                seen[tag] = rank * 2 + reader
    assert len(seen) >= N_FILES * PER_FILE - 4  # a reader's last partial window is dropped


def test_training_skips_heldout_texts_and_their_duplicates(corpus, tmp_path) -> None:
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"text": _text(0, 1)}) + "\n")  # a val text again, later in the stream
    dm = LMDataModule(_config([*corpus, str(dup)], tmp_path, num_workers=0))
    trained = set(_tags(torch.cat([b["input_ids"].flatten() for b in _until_exhausted(dm.train_dataloader())])))
    assert not trained & {f"<0-{i:02d}>" for i in range(5)} and "<0-05>" in trained


@pytest.mark.parametrize("resume_at", [3, 4])
def test_resume_mid_stream_with_two_workers_is_exact(corpus, tmp_path, resume_at) -> None:
    """Batches n … n+5 after resuming from the state saved after n batches are the uninterrupted run's, with the
    loader a batch ahead of the trainer (as Lightning's prefetch leaves it) and n odd or even."""
    cfg = _config(corpus, tmp_path)
    dm = LMDataModule(cfg)
    loader = iter(dm.train_dataloader())
    straight = [next(loader) for _ in range(resume_at + 6)]
    state = dm.state_dict()  # no trainer: after the delivered batches; take the one after `resume_at`
    snap = dm._train_loader.snapshot(resume_at)
    state["stream"].update(batches=resume_at, ranks=[snap["readers"]])
    assert any(o > 0 for _, o in snap["readers"])  # mid-record: a position inside a document
    resumed = LMDataModule(cfg)
    resumed.load_state_dict(state)
    resumed.set_resume_batch(resume_at)
    again = iter(resumed.train_dataloader())
    for k in range(6):
        b = next(again)
        assert torch.equal(b["input_ids"], straight[resume_at + k]["input_ids"]), f"batch {resume_at + k}"
        assert torch.equal(b["labels"], straight[resume_at + k]["labels"])


def test_resume_refuses_another_layout_or_a_missing_position(corpus, tmp_path) -> None:
    dm = LMDataModule(_config(corpus, tmp_path))
    it = iter(dm.train_dataloader())
    next(it), next(it)
    state = dm.state_dict()
    other = LMDataModule(_config(corpus, tmp_path, num_workers=1))
    other.load_state_dict(state)
    other.set_resume_batch(2)
    with pytest.raises(ValueError, match="read with num_workers=2 but this run has num_workers=1"):
        other.train_dataloader()
    bare = LMDataModule(_config(corpus, tmp_path))
    bare.set_resume_batch(2)
    with pytest.raises(ValueError, match="holds no stream position"):
        bare.train_dataloader()
    wrong = LMDataModule(_config(corpus, tmp_path))
    wrong.load_state_dict(state)
    wrong.set_resume_batch(5)
    with pytest.raises(ValueError, match="after 2 batches but training resumes after 5"):
        wrong.train_dataloader()
    with pytest.raises(ValueError, match="no stream position recorded after 7 batches"):
        dm._train_loader.snapshot(7)


def test_train_tokenizer_cli_and_bpe_file_spec(corpus, tmp_path, capsys) -> None:
    out = tmp_path / "tok" / "tokenizer.json"
    train_tokenizer_main(["--out", str(out), "--name", "json", "--data-files", *corpus, "--vocab-size", "300",
                          "--docs", "50", "--skip", "5"])
    assert "300 tokens" in capsys.readouterr().out
    tok = build_tokenizer(f"bpe:{out}")
    assert tok.vocab_size == 300
    text = _text(3, 7) + DOC_SEPARATOR
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    assert int(tok.token_bytes[ids].sum()) == len(text.encode())  # bits per byte stays exact
    dm = LMDataModule(_config(corpus, tmp_path, tokenizer=f"bpe:{out}", num_workers=0))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 16) and int(batch["input_ids"].max()) < 300


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokenizer": "bpe"}, "tokenizer='bpe' trains on an in-memory train split"),
        ({"stream": True}, "stream=True \\(truncated-BPTT rows\\) needs an in-memory source"),
        ({"hf_data_files": []}, "hf_data_files must be None or a non-empty list of paths, got \\[\\]"),
        ({"val_docs": 0}, "val_docs must be an int >= 1, got 0"),
        ({"hf_name": None}, "source='hf_stream' needs hf_name, got None"),
        ({"tokenizer": "bpe:"}, "tokenizer must be 'bytes', 'bpe', 'bpe:<tokenizer.json>'"),
    ],
)
def test_stream_config_errors(corpus, tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _config(corpus, tmp_path, **kwargs)


def test_stream_data_errors(corpus, tmp_path) -> None:
    with pytest.raises(ValueError, match="no text field 'body'; columns: \\['id', 'text'\\]"):
        LMDataModule(_config(corpus, tmp_path, text_field="body")).prepare_data()
    with pytest.raises(ValueError, match="holds 24 records, fewer than val_docs \\+ test_docs = 30"):
        LMDataModule(_config(corpus[:1], tmp_path, val_docs=20, test_docs=10)).prepare_data()
    with pytest.raises(FileNotFoundError, match="Unable to find '.*missing.jsonl'"):
        LMDataModule(_config([str(tmp_path / "missing.jsonl")], tmp_path)).prepare_data()
    with pytest.raises(ValueError, match="no file at .*nope.json.*python -m hope.data.train_tokenizer"):
        build_tokenizer(f"bpe:{tmp_path / 'nope.json'}")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        train_tokenizer_main(["--out", str(tmp_path / "t.json"), "--name", "json", "--data-files", *corpus,
                              "--vocab-size", "100"])


def test_train_py_resume_on_a_stream_is_exact(corpus, tmp_path) -> None:
    """`python train.py data=hf_stream …`: steps 5-8 resumed from the step-4 checkpoint (2 workers) have the losses of
    the uninterrupted run; the checkpoint holds the stream position."""
    from test_training import TINY, assert_resume_is_exact

    common = [*TINY, "data=hf_stream", "data.hf_name=json", f"data.hf_data_files=[{','.join(corpus)}]",
              "data.val_docs=3", "data.test_docs=2", "data.max_val_tokens=64", "logger=csv", "model.size=tiny",
              "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "data.num_workers=2",
              "callbacks.model_checkpoint.every_n_train_steps=4", "test=false", "model.warmup_steps=2",
              "model.lr_decay_steps=8"]
    stream = assert_resume_is_exact(tmp_path, common)["LMDataModule"]["stream"]
    assert stream["batches"] == 8 and stream["num_workers"] == 2 and len(stream["ranks"]) == 1


def test_ranks_starting_together_encode_a_split_once(tmp_path, monkeypatch) -> None:
    """Two data modules building the same token cache at once (as ranks that each run prepare_data): one encodes,
    the other waits for the file lock and loads the result."""
    import threading
    import time

    from hope.data import datamodule

    text = tmp_path / "a.txt"
    text.write_text("to be or not to be " * 400)
    calls, encode = [], datamodule.encode_documents

    def slow_encode(tokenizer, docs):
        calls.append(1)
        time.sleep(0.5)
        return encode(tokenizer, docs)

    monkeypatch.setattr(datamodule, "encode_documents", slow_encode)
    cfg = DataConfig(source="text", paths=[str(text)], seq_len=16, cache_dir=str(tmp_path / "cache"))
    got: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: got.append(LMDataModule(cfg).stream("train"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and torch.equal(got[0], got[1])


def _two_rank_worker(out: str, *files: str) -> None:
    """One of 2 ranks × 2 workers: 3 batches, the gathered state, 3 more; then 3 batches resumed from the state."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = _config(list(files), Path(out).parent, batch_size=2)
    dm = LMDataModule(cfg)
    batches = iter(dm.train_dataloader())
    first = [next(batches)["input_ids"] for _ in range(3)]
    state = dm.state_dict()  # collective: every rank's reader positions
    rest = [next(batches)["input_ids"] for _ in range(3)]
    resumed = LMDataModule(cfg)
    resumed.load_state_dict(state)
    resumed.set_resume_batch(3)
    again = [b["input_ids"] for b in itertools.islice(resumed.train_dataloader(), 3)]
    result = {"ranks": len(state["stream"]["ranks"]), "world_size": state["stream"]["world_size"],
              "same": all(torch.equal(a, b) for a, b in zip(rest, again)),
              "tags": sorted(set(_tags(torch.cat([b.flatten() for b in first + rest]))))}
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_read_apart_and_resume_exactly(corpus, tmp_path) -> None:
    """2 ranks (gloo) × 2 workers: the checkpoint state gathers both ranks' positions, each rank resumes exactly,
    and the ranks read different records."""
    out = tmp_path / "ranks"
    run_two_ranks(__file__, str(out), *corpus)
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    for r in results:
        assert r["ranks"] == 2 and r["world_size"] == 2 and r["same"] and r["tags"]
    assert not set(results[0]["tags"]) & set(results[1]["tags"])


if __name__ == "__main__":
    _two_rank_worker(*sys.argv[1:])
