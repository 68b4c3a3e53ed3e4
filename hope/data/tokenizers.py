"""Tokenizers behind one protocol: raw bytes (default), a byte-level BPE trained here, or any Hugging Face one.

Dimension legend: V vocabulary size.

Every tokenizer exposes `token_bytes` `[V]` int64, the number of UTF-8 bytes each token stands for (0 for special
tokens), so that bits per byte = Σ_t NLL_t / (ln 2 · Σ_t token_bytes[label_t]). The sum is exact for byte-level
vocabularies (bytes, the BPE here, GPT-2-style Hugging Face tokenizers); for SentencePiece vocabularies "▁" counts
as one space and `<0xNN>` as one byte, which can miscount a leading space per document.

`build_tokenizer(spec)` picks one by spec: "bytes", "bpe" (trained on the training text, cached on disk),
"bpe:<tokenizer.json>" (a file written by `python -m hope.data.train_tokenizer`), or "hf:<name-or-path>".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

TOKENIZER_SPECS = ("bytes", "bpe", "bpe:<tokenizer.json>", "hf:<name-or-path>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer and the trainer need from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def token_bytes(self) -> torch.Tensor: ...  # [V] int64

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train or download, bits per byte is exact."""

    name = "bytes"
    vocab_size = 256

    @property
    def token_bytes(self) -> torch.Tensor:
        return torch.ones(256, dtype=torch.int64)  # [V]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Fast path for long texts: the byte values as an int32 tensor."""
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.empty(0, dtype=torch.int32)
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int32)  # [N]

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"byte token ids must be in [0, 256), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no special tokens) from the `tokenizers` package.

    Train with `BPETokenizer.train(texts, vocab_size, cache_dir)`; the trained vocabulary is cached as
    `<cache_dir>/bpe-<vocab_size>-<fingerprint>.json`, keyed by the SHA-256 of the training texts and the vocab
    size, written atomically (temporary file + rename) so concurrent ranks never read half a file.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"BPE tokenizer file not found: {str(path)!r}")
        self.path = path
        self._tok = _HFTokenizer.from_file(str(path))
        self.name = f"bpe:{path.stem}"
        self.vocab_size = self._tok.get_vocab_size()
        self._token_bytes = _byte_level_token_bytes([self._tok.id_to_token(i) for i in range(self.vocab_size)])

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, cache_dir: str | Path) -> BPETokenizer:
        """Train on `texts` (or load the cached result of the same training)."""
        texts = list(texts)
        if vocab_size < 257:
            raise ValueError(f"BPE vocab_size must be >= 257 (256 bytes + merges), got {vocab_size!r}")
        if not any(texts):
            raise ValueError("BPE training text is empty")
        h = hashlib.sha256()
        for t in texts:
            data = t.encode()
            h.update(len(data).to_bytes(8, "little") + data)
        path = Path(cache_dir) / f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json"
        with build_once(path):
            if not path.is_file():
                _atomic_write_text(path, _train_bpe_json(texts, vocab_size))
        return cls(path)

    @property
    def token_bytes(self) -> torch.Tensor:
        return self._token_bytes  # [V]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # `encode_batch_fast` (tokenizers >= 0.20) skips the character offsets we never use: ~1.5x faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def _train_bpe_json(texts: list[str], vocab_size: int) -> str:
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet makes every string encodable, whatever bytes the training text happened to hold.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


@contextlib.contextmanager
def build_once(path: Path) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` lock named after `path`: of the processes (ranks) of one machine that would
    build the same cache file at once, one builds it and the others wait, then find it. The lock file lives in the
    temporary directory, not beside the cache. A no-op where `fcntl` is missing (concurrent builds then stay
    correct, the writes being atomic, only duplicated)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    locks = Path(tempfile.gettempdir()) / "hope-locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    with open(locks / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _byte_to_unicode() -> dict[str, int]:
    """Inverse of GPT-2's byte → printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level_token_bytes(tokens: Sequence[str | None], special: Iterable[int] = ()) -> torch.Tensor:
    """UTF-8 bytes per token of a byte-level vocabulary: one per character (0 for specials / holes)."""
    byte_of = _byte_to_unicode()
    out = torch.tensor(
        [sum(1 if c in byte_of else len(c.encode()) for c in tok) if tok else 0 for tok in tokens], dtype=torch.int64
    )  # [V]
    out[list(special)] = 0
    return out


class HFTokenizer:
    """Any Hugging Face tokenizer (hub name or local directory) through `transformers.AutoTokenizer`.

    Encodes without special tokens (documents are joined by the data layer); `vocab_size` counts added tokens.
    """

    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError(
                f"HFTokenizer needs `transformers`; install it with: pip install transformers ({err})"
            ) from err
        # A huge model_max_length silences the per-call "sequence longer than the model" warning on documents.
        self._tok = AutoTokenizer.from_pretrained(name_or_path, model_max_length=1 << 62)
        self.name = f"hf:{name_or_path}"
        self.vocab_size = len(self._tok)
        self._token_bytes = self._count_token_bytes()

    def _count_token_bytes(self) -> torch.Tensor:
        tokens = self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        special = [i for i in self._tok.all_special_ids if i < self.vocab_size]
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None and "ByteLevel" in repr(backend.pre_tokenizer) + repr(backend.decoder):
            return _byte_level_token_bytes(tokens, special)
        counts = []
        for tok in tokens:
            if tok is None:
                counts.append(0)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
                counts.append(1)  # SentencePiece byte fallback
            else:
                counts.append(len(tok.removeprefix("##").replace("▁", " ").encode()))
        out = torch.tensor(counts, dtype=torch.int64)  # [V]
        out[special] = 0
        return out

    @property
    def token_bytes(self) -> torch.Tensor:
        return self._token_bytes  # [V]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(
    spec: str,
    train_text: Iterable[str] | None = None,
    vocab_size: int = 8192,
    cache_dir: str | Path = "data_cache/tokenizers",
) -> Tokenizer:
    """A tokenizer from its spec: "bytes", "bpe" (needs `train_text`; `vocab_size`, cached in `cache_dir`),
    "bpe:<tokenizer.json>" or "hf:<name-or-path>"."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "bpe":
        if train_text is None:
            raise ValueError("tokenizer 'bpe' is trained on the training text: pass train_text")
        return BPETokenizer.train(train_text, vocab_size, cache_dir)
    if isinstance(spec, str) and spec.startswith("bpe:") and len(spec) > 4:
        path = Path(spec[4:])
        if not path.is_file():
            raise ValueError(f"tokenizer {spec!r}: no file at {str(path)!r}; train one with: python -m "
                             f"hope.data.train_tokenizer --out {path} (see docs/scaling.md)")
        return BPETokenizer(path)
    if isinstance(spec, str) and spec.startswith("hf:") and len(spec) > 3:
        return HFTokenizer(spec[3:])
    raise ValueError(f"unknown tokenizer spec {spec!r}; expected one of {TOKENIZER_SPECS}")
