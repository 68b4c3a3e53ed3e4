"""The command-line flags every benchmark shares (`--tiny`, `--models`, `--size`, `--seed`, `--out`, `--device`, ...).

Dimensions: none (flags only).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

from experiments.common.models import MODEL_NAMES


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long CPU smoke run (what the tests use)")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated presets to compare")
    p.add_argument("--size", default=None, help="preset size (tiny/small/base or a depth); default: by mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="directory for the JSON, PNG and Markdown outputs")
    p.add_argument("--device", default="cpu", help="torch device for the models (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 with --tiny, else torch's)")
    return p


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
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    try:
        yield
    finally:
        torch.set_num_threads(before)
