"""The command-line flags every benchmark shares (`--mode`, `--models`, `--size`, `--seed`, `--out`, `--device`, ...).

Every benchmark has three budgets, chosen with `--mode`:

- `tiny`: seconds on a CPU, to check the plumbing (what the tests run); its numbers mean nothing;
- `cpu`: about an hour per benchmark on a 2-core CPU, the size of the results committed in this repository;
- `full`: the intended scale, for a GPU (`--device cuda`).

Dimensions: none (flags only).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

from experiments.common.models import MODEL_NAMES

MODE_NAMES = ("tiny", "cpu", "full")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=MODE_NAMES, default="full",
                   help="budget: tiny (seconds, smoke run), cpu (about an hour on 2 CPU cores), full (GPU scale)")
    p.add_argument("--tiny", action="store_true", help="same as --mode tiny")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated presets to compare")
    p.add_argument("--size", default=None, help="preset size (tiny/small/base or a depth); default: by mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="directory for the JSON, PNG and Markdown outputs")
    p.add_argument("--device", default="cpu", help="torch device for the models (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --tiny, else torch's)")
    p.add_argument("--resume", action="store_true",
                   help="go on from <out>/<benchmark>.partial.json, skipping the units an interrupted run finished")
    return p


def mode_name(args: argparse.Namespace) -> str:
    """The budget chosen on the command line: `--tiny` wins over `--mode` (kept for old command lines)."""
    return "tiny" if args.tiny else args.mode


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if not names or bad:
        raise ValueError(f"--models must list presets from {MODEL_NAMES}, got {text!r}")
    return names


@contextlib.contextmanager
def configured(args: argparse.Namespace) -> Iterator[None]:
    """Apply the process-wide flags (threads, seed) for the duration of a run, then restore the thread count.

    Tiny runs default to one thread: their matrices are too small to gain from more, and on a busy 2-core machine
    two spinning threads per process made them ~25x slower (measured 0.04 s vs 1.8 s per step).
    """
    before = torch.get_num_threads()
    threads = args.threads or (1 if mode_name(args) == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    try:
        yield
    finally:
        torch.set_num_threads(before)
