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
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from experiments.common.cli import base_parser, configured, mode_name, parse_models
from experiments.common.models import available_models
from experiments.common.results import Partial
from experiments.memory_tasks.harness import sweep, write_sweep

NAME = "passkey"
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "vocab": 64, "digits": 2, "train_len": 32, "test_lens": [32, 64], "steps": 3,
             "batch": 8, "n_test": 8, "eval_batch": 8, "lr": 3e-3},
    "cpu": {"size": "small", "vocab": 128, "digits": 5, "train_len": 128, "test_lens": [128, 1024, 4096, 16384],
            "steps": 1000, "batch": 16, "n_test": 25, "eval_batch": 1, "lr": 1e-3},
    "full": {"size": "small", "vocab": 128, "digits": 5, "train_len": 512, "test_lens": [1024, 2048, 4096, 8192,
             16384], "steps": 2000, "batch": 16, "n_test": 50, "eval_batch": 1, "lr": 1e-3},
}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    with configured(args):
        from hope.data.synthetic import DIGIT0, passkey_task

        mode = dict(MODES[mode_name(args)])
        mode["size"], mode["steps"] = args.size or mode["size"], args.steps or mode["steps"]
        mode["device"] = args.device
        names, skipped = available_models(parse_models(args.models))
        digits = torch.arange(DIGIT0, DIGIT0 + 10)  # [K] the ten digit tokens

        def make(length: int, n: int, seed: int):
            return passkey_task(n, context_len=length, n_digits=mode["digits"], vocab_size=mode["vocab"], seed=seed)

        partial = Partial(NAME, args.out, {"mode": mode_name(args), **mode, "seed": args.seed}, args.resume)
        results = sweep(names, make, mode["train_len"], mode["test_lens"], mode["vocab"], digits, mode, args.seed,
                        partial)
        doc = {"mode": mode_name(args), "config": mode, "train_setting": mode["train_len"],
               "test_settings": mode["test_lens"], "score": "exact match (all digits right) and digit accuracy",
               "results": results, "skipped": skipped}
        return write_sweep(NAME, doc, mode["test_lens"], "tokens", args.out, logx=True, partial=partial)


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    return p


if __name__ == "__main__":
    run()
