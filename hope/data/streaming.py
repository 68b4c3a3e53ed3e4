"""Streamed corpora: documents read, tokenised and packed into windows on the fly, never held in memory.

Dimension legend: B batch, T sequence length (`seq_len`), W world size (ranks), K dataloader workers per rank,
G = W·K readers, g = r·K + k the reader of local reader k on rank r.

    Hugging Face dataset (Hub name, or "json"/"text"/"parquet" with local data_files), streaming=True
      ├─ the first val_docs + test_docs records ─► val / test documents (in memory, small; `read_heldout`)
      └─ reader g = split_dataset_by_node(stream, rank=g, world_size=G):  records g, g+G, … (or whole shards)
           record text ─tokenizer─► ids + ids("\\n\\n") ─► one packed stream per reader
           window m = stream[m·T : m·T + T + 1]   (stride T: every token is a label once)

A reader drops the records whose text is one of the held-out documents' (SHA-256 of the text), so no val or test
text, nor a duplicate of one, is trained on, whatever the sharding. Each rank's dataloader runs K readers, one per
worker; a DataLoader deals whole batches from its workers in turn, so rank batch n is a batch of local reader
n mod K. Every window carries its reader's position after it, (record d, token offset o): the next window starts
at token o of record d of the reader's stream (counting records the reader drops). `StreamingLoader` strips the
positions from the batches and keeps them per delivered batch, so `snapshot(n)` gives the exact position after n
batches even though the trainer fetches a batch ahead. A run resumed from a snapshot skips the first d records of
each reader without tokenising them, re-tokenises record d, drops its first o tokens and continues: the batches
are exactly those of the uninterrupted run (`tests/test_streaming.py`). Resume with the same W, K, B and T
(a snapshot records them and refuses others).

Sharding: with `num_shards % G == 0` (files of a Hub dataset, say) each reader reads whole shards; otherwise
`datasets` gives each reader every G-th record and every reader reads the whole stream (G times the I/O: choose
W·K to divide the number of shards; a warning says so). Documents are read in the dataset's order, unshuffled,
once: a reader that reaches the end of its share raises `StreamExhausted` rather than start a second pass.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hope.data.corpora import Document

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
_READ_BATCH = 64  # records per `datasets` read: tokenised together


@dataclass(frozen=True)
class StreamSource:
    """Where the records come from: `datasets.load_dataset(name, config, split=split, data_files=data_files,
    streaming=True)`, text in column `text_field`. Local files use the builder's name ("json", "text",
    "parquet") with `data_files`."""

    name: str
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] | None = None
    text_field: str = "text"

    def open(self):
        """The dataset as a `datasets.IterableDataset` (nothing is downloaded until it is iterated)."""
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"streamed corpora need `datasets`: pip install datasets ({err})") from err
        files = None if self.data_files is None else list(self.data_files)
        return datasets.load_dataset(self.name, self.config, split=self.split, data_files=files, streaming=True)

    def texts(self, records: dict[str, list[Any]]) -> list[str]:
        """The text column of a batch of records; a missing column is a one-line error naming the columns."""
        if self.text_field not in records:
            raise ValueError(f"dataset {self.name!r} has no text field {self.text_field!r}; columns: {sorted(records)}")
        return [t if isinstance(t, str) else "" for t in records[self.text_field]]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_heldout(source: StreamSource, val_docs: int, test_docs: int) -> dict[str, list[Document]]:
    """The first `val_docs` records of the stream as val documents and the next `test_docs` as test documents
    (one process, the dataset's order); the train readers skip their texts."""
    n = val_docs + test_docs
    docs: list[Document] = []
    for batch in source.open().iter(batch_size=min(n, _READ_BATCH)):
        for text in source.texts(batch):
            docs.append(Document(f"hf:{source.name}", f"{source.name}/{source.split}/{len(docs)}", text))
        if len(docs) >= n:
            break
    if len(docs) < n:
        raise ValueError(
            f"dataset {source.name!r} holds {len(docs)} records, fewer than val_docs + test_docs = {n} held out "
            f"before training: lower data.val_docs / data.test_docs or use a larger dataset"
        )
    return {"train": [], "val": docs[:val_docs], "test": docs[val_docs:n]}


class StreamExhausted(RuntimeError):
    """A reader's share of the corpus ended before training did."""


class PackedStream(IterableDataset):
    """Windows `{"input_ids": [T], "labels": [T], "reader_state": [3]}` of this rank's readers (one per worker).

    `reader_state` is (local reader k, record d, token offset o) after the window (see the module docstring).
    `starts[k]` = (d, o) is where local reader k begins; `first_reader` the local reader of the loader's first
    batch (n mod K after n batches).
    """

    def __init__(
        self,
        source: StreamSource,
        tokenizer: Any,
        seq_len: int,
        separator: str,
        skip_texts: frozenset[str],
        rank: int,
        world_size: int,
        num_readers: int,
        starts: Sequence[tuple[int, int]] | None = None,
        first_reader: int = 0,
    ) -> None:
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.separator_ids = list(tokenizer.encode(separator))
        self.skip_texts, self.rank, self.world_size, self.num_readers = skip_texts, rank, world_size, num_readers
        self.starts = [tuple(s) for s in starts] if starts is not None else [(0, 0)] * num_readers
        self.first_reader = first_reader

    def _encode(self, texts: list[str]) -> list[list[int]]:
        encode_batch = getattr(self.tokenizer, "encode_batch", None)
        pieces = encode_batch(texts) if encode_batch is not None else [self.tokenizer.encode(t) for t in texts]
        return [list(p) + self.separator_ids for p in pieces]

    def _reader_stream(self, reader: int):
        """The `datasets` stream of global reader g = rank·K + reader."""
        from datasets.distributed import split_dataset_by_node

        ds = self.source.open()
        n_readers = self.world_size * self.num_readers
        if n_readers > 1 and ds.num_shards % n_readers:
            log.warning("dataset %r has %d shards, not a multiple of the %d readers (world size × workers): every "
                        "reader reads the whole stream and keeps 1 record in %d", self.source.name, ds.num_shards,
                        n_readers, n_readers)
        return split_dataset_by_node(ds, rank=self.rank * self.num_readers + reader, world_size=n_readers)

    def _records(self, reader: int, first: int) -> Iterator[tuple[int, list[int]]]:
        """(record index, tokens with the separator) of a reader's stream from record `first` on, in order; records
        before `first` are read but not tokenised, held-out texts give no tokens."""
        index = 0
        for batch in self._reader_stream(reader).iter(batch_size=_READ_BATCH):
            texts = self.source.texts(batch)
            keep = [(index + j, t, text_hash(t) in self.skip_texts) for j, t in enumerate(texts) if index + j >= first]
            index += len(texts)
            trained = [t for _, t, held_out in keep if not held_out]
            encoded = iter(self._encode(trained)) if trained else iter(())
            for i, _, held_out in keep:
                yield i, ([] if held_out else next(encoded))

    def windows(self, reader: int) -> Iterator[dict[str, torch.Tensor]]:
        """Local reader `reader`'s windows from its start (d, o); ends when its stream ends."""
        first, skip = self.starts[reader]
        need = self.seq_len + 1
        buf: list[int] = []
        spans: deque[list[int]] = deque()  # [record, offset in it of its first token in buf, its tokens in buf]
        for i, ids in self._records(reader, first):
            offset = skip if i == first else 0
            ids = ids[offset:]
            buf.extend(ids)
            spans.append([i, offset, len(ids)])
            while len(buf) >= need:
                window = torch.tensor(buf[:need], dtype=torch.int64)  # [T+1]
                del buf[: self.seq_len]  # the window's last token opens the next window
                drop = self.seq_len
                while spans and (drop >= spans[0][2]):
                    drop -= spans.popleft()[2]
                if drop:
                    spans[0][1] += drop
                    spans[0][2] -= drop
                d, o = (spans[0][0], spans[0][1]) if spans else (i + 1, 0)
                state = torch.tensor([reader, d, o], dtype=torch.int64)
                yield {"input_ids": window[:-1], "labels": window[1:], "reader_state": state}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's reader's windows; raises `StreamExhausted` at its end."""
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        if workers != self.num_readers:
            raise ValueError(f"PackedStream was built for {self.num_readers} readers per rank but runs in "
                             f"{workers} dataloader worker(s); pass num_readers = num_workers (or 1 without workers)")
        reader = (self.first_reader + (0 if info is None else info.id)) % self.num_readers
        yield from self.windows(reader)
        raise StreamExhausted(
            f"reader {reader} of rank {self.rank} reached the end of dataset {self.source.name!r}: the corpus holds "
            f"fewer tokens than the run asks for; train fewer steps or stream a larger dataset (no cycling: a second "
            f"pass would repeat text)"
        )


class StreamingLoader:
    """Train batches of a `PackedStream` through a DataLoader with one worker per reader, the reader positions
    taken out of each batch and kept, so that `snapshot(n)` is the exact position after n batches of this rank.

    `start` is a `snapshot` (None: the beginning); batches are counted from the start of the run.
    """

    def __init__(self, dataset: PackedStream, batch_size: int, num_workers: int, start: dict[str, Any] | None = None,
                 history: int = 4096) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.readers = max(1, num_workers)
        self.start_batch = 0 if start is None else int(start["batches"])
        starts = [(0, 0)] * self.readers if start is None else [tuple(p) for p in start["readers"]]
        dataset.starts, dataset.first_reader = starts, self.start_batch % self.readers
        self._history: deque[tuple[int, tuple[tuple[int, int], ...]]] = deque(maxlen=history)
        self._history.append((self.start_batch, tuple(starts)))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False)
        n, positions = self._history[-1][0], list(self._history[-1][1])
        for batch in loader:
            reader, d, o = (int(v) for v in batch.pop("reader_state")[-1])  # position after the batch's last window
            if reader != n % self.readers:
                raise RuntimeError(f"batch {n} came from reader {reader}, expected {n % self.readers}")
            positions[reader] = (d, o)
            n += 1
            self._history.append((n, tuple(positions)))
            yield batch

    def snapshot(self, batches: int | None = None) -> dict[str, Any]:
        """The position after `batches` batches of this rank (default: all delivered so far)."""
        if batches is None:
            batches = self._history[-1][0]
        for n, positions in reversed(self._history):
            if n == batches:
                return {"format": SNAPSHOT_FORMAT, "batches": n, "readers": [list(p) for p in positions]}
        kept = f"{self._history[0][0]}..{self._history[-1][0]}"
        raise ValueError(f"no stream position recorded after {batches} batches (kept: batches {kept})")


def check_snapshot(snapshot: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume a stream under a different layout: `expected` holds world_size, num_workers, batch_size,
    seq_len, tokenizer and source as the run now has them."""
    if snapshot.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"stream snapshot format {snapshot.get('format')!r} is not {SNAPSHOT_FORMAT}")
    for key, value in expected.items():
        if snapshot.get(key) != value:
            raise ValueError(f"the checkpoint's stream was read with {key}={snapshot.get(key)!r} but this run has "
                             f"{key}={value!r}: resume a streamed run with the layout it began with")

