"""Token windows from documents, the unit every language-modelling benchmark trains and evaluates on.

Dimensions: N windows, T time (tokens per window), L tokens in a stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from experiments.common.train import Task


def encode(text: str) -> Tensor:
    """Byte-level token ids `[L]` (int64) from the project's `ByteTokenizer`."""
    from hope.data.tokenizers import ByteTokenizer

    return ByteTokenizer().encode_to_tensor(text).long()  # [L]


def stream(docs: Sequence, sep: str = "\n\n") -> Tensor:
    """The documents' texts joined by `sep` and encoded: one token stream `[L]`."""
    return encode(sep.join(d.text for d in docs))


def random_windows(ids: Tensor, n: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n windows at seeded random offsets: inputs `[n, T]` and next-token targets `[n, T]`."""
    _check_length(ids, seq_len)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=generator)  # [n]
    rows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # [n, T+1]
    return rows[:, :-1], rows[:, 1:]


def spread_windows(ids: Tensor, n: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """n windows at evenly spaced offsets covering the stream (deterministic evaluation sets)."""
    _check_length(ids, seq_len)
    starts = torch.linspace(0, ids.numel() - seq_len - 1, n).long()  # [n]
    rows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # [n, T+1]
    return rows[:, :-1], rows[:, 1:]


def _check_length(ids: Tensor, seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if ids.numel() < seq_len + 1:
        raise ValueError(f"a stream of {ids.numel()} tokens is too short for windows of seq_len={seq_len} (+1)")


def lm_task(name: str, train_docs: Sequence, eval_docs: Sequence, seq_len: int, n_train: int, n_eval: int,
            seed: int) -> Task:
    """A next-token task: `n_train` random training windows and `n_eval` evenly spread held-out windows."""
    if not train_docs or not eval_docs:
        raise ValueError(f"task {name!r} needs training and evaluation documents, got {len(train_docs)} and "
                         f"{len(eval_docs)}")
    try:
        x, y = random_windows(stream(train_docs), n_train, seq_len, torch.Generator().manual_seed(seed))
        ex, ey = spread_windows(stream(eval_docs), n_eval, seq_len)
    except ValueError as err:
        raise ValueError(f"task {name!r}: {err}") from err
    return Task(name, x, y, ex, ey)


def check_fits(model: torch.nn.Module, seq_len: int) -> None:
    """Refuse sequences longer than the model's context limit (`config.max_seq_len`), naming both."""
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"sequence length {seq_len} exceeds the model's max_seq_len={limit}")
