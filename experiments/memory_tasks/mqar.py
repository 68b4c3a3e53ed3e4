"""Multi-query associative recall (MQAR, Arora et al. 2023): recall the values of many keys seen in context.

    python -m experiments.memory_tasks.mqar --tiny       # seconds, CPU (what the tests run)
    python -m experiments.memory_tasks.mqar              # full mode (run time: memory_tasks/README.md)

Dimensions: N examples, D key-value pairs in context, Q queries, T = 2(D + Q) − 1 time.

Each model is trained on sequences of `train_pairs` key-value pairs followed by queries (all keys, in a random
order; `hope.data.synthetic.mqar_task`) and tested on held-out sequences with fewer and more pairs. Scored:
the value after each query key (argmax over the value tokens); exact match = every query of a sequence right.
The memory load D at which a fixed-size state stops recalling separates recurrent memories from attention, whose
cache grows with D. Writes `<out>/mqar.json`, `.png` and `.md`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from experiments.common.cli import configured
from experiments.memory_tasks.harness import run_sweep, sweep_mode, sweep_parser

NAME = "mqar"
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "vocab": 64, "train_pairs": 4, "test_pairs": [2, 4, 8], "steps": 3, "batch": 8,
             "n_test": 8, "eval_batch": 8, "lr": 3e-3},
    "cpu": {"size": "small", "vocab": 128, "train_pairs": 8, "test_pairs": [4, 8, 16, 32], "steps": 2000,
            "batch": 32, "n_test": 128, "eval_batch": 32, "lr": 1e-3},
    "full": {"size": "small", "vocab": 256, "train_pairs": 16, "test_pairs": [8, 16, 32, 64], "steps": 3000,
             "batch": 32, "n_test": 256, "eval_batch": 32, "lr": 1e-3},
}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    with configured(args):
        from hope.data.synthetic import mqar_task

        mode = sweep_mode(MODES, args)
        vocab = mode["vocab"]
        values = torch.arange(1 + (vocab - 1) // 2, vocab)  # [K] the value tokens of mqar_task

        def make(pairs: int, n: int, seed: int):
            return mqar_task(n, n_pairs=pairs, vocab_size=vocab, seed=seed)

        return run_sweep(NAME, args, mode, make, mode["train_pairs"], mode["test_pairs"], vocab, values, "pairs",
                         "exact match (all queries right) and token accuracy")


def parser() -> argparse.ArgumentParser:
    return sweep_parser(__doc__.splitlines()[0])


if __name__ == "__main__":
    run()
