"""Synthetic tasks as token tensors, deterministic by seed: copying, MQAR, passkey retrieval, formal languages.

Dimension legend: N examples, L input length (one fewer than the generated sequence), V vocabulary size.

Every task returns a `SyntheticBatch` in the language-model convention of the data module: `inputs[n, t]` is read
at step t and `targets[n, t]` is the token to predict there (the next token), or `IGNORE_INDEX` (-100, the default
`ignore_index` of `torch.nn.functional.cross_entropy`) where nothing is scored. Token 0 is padding everywhere.

| task             | sequence (`|` only for reading)                         | scored                          |
|------------------|---------------------------------------------------------|---------------------------------|
| `copy`           | x_1 … x_n  SEP  x_1 … x_n                               | the n copied tokens             |
| `mqar`           | k_1 v_1 … k_D v_D  │  k_q1 v_q1 … k_qQ v_qQ             | each queried value              |
| `passkey`        | filler … NEEDLE key SEP d_1…d_m … filler  QUERY key SEP d_1…d_m | the m passkey digits     |
| formal languages | s_1 … s_n  QUERY  ACCEPT-or-REJECT                      | the answer after QUERY          |

MQAR follows Arora et al. 2023 (Zoology) with the queries packed right after the context. Passkey is RULER's
single-needle S-NIAH (arXiv:2512.24695 Table 1) with a key-value needle; the haystack is random filler tokens or,
with `filler="repeat"`, one fixed cycle of them (RULER's repeated noise sentence). The formal languages are those
of Table 5 (after Irie et al. 2023 and Bhattamishra et al. 2020): Parity (strings over {a, b} with an even number
of b), (aa)*, (abab)*, aⁿbⁿ, aⁿbⁿcⁿ and Shuffle-2 (interleavings of two balanced bracket strings, over "()" and
"[]"). Those papers score next-character prediction; here each string is a recognition example (accept/reject),
half positive and half negative, of lengths drawn from a bin (`length_range`, Table 5's Bin0 = (1, 50), Bin1 =
(51, 100)), so one trains on short strings and tests on long ones. Negatives are near misses of the language
(one flipped symbol, unequal counts, symbols out of order, an unmatched bracket), never random noise, and each one
is checked against the language before it is kept.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

IGNORE_INDEX = -100
PAD = 0
FORMAL_LANGUAGES = ("parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2")
FORMAL_BINS = {"bin0": (1, 50), "bin1": (51, 100)}
# Formal-language token ids: 0 pad, then QUERY / ACCEPT / REJECT, then the alphabet symbols.
QUERY, ACCEPT, REJECT = 1, 2, 3
FORMAL_VOCAB_SIZE = 8
_ALPHABETS = {
    "parity": "ab",
    "aa_star": "a",
    "abab_star": "ab",
    "anbn": "ab",
    "anbncn": "abc",
    "shuffle2": "()[]",
}
_MAX_TRIES = 1000


@dataclass(frozen=True)
class SyntheticBatch:
    """Examples of one synthetic task.

    Attributes:
        inputs: `[N, L]` int64 token ids, right-padded with `PAD`.
        targets: `[N, L]` int64 next-token targets at scored positions, `IGNORE_INDEX` elsewhere.
        lengths: `[N]` int64 unpadded input lengths.
        vocab_size: number of token ids the task uses.
        accept: `[N]` bool recognition labels (formal languages only), else None.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    vocab_size: int
    accept: torch.Tensor | None = None

    @property
    def scored(self) -> torch.Tensor:
        """`[N, L]` bool: the positions whose prediction is scored."""
        return self.targets != IGNORE_INDEX


def _check_common(n_examples: int, seed: int, length: int, max_len: int | None) -> None:
    if not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be an int >= 1, got {n_examples!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if max_len is not None and length > max_len:
        raise ValueError(f"sequence length {length} exceeds max_len={max_len}")


def _pack(seq: torch.Tensor, score: torch.Tensor, vocab_size: int) -> SyntheticBatch:
    """Turn full sequences `[N, L+1]` and a mask of the tokens to predict into inputs / targets `[N, L]`."""
    targets = torch.where(score[:, 1:], seq[:, 1:], IGNORE_INDEX)  # [N, L]
    lengths = torch.full((seq.shape[0],), seq.shape[1] - 1, dtype=torch.int64)  # [N]
    return SyntheticBatch(seq[:, :-1].contiguous(), targets, lengths, vocab_size)


def copy_task(
    n_examples: int, length: int = 32, vocab_size: int = 16, seed: int = 0, max_len: int | None = None
) -> SyntheticBatch:
    """Copying: read `length` random symbols and a separator, then reproduce the symbols.

    Token ids: 0 pad, 1 separator, symbols in [2, vocab_size). Input length 2·length.
    """
    _check_common(n_examples, seed, 2 * length, max_len)
    if length < 1:
        raise ValueError(f"copy length must be >= 1, got {length!r}")
    if vocab_size < 3:
        raise ValueError(f"copy vocab_size must be >= 3 (pad, separator, one symbol), got {vocab_size!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab_size, (n_examples, length), generator=g)  # [N, n]
    sep = torch.ones(n_examples, 1, dtype=torch.int64)
    seq = torch.cat([x, sep, x], dim=1)  # [N, 2n+1]
    score = torch.zeros_like(seq, dtype=torch.bool)
    score[:, length + 1 :] = True
    return _pack(seq, score, vocab_size)


def mqar_task(
    n_examples: int,
    n_pairs: int = 8,
    n_queries: int | None = None,
    vocab_size: int = 64,
    seed: int = 0,
    max_len: int | None = None,
) -> SyntheticBatch:
    """Multi-query associative recall: D key-value pairs, then Q distinct keys each followed by its value.

    Token ids: 0 pad, keys in [1, 1+K), values in [1+K, vocab_size) with K = (vocab_size-1)//2; keys within an
    example are distinct, values may repeat. Input length 2·(D+Q) − 1.
    """
    n_queries = n_pairs if n_queries is None else n_queries
    _check_common(n_examples, seed, 2 * (n_pairs + n_queries) - 1, max_len)
    if n_pairs < 1 or not 1 <= n_queries <= n_pairs:
        raise ValueError(f"mqar needs n_pairs >= 1 and 1 <= n_queries <= n_pairs, got {n_pairs=}, {n_queries=}")
    n_keys = (vocab_size - 1) // 2
    if n_keys < n_pairs:
        need = 2 * n_pairs + 1
        raise ValueError(f"mqar vocab_size={vocab_size} is too small for {n_pairs} distinct keys (need >= {need})")
    g = torch.Generator().manual_seed(seed)
    keys = torch.argsort(torch.rand(n_examples, n_keys, generator=g), dim=1)[:, :n_pairs] + 1  # [N, D]
    values = torch.randint(1 + n_keys, vocab_size, (n_examples, n_pairs), generator=g)  # [N, D]
    order = torch.argsort(torch.rand(n_examples, n_pairs, generator=g), dim=1)[:, :n_queries]  # [N, Q]
    context = torch.stack([keys, values], dim=2).flatten(1)  # [N, 2D]
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).flatten(1)  # [N, 2Q]
    seq = torch.cat([context, queries], dim=1)  # [N, 2D+2Q]
    score = torch.zeros_like(seq, dtype=torch.bool)
    score[:, 2 * n_pairs + 1 :: 2] = True  # the value after each query key
    return _pack(seq, score, vocab_size)


# Passkey token ids: 0 pad, 1 needle marker, 2 query marker, 3 separator, 4..13 digits, then keys, then filler.
NEEDLE, PASSKEY_QUERY, SEP, DIGIT0 = 1, 2, 3, 4


def passkey_task(
    n_examples: int,
    context_len: int = 1024,
    n_digits: int = 5,
    vocab_size: int = 128,
    n_keys: int = 16,
    depth: float | None = None,
    filler: str = "random",
    seed: int = 0,
    max_len: int | None = None,
) -> SyntheticBatch:
    """Single-needle passkey retrieval: a haystack of filler with one `NEEDLE key SEP digits` inside, and
    `QUERY key SEP` at the end, after which the model must produce the `n_digits` digits.

    `context_len` is the input length (1K–16K in RULER); `depth` ∈ [0, 1] places the needle at that fraction of
    the haystack (None: uniformly at random per example). Keys lie in [14, 14+n_keys), filler tokens above.
    """
    _check_common(n_examples, seed, context_len, max_len)
    first_filler = DIGIT0 + 10 + n_keys
    if n_digits < 1 or n_keys < 1:
        raise ValueError(f"passkey needs n_digits >= 1 and n_keys >= 1, got {n_digits=}, {n_keys=}")
    if vocab_size <= first_filler:
        raise ValueError(f"passkey vocab_size={vocab_size} leaves no filler token (need > {first_filler})")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1] or None, got {depth!r}")
    if filler not in ("random", "repeat"):
        raise ValueError(f"passkey filler must be 'random' or 'repeat', got {filler!r}")
    block = n_digits + 3  # NEEDLE/QUERY, key, SEP, digits
    hay = context_len + 1 - 2 * block
    if hay < 0:
        raise ValueError(f"passkey context_len={context_len} is shorter than needle + query ({2 * block - 1} tokens)")
    g = torch.Generator().manual_seed(seed)
    key = torch.randint(DIGIT0 + 10, first_filler, (n_examples, 1), generator=g)  # [N, 1]
    digits = torch.randint(DIGIT0, DIGIT0 + 10, (n_examples, n_digits), generator=g)  # [N, m]
    if filler == "random":
        haystack = torch.randint(first_filler, vocab_size, (n_examples, hay), generator=g)  # [N, H]
    else:
        haystack = (first_filler + torch.arange(hay) % (vocab_size - first_filler)).expand(n_examples, hay)
    if depth is None:
        where = torch.randint(0, hay + 1, (n_examples,), generator=g)  # [N]
    else:
        where = torch.full((n_examples,), round(depth * hay), dtype=torch.int64)

    def marked(marker: int) -> torch.Tensor:
        head = torch.tensor([marker, 0, SEP]).repeat(n_examples, 1)
        head[:, 1] = key[:, 0]
        return torch.cat([head, digits], dim=1)  # [N, block]

    needle, query = marked(NEEDLE), marked(PASSKEY_QUERY)
    rows = zip(haystack, where.tolist(), needle, query)
    seq = torch.stack([torch.cat([h[:w], nd, h[w:], q]) for h, w, nd, q in rows])  # [N, L+1]
    score = torch.zeros_like(seq, dtype=torch.bool)  # [N, L+1]
    score[:, -n_digits:] = True
    return _pack(seq, score, vocab_size)


def in_language(language: str, s: str) -> bool:
    """Membership of string `s` in a formal language of Table 5 (the generator's own check)."""
    n = len(s)
    if language not in FORMAL_LANGUAGES:
        raise ValueError(f"unknown formal language {language!r}; expected one of {FORMAL_LANGUAGES}")
    if not set(s) <= set(_ALPHABETS[language]):
        return False
    if language == "parity":
        return s.count("b") % 2 == 0
    if language == "aa_star":
        return n % 2 == 0
    if language == "abab_star":
        return s == "abab" * (n // 4) and n % 4 == 0
    if language == "anbn":
        return n % 2 == 0 and s == "a" * (n // 2) + "b" * (n // 2)
    if language == "anbncn":
        return n % 3 == 0 and s == "a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3)
    return all(_balanced(s, pair) for pair in ("()", "[]"))


def _balanced(s: str, pair: str) -> bool:
    depth = 0
    for c in s:
        depth += (c == pair[0]) - (c == pair[1])
        if depth < 0:
            return False
    return depth == 0


def _valid_length(language: str, n: int, positive: bool) -> bool:
    if language == "aa_star":
        return (n % 2 == 0) == positive
    if not positive:
        return True
    period = {"parity": 1, "abab_star": 4, "anbn": 2, "anbncn": 3, "shuffle2": 2}[language]
    return n % period == 0


def _positive(language: str, n: int, rng: random.Random) -> str:
    if language == "parity":
        s = [rng.choice("ab") for _ in range(n)]
        if s.count("b") % 2:
            i = rng.randrange(n)
            s[i] = "a" if s[i] == "b" else "b"
        return "".join(s)
    if language == "aa_star":
        return "a" * n
    if language == "abab_star":
        return "ab" * (n // 2)
    if language in ("anbn", "anbncn"):
        k = len(_ALPHABETS[language])
        return "".join(c * (n // k) for c in _ALPHABETS[language])
    return _shuffle2(n, rng)


def _dyck(m: int, pair: str, rng: random.Random) -> list[str]:
    """A random balanced string of m bracket pairs (open with probability 1/2 whenever both moves are legal)."""
    out, opened, depth = [], 0, 0
    while len(out) < 2 * m:
        can_open, can_close = opened < m, depth > 0
        if can_open and (not can_close or rng.random() < 0.5):
            out.append(pair[0])
            opened, depth = opened + 1, depth + 1
        else:
            out.append(pair[1])
            depth -= 1
    return out


def _shuffle2(n: int, rng: random.Random) -> str:
    m1 = rng.randint(0, n // 2)
    first, second = _dyck(m1, "()", rng), _dyck(n // 2 - m1, "[]", rng)
    slots = set(rng.sample(range(n), 2 * m1))  # positions taken by the "()" string, order kept
    it1, it2 = iter(first), iter(second)
    return "".join(next(it1) if i in slots else next(it2) for i in range(n))


def _negative(language: str, n: int, rng: random.Random) -> str:
    """A near miss of length n; rarely it is in the language after all, so the caller checks and retries."""
    alphabet = _ALPHABETS[language]
    if language == "parity":
        return _flip(_positive(language, n, rng), alphabet, rng)  # one flip changes the parity of the b count
    if language == "aa_star":
        return "a" * n  # n is odd here
    if language == "abab_star":
        pattern = ("ab" * n)[:n]  # the right pattern cut at the wrong length, or one symbol flipped
        return pattern if n % 4 and rng.random() < 0.5 else _flip(pattern, alphabet, rng)
    if language == "shuffle2" and n % 2:
        s = _shuffle2(n - 1, rng)
        i = rng.randrange(n)
        return s[:i] + rng.choice(alphabet) + s[i:]  # one unmatched bracket
    if language in ("anbn", "anbncn") and (rng.random() < 0.5 or not _valid_length(language, n, True)):
        return "".join(sorted(rng.choice(alphabet) for _ in range(n)))  # symbols in order, counts unequal
    if language == "shuffle2" and rng.random() < 0.5:
        return _flip(_shuffle2(n, rng), alphabet, rng)  # one bracket replaced: some count is off
    s = list(_positive(language, n, rng))
    i = rng.randrange(n)
    j = rng.choice([k for k in range(n) if s[k] != s[i]])
    s[i], s[j] = s[j], s[i]  # same counts, a symbol out of order (or a bracket closed before it opened)
    return "".join(s)


def _flip(s: str, alphabet: str, rng: random.Random) -> str:
    i = rng.randrange(len(s))
    return s[:i] + rng.choice([c for c in alphabet if c != s[i]]) + s[i + 1 :]


def sample_formal_strings(
    language: str, n_examples: int, length_range: tuple[int, int] = (1, 50), seed: int = 0
) -> list[tuple[str, bool]]:
    """`(string, accepted)` pairs, half positive (the extra one when odd), string lengths in `length_range`.

    Each example draws its length uniformly among the lengths of the range that its class allows (aⁿbⁿ
    positives have even length, (aa)* negatives odd length, ...); a range with no such length raises.
    """
    if language not in FORMAL_LANGUAGES:
        raise ValueError(f"unknown formal language {language!r}; expected one of {FORMAL_LANGUAGES}")
    _check_common(n_examples, seed, 0, None)
    lo, hi = length_range
    if not 1 <= lo <= hi:
        raise ValueError(f"length_range must satisfy 1 <= lo <= hi, got {tuple(length_range)!r}")
    lengths = {want: [n for n in range(lo, hi + 1) if _valid_length(language, n, want)] for want in (True, False)}
    for want, valid in lengths.items():
        if not valid:
            kind = "positive" if want else "negative"
            raise ValueError(f"{language}: no {kind} string has a length in {tuple(length_range)!r}")
    rng = random.Random(seed)
    labels = [i < (n_examples + 1) // 2 for i in range(n_examples)]
    rng.shuffle(labels)
    out = []
    for want in labels:
        for _ in range(_MAX_TRIES):
            n = rng.choice(lengths[want])
            s = _positive(language, n, rng) if want else _negative(language, n, rng)
            if in_language(language, s) == want:
                break
        else:
            raise RuntimeError(f"{language}: no {'positive' if want else 'negative'} string after {_MAX_TRIES} tries")
        out.append((s, want))
    return out


def formal_language_task(
    language: str,
    n_examples: int,
    length_range: tuple[int, int] = (1, 50),
    seed: int = 0,
    max_len: int | None = None,
) -> SyntheticBatch:
    """Recognition of a Table 5 language: read `s_1 … s_n QUERY`, predict ACCEPT or REJECT after QUERY.

    Token ids: 0 pad, 1 QUERY, 2 ACCEPT, 3 REJECT, symbols from 4 in alphabet order ("ab", "abc", "()[]").
    Inputs are right-padded to `length_range[1] + 1`, so every batch of a bin has the same width.
    """
    width = int(length_range[1]) + 1
    _check_common(n_examples, seed, width, max_len)
    pairs = sample_formal_strings(language, n_examples, length_range, seed)
    code = {c: 4 + i for i, c in enumerate(_ALPHABETS[language])}
    inputs = torch.full((n_examples, width), PAD, dtype=torch.int64)  # [N, L]
    targets = torch.full((n_examples, width), IGNORE_INDEX, dtype=torch.int64)  # [N, L]
    lengths = torch.tensor([len(s) + 1 for s, _ in pairs], dtype=torch.int64)  # [N]
    for row, (s, accepted) in enumerate(pairs):
        inputs[row, : len(s) + 1] = torch.tensor([code[c] for c in s] + [QUERY])
        targets[row, len(s)] = ACCEPT if accepted else REJECT
    accept = torch.tensor([a for _, a in pairs], dtype=torch.bool)  # [N]
    return SyntheticBatch(inputs, targets, lengths, FORMAL_VOCAB_SIZE, accept)


SYNTHETIC_TASKS: dict[str, Callable[..., SyntheticBatch]] = {
    "copy": copy_task,
    "mqar": mqar_task,
    "passkey": passkey_task,
    **{language: partial(formal_language_task, language) for language in FORMAL_LANGUAGES},
}


def make_task(task: str, n_examples: int, seed: int = 0, **kwargs) -> SyntheticBatch:
    """Generate `n_examples` of a named task (a key of `SYNTHETIC_TASKS`) with its keyword arguments."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {tuple(SYNTHETIC_TASKS)}")
    fn = SYNTHETIC_TASKS[task]
    try:
        inspect.signature(fn).bind(n_examples=n_examples, seed=seed, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments {sorted(kwargs)} for synthetic task {task!r}: {err}") from None
    return fn(n_examples=n_examples, seed=seed, **kwargs)
