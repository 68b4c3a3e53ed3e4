"""Synthetic tasks (hope/data/synthetic.py): deterministic by seed, well formed, bad configurations rejected.

Dimension legend: N examples, L input length.

Formal-language examples are checked with checkers written independently of the generator's `in_language`
(regular expressions and pair cancellation).
"""

from __future__ import annotations

import re

import pytest
import torch

from hope.data.synthetic import (
    ACCEPT,
    DIGIT0,
    FORMAL_BINS,
    FORMAL_LANGUAGES,
    IGNORE_INDEX,
    NEEDLE,
    PASSKEY_QUERY,
    QUERY,
    REJECT,
    SEP,
    copy_task,
    formal_language_task,
    in_language,
    make_task,
    mqar_task,
    passkey_task,
    sample_formal_strings,
)

SMALL = {
    "copy": {"length": 6, "vocab_size": 10},
    "mqar": {"n_pairs": 5, "vocab_size": 32},
    "passkey": {"context_len": 64, "vocab_size": 48, "n_keys": 4},
    **{lang: {"length_range": (1, 20)} for lang in FORMAL_LANGUAGES},
}


def _same(a, b) -> bool:
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("task", list(SMALL))
def test_deterministic_by_seed(task: str) -> None:
    a, b, c = (make_task(task, 16, seed=s, **SMALL[task]) for s in (3, 3, 4))
    assert _same(a, b)
    assert not _same(a, c)
    assert a.inputs.dtype == a.targets.dtype == torch.int64
    assert a.inputs.shape == a.targets.shape and a.inputs.shape[0] == 16  # [N, L]
    assert int(a.inputs.max()) < a.vocab_size and int(a.inputs.min()) >= 0
    scored = a.targets[a.scored]
    assert scored.numel() > 0 and int(scored.min()) >= 0 and int(scored.max()) < a.vocab_size


def test_copy_targets_are_the_copied_symbols() -> None:
    b = copy_task(8, length=5, vocab_size=12, seed=1)
    assert b.inputs.shape == (8, 10)  # [N, 2n]
    assert torch.equal(b.targets[:, 5:], b.inputs[:, :5])  # predict x_1..x_n after the separator
    assert (b.targets[:, :5] == IGNORE_INDEX).all() and (b.inputs[:, 5] == 1).all()


def test_mqar_targets_are_the_paired_values() -> None:
    b = mqar_task(32, n_pairs=6, n_queries=4, vocab_size=20, seed=2)
    d = 6
    for row in range(32):
        seq = b.inputs[row].tolist()
        table = dict(zip(seq[0 : 2 * d : 2], seq[1 : 2 * d : 2]))
        assert len(table) == d  # keys are distinct
        scored = b.scored[row].nonzero().flatten().tolist()
        assert len(scored) == 4
        keys = [seq[t] for t in scored]
        assert len(set(keys)) == 4  # queries without replacement
        assert [int(b.targets[row, t]) for t in scored] == [table[k] for k in keys]


@pytest.mark.parametrize("filler", ["random", "repeat"])
def test_passkey_needle_and_answer(filler: str) -> None:
    n_digits, n_keys, ctx = 4, 5, 200
    b = passkey_task(10, context_len=ctx, n_digits=n_digits, vocab_size=64, n_keys=n_keys, filler=filler, seed=3)
    assert b.inputs.shape == (10, ctx)  # [N, L]
    for row in b.inputs.tolist():
        assert row.count(NEEDLE) == 1 and row.count(PASSKEY_QUERY) == 1
        at = row.index(NEEDLE)
        key, digits = row[at + 1], row[at + 3 : at + 3 + n_digits]
        assert row[at + 2] == SEP and all(DIGIT0 <= d < DIGIT0 + 10 for d in digits)
        assert row[-n_digits - 2 : -n_digits + 1] == [PASSKEY_QUERY, key, SEP]  # the last digit is only a target
        assert row.count(key) == 2  # the key appears in the needle and the query only
    answer = b.targets[:, -n_digits:]  # [N, m]
    assert (b.targets[:, :-n_digits] == IGNORE_INDEX).all()
    for row in range(10):
        at = b.inputs[row].tolist().index(NEEDLE)
        assert answer[row].tolist() == b.inputs[row, at + 3 : at + 3 + n_digits].tolist()


def test_passkey_depth_places_the_needle() -> None:
    ctx = 1000
    first = passkey_task(2, context_len=ctx, depth=0.0).inputs
    last = passkey_task(2, context_len=ctx, depth=1.0).inputs
    assert (first[:, 0] == NEEDLE).all()
    haystack = ctx + 1 - 2 * (5 + 3)  # two blocks of marker, key, separator and 5 digits
    assert (last[:, haystack] == NEEDLE).all()  # right after the whole haystack


def test_passkey_long_context() -> None:
    b = passkey_task(2, context_len=16384, seed=0)
    assert b.inputs.shape == (2, 16384) and int(b.scored.sum()) == 10


# Independent membership checkers.
_REGULAR = {"parity": r"(a*ba*b)*a*", "aa_star": r"(aa)*", "abab_star": r"(abab)*"}


def _independent(language: str, s: str) -> bool:
    if language in _REGULAR:
        return re.fullmatch(_REGULAR[language], s) is not None
    if language == "anbn":
        m = re.fullmatch(r"(a*)(b*)", s)
        return m is not None and len(m[1]) == len(m[2])
    if language == "anbncn":
        m = re.fullmatch(r"(a*)(b*)(c*)", s)
        return m is not None and len(m[1]) == len(m[2]) == len(m[3])
    assert language == "shuffle2"
    if set(s) - set("()[]"):
        return False
    for pair in ("()", "[]"):
        t = "".join(c for c in s if c in pair)
        while pair in t:
            t = t.replace(pair, "")
        if t:
            return False
    return True


@pytest.mark.parametrize("language", FORMAL_LANGUAGES)
@pytest.mark.parametrize("bin_name", list(FORMAL_BINS))
def test_formal_examples_are_correctly_labelled(language: str, bin_name: str) -> None:
    lo, hi = FORMAL_BINS[bin_name]
    pairs = sample_formal_strings(language, 200, (lo, hi), seed=7)
    assert sum(a for _, a in pairs) == 100  # balanced
    for s, accepted in pairs:
        assert lo <= len(s) <= hi
        assert _independent(language, s) == accepted, (language, s, accepted)
        assert in_language(language, s) == accepted


@pytest.mark.parametrize("language", FORMAL_LANGUAGES)
def test_formal_negatives_are_near_misses(language: str) -> None:
    """Negatives use the language's alphabet and the positives' lengths, so length alone never decides."""
    pairs = sample_formal_strings(language, 400, (1, 50), seed=1)
    neg_lengths = {len(s) for s, a in pairs if not a}
    pos_lengths = {len(s) for s, a in pairs if a}
    if language != "aa_star":  # (aa)* is decided by length parity, by definition
        assert len(neg_lengths & pos_lengths) >= len(pos_lengths) // 2
    alphabet = set("".join(s for s, _ in pairs))
    assert alphabet == set({"aa_star": "a", "anbncn": "abc", "shuffle2": "()[]"}.get(language, "ab"))


def test_formal_task_tensors() -> None:
    b = formal_language_task("shuffle2", 12, length_range=(4, 9), seed=0)
    assert b.inputs.shape == (12, 10) and b.accept is not None  # padded to hi + 1
    for row in range(12):
        n = int(b.lengths[row])
        assert int(b.inputs[row, n - 1]) == QUERY and (b.inputs[row, n:] == 0).all()
        assert b.scored[row].nonzero().flatten().tolist() == [n - 1]
        assert int(b.targets[row, n - 1]) == (ACCEPT if b.accept[row] else REJECT)
        symbols = "".join("()[]"[int(t) - 4] for t in b.inputs[row, : n - 1])
        assert _independent("shuffle2", symbols) == bool(b.accept[row])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: copy_task(0), "n_examples"),
        (lambda: copy_task(4, length=10, max_len=19), "exceeds max_len=19"),
        (lambda: copy_task(4, vocab_size=2), "vocab_size"),
        (lambda: mqar_task(4, n_pairs=8, vocab_size=16), "too small for 8 distinct keys"),
        (lambda: mqar_task(4, n_pairs=4, n_queries=5), "n_queries"),
        (lambda: passkey_task(4, context_len=2048, max_len=1024), "2048 exceeds max_len=1024"),
        (lambda: passkey_task(4, vocab_size=30), "vocab_size=30"),
        (lambda: passkey_task(4, context_len=10), "context_len=10"),
        (lambda: passkey_task(4, depth=1.5), "depth"),
        (lambda: formal_language_task("anbn", 4, (1, 50), max_len=32), "exceeds max_len=32"),
        (lambda: formal_language_task("dyck", 4), "unknown formal language 'dyck'"),
        (lambda: sample_formal_strings("anbncn", 4, (4, 5)), r"no positive string has a length in \(4, 5\)"),
        (lambda: sample_formal_strings("parity", 4, (0, 5)), "length_range"),
        (lambda: sample_formal_strings("parity", 0), "n_examples"),
        (lambda: make_task("sorting", 4), "unknown synthetic task 'sorting'"),
        (lambda: make_task("copy", 4, width=3), "bad arguments"),
    ],
)
def test_bad_configurations_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
