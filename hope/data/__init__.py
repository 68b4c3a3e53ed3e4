"""Data layer: offline corpora and their split, streamed corpora (`hope.data.streaming`), tokenizers, synthetic tasks,
and the Lightning data module.

`LMDataModule`, `DataConfig` and the samplers live in `hope.data.datamodule` and are loaded on first access,
so that `import hope.data` does not import Lightning.
"""

from hope.data.corpora import (
    CORPORA,
    Document,
    MissingCorpusError,
    load_corpus,
    load_hf_documents,
    load_text_files,
    split_documents,
)
from hope.data.synthetic import (
    FORMAL_LANGUAGES,
    IGNORE_INDEX,
    SYNTHETIC_TASKS,
    SyntheticBatch,
    copy_task,
    formal_language_task,
    make_task,
    mqar_task,
    passkey_task,
)
from hope.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

_LAZY = ("DataConfig", "LMDataModule", "ResumableSampler", "ShardSampler")

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CORPORA",
    "Document",
    "FORMAL_LANGUAGES",
    "HFTokenizer",
    "IGNORE_INDEX",
    "MissingCorpusError",
    "SYNTHETIC_TASKS",
    "SyntheticBatch",
    "Tokenizer",
    "build_tokenizer",
    "copy_task",
    "formal_language_task",
    "load_corpus",
    "load_hf_documents",
    "load_text_files",
    "make_task",
    "mqar_task",
    "passkey_task",
    "split_documents",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        from hope.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'hope.data' has no attribute {name!r}")
