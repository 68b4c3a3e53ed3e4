"""Passkey retrieval (RULER S-NIAH-1 style, arXiv:2512.24695 Table 1): trained short, tested at 1K–16K tokens.

    python -m experiments.memory_tasks.passkey --tiny       # seconds, CPU (what the tests run)
    python -m experiments.memory_tasks.passkey              # full mode (run time: memory_tasks/README.md)

Dimensions: N examples, T time (context length).

Each model is trained on haystacks of `train_len` tokens holding one `NEEDLE key SEP digits` and ending in
`QUERY key SEP`, after which it must produce the digits (`hope.data.synthetic.passkey_task`, needle depth uniform),
then tested on held-out haystacks of 1K, 2K, 4K, 8K and 16K tokens. Exact match = every digit right (argmax over
the ten digit tokens, teacher-forced, which equals greedy decoding for an exact match). The paper's Table 1 uses
RULER on models trained at 4K on natural text; this is the synthetic, from-scratch version of the same question:
does retrieval survive contexts longer than any seen in training? Writes `<out>/passkey.json`, `.png`, `.md`.

`--stream` trains and tests as a stream model would run: every haystack is read in windows of `window` tokens
(512 in cpu mode) with the state carried and cut between windows (truncated BPTT; attention keeps a Transformer-XL
cache of the last window), after a curriculum that goes on from the short haystacks to ones of `then` tokens; it
tests at 1K, 4K, 16K and 64K tokens. Writes `<out>/passkey_stream.*`. `--window` and `--then 1024:150` change the
window and the longer-haystack phases (a haystack no longer than the window is trained with its whole gradient;
a longer one is trained in windows with the state passed on, so only its last window's gradient reaches the gates
that keep the needle). `--test-lens` changes the lengths tested. `--save-models DIR` keeps the trained models;
`--from-saved DIR` scores them again (other lengths, no training) and `--init-from DIR --then ...` trains them on
further phases only (with a fresh optimizer).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from experiments.common.cli import configured
from experiments.memory_tasks.harness import run_sweep, sweep_mode, sweep_parser

NAME = "passkey"
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "vocab": 64, "digits": 2, "train_len": 32, "test_lens": [32, 64], "steps": 3,
             "batch": 8, "n_test": 8, "eval_batch": 8, "lr": 3e-3},
    "cpu": {"size": "small", "vocab": 128, "digits": 5, "train_len": 128, "test_lens": [128, 1024, 4096, 16384],
            "steps": 1000, "batch": 16, "n_test": 25, "eval_batch": 1, "lr": 1e-3},
    "full": {"size": "small", "vocab": 128, "digits": 5, "train_len": 512, "test_lens": [1024, 2048, 4096, 8192,
             16384], "steps": 2000, "batch": 16, "n_test": 50, "eval_batch": 1, "lr": 1e-3},
}
# --stream: the same budgets read in windows, then a phase on longer haystacks, tested out to 64K tokens
STREAM_MODES: dict[str, dict[str, Any]] = {
    "tiny": {**MODES["tiny"], "window": 64, "then": [{"train_len": 128, "steps": 2}], "test_lens": [128, 256]},
    "cpu": {**MODES["cpu"], "window": 512, "then": [{"train_len": 1024, "steps": 150}],
            "test_lens": [1024, 4096, 16384, 65536], "n_test": 20, "eval_batch": 20},
    "full": {**MODES["full"], "window": 1024, "then": [{"train_len": 4096, "steps": 500}],
             "test_lens": [1024, 4096, 16384, 65536], "n_test": 50, "eval_batch": 25},
}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with configured(args):
        from hope.data.synthetic import DIGIT0, passkey_task

        mode = sweep_mode(STREAM_MODES if args.stream else MODES, args)
        if args.window is not None:
            mode["window"] = args.window
        if args.then is not None:
            mode["then"] = args.then
        if args.test_lens is not None:
            mode["test_lens"] = args.test_lens
        if args.n_test is not None:
            mode["n_test"] = args.n_test
        digits = torch.arange(DIGIT0, DIGIT0 + 10)  # [K] the ten digit tokens

        def make(length: int, n: int, seed: int):
            return passkey_task(n, context_len=length, n_digits=mode["digits"], vocab_size=mode["vocab"], seed=seed)

        return run_sweep(NAME + ("_stream" if args.stream else ""), args, mode, make, mode["train_len"],
                         mode["test_lens"], mode["vocab"], digits,
                         "tokens", "exact match (all digits right) and digit accuracy")


def parser() -> argparse.ArgumentParser:
    p = sweep_parser(__doc__.splitlines()[0])
    p.add_argument("--stream", action="store_true",
                   help="read haystacks in windows with the state carried, after a longer-haystack phase")
    p.add_argument("--window", type=int, default=None,
                   help="--stream: tokens per window, in training and test (default: the mode's)")
    p.add_argument("--then", type=_phases, default=None, metavar="LEN:STEPS[,LEN:STEPS]",
                   help="--stream: the longer-haystack phases after the first (default: the mode's)")
    p.add_argument("--test-lens", type=_lengths, default=None, metavar="LEN[,LEN]",
                   help="haystack lengths tested, in tokens (default: the mode's)")
    p.add_argument("--n-test", dest="n_test", type=int, default=None, metavar="N",
                   help="test haystacks per length (default: the mode's); an exact-match rate of n haystacks is "
                   "known to about ±1/√n")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed flags; `--window` and `--then` only with `--stream`, and a window of at least 1 token."""
    p = parser()
    args = p.parse_args(argv)
    if not args.stream and (args.window is not None or args.then is not None):
        p.error("--window and --then set the stream protocol; add --stream")
    if args.window is not None and args.window < 1:
        p.error(f"--window must be >= 1, got {args.window}")
    if args.n_test is not None and args.n_test < 1:
        p.error(f"--n-test must be >= 1, got {args.n_test}")
    return args


def _lengths(text: str) -> list[int]:
    """`"1024,4096"` → [1024, 4096]; every item a positive int."""
    items = [i.strip() for i in text.split(",") if i.strip()]
    if not items or not all(i.isdigit() and int(i) > 0 for i in items):
        raise argparse.ArgumentTypeError(f"--test-lens takes positive ints separated by commas, got {text!r}")
    return [int(i) for i in items]


def _phases(text: str) -> list[dict[str, int]]:
    """`"1024:150,2048:100"` → [{"train_len": 1024, "steps": 150}, {"train_len": 2048, "steps": 100}]."""
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        length, sep, steps = item.partition(":")
        if not (sep and length.isdigit() and steps.isdigit() and int(length) > 0 and int(steps) > 0):
            raise argparse.ArgumentTypeError(f"a phase is LEN:STEPS with two positive ints, got {item!r}")
        out.append({"train_len": int(length), "steps": int(steps)})
    if not out:
        raise argparse.ArgumentTypeError(f"--then takes at least one LEN:STEPS phase, got {text!r}")
    return out


if __name__ == "__main__":
    run()
