"""The command-line flags every benchmark shares (`--mode`, `--models`, `--size`, `--seed`, `--out`, `--device`, ...).

Every benchmark has three budgets, chosen with `--mode`:

- `tiny`: seconds on a CPU, to check the plumbing (what the tests run); its numbers mean nothing;
- `cpu`: about an hour per benchmark on a 2-core CPU, the size of the results committed in this repository;
- `full`: the intended scale, for a GPU (`--device cuda`).

The speed benchmarks of `experiments/lm_compare` (throughput, decode) have two, `--tiny` or full: `speed_parser`,
`speed_mode`, `out_dir` and `command_line` are theirs (the last two also serve compare and the optimizer runs).

Dimensions: none (flags only).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.common.models import MODEL_NAMES
from experiments.common.train import STRATEGIES

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


def continual_flags(p: argparse.ArgumentParser, unit: str) -> argparse.ArgumentParser:
    """Add the flags of a continual-learning benchmark: `--strategies`, `--steps` (per `unit`, e.g. "task") and
    `--replot`; returns `p`."""
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"subset of {STRATEGIES}")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per {unit} (default: by mode)")
    p.add_argument("--replot", metavar="JSON", default=None, help="only redraw the PNG beside this result file")
    return p


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch CPU threads (None: as they are), then restore the thread count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def configured(args: argparse.Namespace) -> Iterator[None]:
    """Apply the process-wide flags (threads, seed) for the duration of a run, then restore the thread count.

    Tiny runs default to one thread: their matrices are too small to gain from more, and on a busy 2-core machine
    two spinning threads per process made them ~25x slower (measured 0.04 s vs 1.8 s per step).
    """
    with torch_threads(args.threads or (1 if mode_name(args) == "tiny" else None)):
        torch.manual_seed(args.seed)
        yield


def speed_parser(description: str, models: str) -> argparse.ArgumentParser:
    """The flags the speed benchmarks share: `--tiny`, `--models` (default `models`), `--size`, `--threads`,
    `--seed` and `--out`; each benchmark adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--models", default=models, help="comma-separated presets")
    p.add_argument("--size", default=None, help="preset size (default: small; tiny with --tiny)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; 1 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: results/, results/tiny/ with --tiny)")
    return p


def speed_mode(modes: Mapping[str, dict[str, Any]], args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    """A copy of `modes["tiny"]` with `--tiny`, else of `modes["full"]`, with the flags named in `keys` laid over it
    where the command line gives them (not None); a `size` of digits is a depth (an int)."""
    mode = dict(modes["tiny" if args.tiny else "full"])
    for key in keys:
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    if isinstance(mode["size"], str) and mode["size"].isdigit():
        mode["size"] = int(mode["size"])  # a depth
    return mode


def out_dir(args: argparse.Namespace, default: Path) -> Path:
    """`--out` if given, else `default`, or `default/tiny` with `--tiny` (a smoke run never overwrites a result)."""
    return Path(args.out) if args.out else default / ("tiny" if args.tiny else "")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command of a run for its result file: `python -m <module>` and `argv` (None: this process's arguments)."""
    return " ".join([f"python -m {module}", *(list(argv) if argv is not None else sys.argv[1:])])
