"""`LMDataModule`: token streams of the train/val/test splits as Lightning dataloaders, exactly resumable.

Dimension legend: B batch, T sequence length (`seq_len`), N tokens in a split, W world size (ranks), r rank,
R = B·W stream rows (stream mode).

Every batch is `{"input_ids": [B, T] int64, "labels": [B, T] int64}` with `labels[:, t]` the token after
`input_ids[:, t]`; labels equal to -100 (synthetic tasks only: padding and unscored positions) are not scored, the
default `ignore_index` of `torch.nn.functional.cross_entropy`. Stream-mode train batches also hold `"stream_pos"`
(below).

    documents ──split_documents──► train / val / test ──tokenizer──► int32 streams [N] (cached on disk)
    train:    item i = stream[o_i : o_i + T + 1],  o_i ~ U{0 … N−T−1} drawn from a generator seeded by (seed, i)
    stream:   item i = row ρ = i mod R, window n = i div R:  stream[(o_ρ + n·T + j) mod N], j = 0 … T,
              o_ρ = ρ·⌊N/R⌋   (DataConfig.stream: truncated-BPTT rows, see below)
    val/test: window j = stream[j·T : j·T + T + 1],  j = 0 … ⌊(min(N, max_val_tokens) − 1) / T⌋ − 1

Resuming: a train item depends only on (seed, i) (stream mode: on (R, i)), and the train sampler yields the
global indices `start + k·W + r` (k = 0, 1, …) on rank r, so a run restarted with `set_resume_batch(n)`
(start = n·B·W, n the dataloader batches each rank consumed, i.e. optimizer steps × gradient-accumulation
batches) sees exactly the batches the uninterrupted run would have seen, on any number of workers. The sampler
is effectively infinite: train by `max_steps`. The trainer must build
`lightning.Trainer(use_distributed_sampler=False)`, otherwise Lightning wraps this sampler in a
`DistributedSampler` and the indices change.

Stream mode (`DataConfig.stream=True`, text sources only) is for truncated-BPTT training of models that carry
their state from batch to batch: each of the R = B·W batch rows (over all ranks) reads one continuing stream of
the train split, starting at o_ρ = ρ·⌊N/R⌋ (evenly spaced, so the rows read different text) and advancing T
tokens per batch; consecutive windows overlap by one token, so `labels[:, -1]` of batch n is `input_ids[:, 0]` of
batch n + 1 and no token is skipped. A row wraps from the end of the split to its start (never runs out; the
wrap joins the last and first documents without a separator). With the sampler above, batch row k on rank r is
global item n·B·W + k·W + r, i.e. always row ρ = k·W + r, and batch n is window n, so a model may keep its state
per batch row, and `set_resume_batch(n)` continues every row at window n (resume with the same B and W: R
places the rows). Stream batches also hold `"stream_pos"`, int64 `[B]`: n·T, the position of the window's first
input in its row's stream (the same for all rows of a batch), for a trainer to check that its carried state is
in step. The train split needs at least
R·(T + 1) tokens. Val/test windows are the same as in the default mode (comparable, state reset per window).

Val/test windows are dealt round-robin to the ranks (window j to rank j mod W); the union over ranks is the same
set for every W, so sum the loss and token counts over ranks (not a mean of per-rank means) before dividing.

Token streams are cached in `<cache_dir>/tokens/<source>-<split>-<key>.pt`, the key being a SHA-256 of the
split's documents, the tokenizer (name, which for BPE holds its vocabulary size and training-text fingerprint;
token byte lengths; encoding of a probe text) and the document separator.
Caches are written atomically, so concurrent ranks never read half a file, and built under a file lock
(`build_once`), so of the ranks that each run `prepare_data` at once one encodes and the others load its file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hope._checks import check as _check
from hope.data.corpora import (
    CORPORA,
    SPLITS,
    Document,
    documents_fingerprint,
    load_corpus,
    load_hf_documents,
    load_text_files,
    split_documents,
)
from hope.data.streaming import (
    SNAPSHOT_FORMAT,
    PackedStream,
    StreamingLoader,
    StreamSource,
    check_snapshot,
    read_heldout,
    text_hash,
)
from hope.data.synthetic import IGNORE_INDEX, PAD, SYNTHETIC_TASKS, make_task
from hope.data.tokenizers import ByteTokenizer, Tokenizer, build_once, build_tokenizer

SOURCES = ("default", *CORPORA, "text", "hf", "hf_stream", "synthetic")
DOC_SEPARATOR = "\n\n"
INFINITE = 1 << 40  # indices per rank the train sampler yields: more than any run consumes
_STREAM_CODES = {"train": 0, "val": 1, "test": 2}
_CACHE_FORMAT = 1
_PROBE = "The quick brown fox jumps over the lazy dog. 1234567890 — naïve café, 日本語.\n\n"


def _plain(value: Any) -> Any:
    """Plain Python containers from Hydra/OmegaConf nodes (which `DataConfig(**node)` passes through)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


@dataclass
class DataConfig:
    """What data a run reads and how it is batched. Validated on construction; errors name the value.

    Attributes:
        source: "default" (shakespeare + kjv + wikipedia), "shakespeare", "kjv", "wikipedia", "bbc", "text"
            (files in `paths`), "hf" (a Hugging Face dataset) or "synthetic" (`task`).
        paths: .txt / .jsonl files for source "text".
        text_field: text column of .jsonl records and Hugging Face datasets.
        hf_name, hf_config, hf_split, hf_streaming, hf_limit: arguments of `load_hf_documents` for source "hf"
            (the documents are then split like any corpus). Source "hf_stream" streams `hf_name` (a Hub dataset,
            or a builder such as "json" with `hf_data_files`) without holding it (`hope.data.streaming`).
        hf_data_files: local files (or globs) for a builder `hf_name` ("json", "text", "parquet"), source "hf_stream".
        val_docs, test_docs: source "hf_stream": the first `val_docs` records are the val split, the next
            `test_docs` the test split; training skips their texts.
        tokenizer: "bytes", "bpe" (trained on the train split), "bpe:<tokenizer.json>" (a file trained by
            `python -m hope.data.train_tokenizer`) or "hf:<name-or-path>"; ignored for "synthetic".
        vocab_size: BPE vocabulary size (tokenizer "bpe" only).
        seq_len: tokens per training sequence (T); each item holds T + 1 tokens.
        batch_size: sequences per batch and rank (B).
        num_workers: DataLoader worker processes.
        seed: seed of the train offsets (and of synthetic examples); the split itself never depends on it.
        max_val_tokens: cap on the tokens of the val and test streams (None: whole split).
        val_fraction, test_fraction: held-out fractions of `split_documents`.
        cache_dir: where token streams and trained tokenizers are cached.
        task, task_args: synthetic task name (a key of `hope.data.synthetic.SYNTHETIC_TASKS`) and its arguments.
        val_task_args: overrides of `task_args` for val/test (e.g. a longer `length_range` bin).
        val_examples: synthetic val (and test) examples.
        stream: train batches as continuing streams, one per batch row (truncated BPTT; see the module docstring)
            instead of windows at random offsets; text sources only, val/test unchanged.
    """

    source: str = "default"
    paths: list[str] | None = None
    text_field: str = "text"
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_streaming: bool = True
    hf_limit: int | None = None
    hf_data_files: list[str] | None = None
    val_docs: int = 500
    test_docs: int = 500
    tokenizer: str = "bytes"
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 16
    num_workers: int = 0
    seed: int = 0
    max_val_tokens: int | None = 1 << 20
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    cache_dir: str = "data_cache"
    task: str | None = None
    task_args: dict[str, Any] = field(default_factory=dict)
    val_task_args: dict[str, Any] = field(default_factory=dict)
    val_examples: int = 256
    stream: bool = False

    def __post_init__(self) -> None:
        _check(self.source in SOURCES, f"DataConfig.source must be one of {SOURCES}, got {self.source!r}")
        self.paths = None if self.paths is None else [str(p) for p in _plain(self.paths)]
        self.hf_data_files = None if self.hf_data_files is None else [str(p) for p in _plain(self.hf_data_files)]
        self.task_args, self.val_task_args = _plain(self.task_args or {}), _plain(self.val_task_args or {})
        self.cache_dir = str(self.cache_dir)
        if self.source == "text":
            _check(bool(self.paths), f"DataConfig.source='text' needs paths (.txt/.jsonl files), got {self.paths!r}")
        if self.source in ("hf", "hf_stream"):
            _check(bool(self.hf_name), f"DataConfig.source={self.source!r} needs hf_name, got {self.hf_name!r}")
        if self.source == "hf_stream":
            self._check_stream_source()
        _check(isinstance(self.stream, bool), f"DataConfig.stream must be a bool, got {self.stream!r}")
        if self.source == "synthetic":
            _check(
                not self.stream,
                "DataConfig.stream=True needs a text source (a token stream to read), got source='synthetic'",
            )
            tasks = tuple(SYNTHETIC_TASKS)
            _check(self.task in tasks, f"DataConfig.source='synthetic' needs task in {tasks}, got {self.task!r}")
        else:
            ok = self.tokenizer in ("bytes", "bpe") or (
                self.tokenizer.startswith(("hf:", "bpe:")) and len(self.tokenizer.split(":", 1)[1]) > 0
            )
            _check(ok, "DataConfig.tokenizer must be 'bytes', 'bpe', 'bpe:<tokenizer.json>' or 'hf:<name-or-path>', "
                   f"got {self.tokenizer!r}")
        if self.tokenizer == "bpe":
            _check(self.vocab_size >= 257, f"DataConfig.vocab_size must be >= 257 for BPE, got {self.vocab_size!r}")
        for name in ("seq_len", "batch_size", "val_examples", "val_docs", "test_docs"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"DataConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("num_workers", "seed"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, f"DataConfig.{name} must be an int >= 0, got {value!r}")
        ok = self.hf_limit is None or (isinstance(self.hf_limit, int) and self.hf_limit >= 1)
        _check(ok, f"DataConfig.hf_limit must be None or an int >= 1, got {self.hf_limit!r}")
        ok = self.max_val_tokens is None or (
            isinstance(self.max_val_tokens, int) and self.max_val_tokens > self.seq_len
        )
        _check(ok, f"DataConfig.max_val_tokens must be None or > seq_len={self.seq_len}, got {self.max_val_tokens!r}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _check(0.0 < value < 0.5, f"DataConfig.{name} must be in (0, 0.5), got {value!r}")

    def _check_stream_source(self) -> None:
        _check(not self.stream, "DataConfig.stream=True (truncated-BPTT rows) needs an in-memory source, got "
               "source='hf_stream'; use source='text' or 'hf' for stream rows")
        _check(self.tokenizer != "bpe", "DataConfig.tokenizer='bpe' trains on an in-memory train split, which "
               "source='hf_stream' does not hold: train a file with `python -m hope.data.train_tokenizer` and pass "
               "tokenizer='bpe:<tokenizer.json>', or use 'hf:<name>' or 'bytes'")
        files = self.hf_data_files
        ok = files is None or (len(files) > 0 and all(files))
        _check(ok, f"DataConfig.hf_data_files must be None or a non-empty list of paths, got {files!r}")


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the given values, else `torch.distributed`'s when initialised, else (0, 1)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    _check(world_size >= 1 and 0 <= rank < world_size, f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
    return rank, world_size


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of item `index` of a split: seeded by (seed, split, index) only, so it is resumable."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_CODES[split], index)))


class ResumableSampler(Sampler[int]):
    """Train indices `start + k·W + r` for k = 0, 1, …: rank r's share of one global, never-repeating stream."""

    def __init__(self, start: int = 0, rank: int | None = None, world_size: int | None = None) -> None:
        _check(isinstance(start, int) and start >= 0, f"sampler start must be an int >= 0, got {start!r}")
        self.start = start
        self.rank, self.world_size = dist_rank_world(rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(itertools.count(self.start + self.rank, self.world_size), INFINITE)

    def __len__(self) -> int:
        return INFINITE


class ShardSampler(Sampler[int]):
    """Eval indices r, r + W, r + 2W, … < n: each window on exactly one rank, in order."""

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.n = n
        self.rank, self.world_size = dist_rank_world(rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class TrainWindows(Dataset):
    """Item i: T + 1 tokens at the offset drawn by `split_rng(seed, "train", i)`, as inputs and shifted labels."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed  # tokens: [N]

    def offset(self, index: int) -> int:
        return int(split_rng(self.seed, "train", index).integers(0, self.tokens.numel() - self.seq_len))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        o = self.offset(index)
        window = self.tokens[o : o + self.seq_len + 1].long()  # [T+1]
        return {"input_ids": window[:-1], "labels": window[1:]}

    def __len__(self) -> int:
        return INFINITE


class StreamWindows(Dataset):
    """Item i: window n = i div R of stream row ρ = i mod R, tokens (o_ρ + n·T + j) mod N for j = 0 … T, as inputs
    and shifted labels, with `stream_pos` = n·T; o_ρ = ρ·⌊N/R⌋ (see the module docstring)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, rows: int) -> None:
        self.tokens, self.seq_len, self.rows = tokens, seq_len, rows  # tokens: [N]
        need = stream_tokens_needed(seq_len, rows)
        n = tokens.numel()
        if n < need:
            raise ValueError(
                f"stream mode needs a train split of at least R·(T + 1) = {rows}·{seq_len + 1} = {need} tokens "
                f"(R = batch_size × world_size rows, T = seq_len), got {n}; otherwise rows would overlap at their "
                f"start: use fewer rows, a shorter seq_len or more text"
            )
        self.spacing = n // rows  # ⌊N/R⌋

    def row_offset(self, row: int) -> int:
        """o_ρ: where row ρ's stream starts in the split."""
        return row * self.spacing

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            raise IndexError(f"stream item {index} is negative")
        row, n = index % self.rows, index // self.rows
        n_tok = self.tokens.numel()
        start = (self.row_offset(row) + n * self.seq_len) % n_tok
        if start + self.seq_len + 1 <= n_tok:
            window = self.tokens[start : start + self.seq_len + 1].long()  # [T+1]
        else:  # wraps around the end of the split
            window = self.tokens[(start + torch.arange(self.seq_len + 1)) % n_tok].long()  # [T+1]
        pos = torch.tensor(n * self.seq_len, dtype=torch.int64)  # [] → [B] when batched
        return {"input_ids": window[:-1], "labels": window[1:], "stream_pos": pos}

    def __len__(self) -> int:
        return INFINITE


def stream_tokens_needed(seq_len: int, rows: int) -> int:
    """Train tokens stream mode needs for `rows` rows of `seq_len` + 1 tokens that do not overlap at their start."""
    return rows * (seq_len + 1)


class EvalWindows(Dataset):
    """Window j: tokens j·T … j·T + T, consecutive and non-overlapping (as inputs), covering the stream."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len  # tokens: [N]

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        window = self.tokens[index * self.seq_len : (index + 1) * self.seq_len + 1].long()  # [T+1]
        return {"input_ids": window[:-1], "labels": window[1:]}


class SyntheticWindows(Dataset):
    """Synthetic examples padded to T: item i from `split_rng(seed, split, i)` (train), or a fixed table."""

    def __init__(self, task: str, args: dict[str, Any], seq_len: int, seed: int, size: int | None = None) -> None:
        self.task, self.args, self.seq_len, self.seed = task, args, seq_len, seed
        self.table = None if size is None else self._make(size, seed)  # ([n, T], [n, T])

    def _make(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = make_task(self.task, n, seed=seed, max_len=self.seq_len, **self.args)
        pad = self.seq_len - batch.inputs.shape[1]
        inputs = torch.nn.functional.pad(batch.inputs, (0, pad), value=PAD)  # [n, T]
        labels = torch.nn.functional.pad(batch.targets, (0, pad), value=IGNORE_INDEX)  # [n, T]
        return inputs, labels

    def __len__(self) -> int:
        return INFINITE if self.table is None else self.table[0].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.table is not None:
            return {"input_ids": self.table[0][index], "labels": self.table[1][index]}
        seed = int(split_rng(self.seed, "train", index).integers(0, 1 << 31))
        inputs, labels = self._make(1, seed)
        return {"input_ids": inputs[0], "labels": labels[0]}


class SyntheticTokenizer:
    """Tokenizer protocol for synthetic tasks: ids written as space-separated integers, one "byte" per token."""

    def __init__(self, task: str, vocab_size: int) -> None:
        self.name, self.vocab_size = f"synthetic:{task}", vocab_size

    @property
    def token_bytes(self) -> torch.Tensor:
        return torch.ones(self.vocab_size, dtype=torch.int64)  # [V]

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def encode_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> torch.Tensor:
    """One int32 stream `[N]`: the documents' tokens joined by the tokens of `DOC_SEPARATOR`."""
    if isinstance(tokenizer, ByteTokenizer):  # bytes are context-free: encode the joined text at once
        return tokenizer.encode_to_tensor(DOC_SEPARATOR.join(d.text for d in docs))
    texts = [d.text for d in docs]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    pieces = encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts]
    sep = np.asarray(tokenizer.encode(DOC_SEPARATOR), dtype=np.int32)
    arrays = [a for k, piece in enumerate(pieces) for a in ((sep,) if k else ()) + (np.asarray(piece, np.int32),)]
    return torch.from_numpy(np.concatenate(arrays))  # [N]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """SHA-256 of a tokenizer's name, token byte lengths and encoding of a probe text: a tokenizer that changes
    behind the same name (a local Hugging Face directory rewritten) gets a new cache key."""
    h = hashlib.sha256(tokenizer.name.encode())
    h.update(tokenizer.token_bytes.numpy().tobytes())
    h.update(json.dumps(tokenizer.encode(_PROBE)).encode())
    return h.hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LMDataModule(L.LightningDataModule):
    """Train/val/test dataloaders of a `DataConfig` (see the module docstring for the sampling contract).

    Build the model from `vocab_size` (builds the tokenizer only; "bpe" trains on the train split once and
    caches it) and call `setup()` before reading `split_tokens` / `split_bytes`. On resume, call
    `set_resume_batch(n)` before `train_dataloader()`.
    """

    def __init__(self, config: DataConfig) -> None:
        super().__init__()
        if not isinstance(config, DataConfig):
            raise TypeError(f"LMDataModule takes a DataConfig, got {type(config).__name__}")
        self.config = config
        self.split_tokens: dict[str, int] = {}
        self.split_bytes: dict[str, int] = {}
        self._documents: dict[str, list[Document]] | None = None
        self._tokenizer: Tokenizer | None = None
        self._streams: dict[str, torch.Tensor] = {}
        self._resume_batch = 0
        self._train_loader: StreamingLoader | None = None
        self._stream_snapshot: dict[str, Any] | None = None

    @property
    def documents(self) -> dict[str, list[Document]]:
        """The split documents (loaded on first use; empty for synthetic tasks)."""
        if self._documents is None:
            c = self.config
            if c.source == "synthetic":
                self._documents = {s: [] for s in SPLITS}
            else:
                if c.source == "text":
                    docs = load_text_files(c.paths, c.text_field)
                elif c.source == "hf_stream":
                    self._documents = read_heldout(self.stream_source, c.val_docs, c.test_docs)
                    return self._documents
                elif c.source == "hf":
                    docs = load_hf_documents(
                        c.hf_name, c.hf_config, c.hf_split, c.text_field, c.hf_streaming, c.hf_limit
                    )
                else:
                    docs = load_corpus(c.source)
                self._documents = split_documents(docs, c.val_fraction, c.test_fraction)
        return self._documents

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            c = self.config
            if c.source == "synthetic":
                probe = make_task(c.task, 1, seed=0, **c.task_args)
                self._tokenizer = SyntheticTokenizer(c.task, probe.vocab_size)
            else:
                train_text = [d.text for d in self.documents["train"]] if c.tokenizer == "bpe" else None
                cache = Path(c.cache_dir) / "tokenizers"
                self._tokenizer = build_tokenizer(c.tokenizer, train_text, c.vocab_size, cache)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def token_bytes(self) -> torch.Tensor:
        return self.tokenizer.token_bytes  # [V]

    def stream(self, split: str) -> torch.Tensor:
        """The int32 token stream `[N]` of a text split, from the cache or freshly encoded (then cached)."""
        if split not in self._streams:
            docs = self.documents[split]
            if not docs:
                raise ValueError(f"the {split} split of source {self.config.source!r} holds no documents")
            key = [_CACHE_FORMAT, documents_fingerprint(docs), tokenizer_fingerprint(self.tokenizer), DOC_SEPARATOR]
            digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
            path = Path(self.config.cache_dir) / "tokens" / f"{self.config.source}-{split}-{digest}.pt"
            with build_once(path):  # ranks that start together: one encodes, the others wait and load
                if path.is_file():
                    cached = torch.load(path, weights_only=True)
                else:
                    n_bytes = sum(len(d.text.encode()) for d in docs) + len(DOC_SEPARATOR.encode()) * (len(docs) - 1)
                    cached = {"tokens": encode_documents(self.tokenizer, docs), "n_bytes": n_bytes}
                    _atomic_save(cached, path)
            self._streams[split] = cached["tokens"]
            self.split_bytes[split] = int(cached["n_bytes"])
            self.split_tokens[split] = cached["tokens"].numel()
        return self._streams[split]

    @property
    def stream_source(self) -> StreamSource:
        c = self.config
        files = None if c.hf_data_files is None else tuple(c.hf_data_files)
        return StreamSource(c.hf_name, c.hf_config, c.hf_split, files, c.text_field)

    def _text_splits(self) -> tuple[str, ...]:
        """The splits held as token streams: all, but only val and test for a streamed corpus."""
        return SPLITS[1:] if self.config.source == "hf_stream" else SPLITS

    def prepare_data(self) -> None:
        """Rank 0 only (Lightning): train the tokenizer and write the token caches, so the ranks just load."""
        if self.config.source != "synthetic":
            for split in self._text_splits():
                self.stream(split)

    def setup(self, stage: str | None = None) -> None:
        """Load the streams and check that each split holds at least one sequence of `seq_len + 1` tokens (and, in
        stream mode, the train split R·(seq_len + 1) tokens, R = batch_size × world_size)."""
        c = self.config
        if c.source == "synthetic":
            return
        need = c.seq_len + 1
        for split in self._text_splits():
            n = self.stream(split).numel()
            if n < need:
                raise ValueError(
                    f"the {split} split of source {c.source!r} has {n} tokens, fewer than "
                    f"seq_len + 1 = {need}; use a shorter seq_len or more text"
                )
        if c.stream:
            _, world_size = dist_rank_world()
            rows = c.batch_size * world_size
            n, need = self.stream("train").numel(), stream_tokens_needed(c.seq_len, rows)
            if n < need:
                raise ValueError(
                    f"stream mode needs a train split of at least R·(seq_len + 1) = {rows}·{c.seq_len + 1} = {need} "
                    f"tokens (R = batch_size {c.batch_size} × world_size {world_size} rows), but the train split of "
                    f"source {c.source!r} has {n}; otherwise rows would overlap at their start: use a smaller "
                    f"batch_size, a shorter seq_len or more text"
                )

    def set_resume_batch(self, n_batches_consumed: int) -> None:
        """Resume the train stream after `n_batches_consumed` batches per rank; call before `train_dataloader()`."""
        ok = isinstance(n_batches_consumed, int) and n_batches_consumed >= 0
        _check(ok, f"n_batches_consumed must be an int >= 0, got {n_batches_consumed!r}")
        self._resume_batch = n_batches_consumed

    def _loader(self, dataset: Dataset, sampler: Sampler[int]) -> DataLoader:
        c = self.config
        return DataLoader(
            dataset,
            batch_size=c.batch_size,
            sampler=sampler,
            num_workers=c.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=c.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader | StreamingLoader:
        c = self.config
        _, world_size = dist_rank_world()
        if c.source == "hf_stream":
            return self._streaming_loader()
        if c.source == "synthetic":
            dataset: Dataset = SyntheticWindows(c.task, c.task_args, c.seq_len, c.seed)
        else:
            self.setup("fit")
            if c.stream:
                dataset = StreamWindows(self.stream("train"), c.seq_len, c.batch_size * world_size)
            else:
                dataset = TrainWindows(self.stream("train"), c.seq_len, c.seed)
        sampler = ResumableSampler(start=self._resume_batch * c.batch_size * world_size)
        return self._loader(dataset, sampler)

    def _stream_layout(self) -> dict[str, Any]:
        c = self.config
        _, world_size = dist_rank_world()
        return {"world_size": world_size, "num_workers": c.num_workers, "batch_size": c.batch_size,
                "seq_len": c.seq_len, "source": repr(self.stream_source), "tokenizer": self.tokenizer.name}

    def _streaming_loader(self) -> StreamingLoader:
        """The train batches of source "hf_stream", from the restored stream position when resuming."""
        c = self.config
        rank, world_size = dist_rank_world()
        self.setup("fit")
        start = None
        if self._resume_batch:
            if self._stream_snapshot is None:
                raise ValueError(f"resuming a streamed run after {self._resume_batch} batches, but the checkpoint "
                                 "holds no stream position (LMDataModule.state_dict): not written by a streamed run")
            check_snapshot(self._stream_snapshot, self._stream_layout())
            saved = self._stream_snapshot["batches"]
            if saved != self._resume_batch:
                raise ValueError(f"the checkpoint's stream position is after {saved} batches but training resumes "
                                 f"after {self._resume_batch}")
            start = {"batches": saved, "readers": self._stream_snapshot["ranks"][rank]}
        skip = frozenset(text_hash(d.text) for s in ("val", "test") for d in self.documents[s])
        dataset = PackedStream(self.stream_source, self.tokenizer, c.seq_len, DOC_SEPARATOR, skip, rank, world_size,
                               max(1, c.num_workers))
        self._train_loader = StreamingLoader(dataset, c.batch_size, c.num_workers, start)
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """Source "hf_stream": every rank's reader positions after the batches the trainer has consumed (called on
        every rank when a checkpoint is written; gathers over ranks). Other sources: empty (they resume from the
        step count alone)."""
        if self.config.source != "hf_stream":
            return {}
        trainer = self.trainer
        batches = None
        if trainer is not None:
            batches = int(trainer.global_step) * int(trainer.accumulate_grad_batches)
        if self._train_loader is not None:
            mine = self._train_loader.snapshot(batches)
        elif self._stream_snapshot is not None:  # not yet iterating since the restore: still at the saved position
            rank, _ = dist_rank_world()
            mine = {"batches": self._stream_snapshot["batches"], "readers": self._stream_snapshot["ranks"][rank]}
        else:
            mine = {"batches": 0, "readers": [[0, 0]] * max(1, self.config.num_workers)}
        ranks = [mine["readers"]]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine["readers"])
        layout = self._stream_layout()
        return {"stream": {"format": SNAPSHOT_FORMAT, "batches": mine["batches"], "ranks": ranks, **layout}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream_snapshot = state_dict.get("stream")

    def _eval_dataset(self, split: str) -> Dataset:
        c = self.config
        if c.source == "synthetic":
            seed = int(split_rng(c.seed, split, 0).integers(0, 1 << 31))
            return SyntheticWindows(c.task, {**c.task_args, **c.val_task_args}, c.seq_len, seed, c.val_examples)
        self.setup("validate")
        tokens = self.stream(split)
        return EvalWindows(tokens if c.max_val_tokens is None else tokens[: c.max_val_tokens], c.seq_len)

    def val_dataloader(self) -> DataLoader:
        dataset = self._eval_dataset("val")
        return self._loader(dataset, ShardSampler(len(dataset)))

    def test_dataloader(self) -> DataLoader:
        dataset = self._eval_dataset("test")
        return self._loader(dataset, ShardSampler(len(dataset)))
