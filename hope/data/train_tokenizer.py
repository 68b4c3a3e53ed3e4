"""Train a byte-level BPE on a sample of a streamed corpus and save it as one `tokenizer.json`.

    python -m hope.data.train_tokenizer --out tokenizers/fineweb-edu-32k.json \\
        --name HuggingFaceFW/fineweb-edu --config sample-10BT --docs 200000 --vocab-size 32768

    python -m hope.data.train_tokenizer --out tok.json --name json --data-files a.jsonl b.jsonl --vocab-size 4096

The sample is the `docs` records after the first `skip` (by default the val_docs + test_docs = 1000 records that
`data=hf_stream` holds out, so the tokenizer never sees held-out text), read through the same streaming path as
training (`hope.data.streaming.StreamSource`). The vocabulary is the one `DataConfig(tokenizer="bpe")` trains
(`hope.data.tokenizers`): the 256 byte symbols, GPT-2 pre-tokenization, no special tokens (documents are joined
by "\\n\\n"). Use it with `data.tokenizer=bpe:<out>`.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from hope.data.streaming import StreamSource
from hope.data.tokenizers import BPETokenizer, _atomic_write_text, _train_bpe_json


def sample_texts(source: StreamSource, docs: int, skip: int = 0) -> Iterator[str]:
    """Texts of records `skip` … `skip + docs − 1` of the stream, in order."""
    records = (t for batch in source.open().iter(batch_size=256) for t in source.texts(batch))
    return itertools.islice(records, skip, skip + docs)


def train_tokenizer(source: StreamSource, out: str | Path, vocab_size: int, docs: int, skip: int = 0) -> BPETokenizer:
    """Train on the sample and write `out` atomically; returns the loaded tokenizer."""
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an int >= 257 (256 bytes + merges), got {vocab_size!r}")
    if not isinstance(docs, int) or docs < 1:
        raise ValueError(f"docs must be an int >= 1, got {docs!r}")
    if not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be an int >= 0, got {skip!r}")
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in sample_texts(source, docs, skip):
            seen += 1
            yield text

    text = _train_bpe_json(counted(), vocab_size)
    if seen == 0:
        raise ValueError(f"dataset {source.name!r} has no records after the first {skip}: nothing to train on")
    _atomic_write_text(Path(out), text)
    return BPETokenizer(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write tokenizer.json")
    parser.add_argument("--name", required=True, help="Hub dataset, or json/text/parquet with --data-files")
    parser.add_argument("--config", default=None, help="dataset config, e.g. sample-10BT")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-files", nargs="+", default=None, help="local files for a builder --name")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--docs", type=int, default=200_000, help="records in the training sample")
    parser.add_argument("--skip", type=int, default=1000, help="records skipped first (data=hf_stream's held-out)")
    args = parser.parse_args(argv)
    files = None if args.data_files is None else tuple(args.data_files)
    source = StreamSource(args.name, args.config, args.split, files, args.text_field)
    tok = train_tokenizer(source, args.out, args.vocab_size, args.docs, args.skip)
    print(f"wrote {args.out}: {tok.vocab_size} tokens, trained on up to {args.docs} records of {args.name!r}")


if __name__ == "__main__":
    main()
