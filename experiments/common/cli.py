"""The command-line flags every benchmark shares (`--tiny`, `--models`, `--size`, `--seed`, `--out`, `--threads`)."""

from __future__ import annotations

import argparse

import torch

from experiments.common.models import MODEL_NAMES


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long CPU smoke run (what the tests use)")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated presets to compare")
    p.add_argument("--size", default=None, help="preset size (tiny/small/base or a depth); default: by mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="directory for the JSON, PNG and Markdown outputs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if not names or bad:
        raise ValueError(f"--models must list presets from {MODEL_NAMES}, got {text!r}")
    return names


def setup(args: argparse.Namespace) -> None:
    """Apply the process-wide flags (threads, seed) before any model is built."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
