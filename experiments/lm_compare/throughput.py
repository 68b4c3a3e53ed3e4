"""Training throughput: tokens/s of one forward + backward + AdamW step, each model against Transformer++.

    python -m experiments.lm_compare.throughput --tiny     # seconds (what the tests run)
    python -m experiments.lm_compare.throughput            # small preset, context 512, batch 8, 2 threads

Dimensions: B batch, T time (context), V vocabulary.

Models have random weights and see random byte ids: the cost of a step does not depend on what was learned.
Every model is built first, then the models take their steps in turn (round-robin: one step of each, then the
next round), so a change in the load of a shared machine hits all of them alike; the ratio to Transformer++ is
taken within this one run. A model's first step (untimed) must give a finite loss and finite gradients, or it is
not timed. Reported: the median over the timed rounds (after that checked step and `--warmup` more untimed
rounds), fp32, `torch.set_num_threads(2)` by default, and the load averages before and after
(`os.getloadavg()`). Writes `<out>/throughput.json`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments.common.models import LABELS, MODEL_NAMES, build_models
from experiments.common.results import markdown_table, write_result

NAME = "throughput"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "seq_len": 32, "batch": 2, "warmup": 0, "steps": 2, "threads": 1},
    "full": {"size": "small", "seq_len": 512, "batch": 8, "warmup": 0, "steps": 3, "threads": 2},
}


class Trainee:
    """A model with its AdamW optimizer and a fixed batch of random ids `[B, T + 1]`."""

    def __init__(self, name: str, model: torch.nn.Module, params: int, batch: int, seq_len: int, seed: int) -> None:
        self.name, self.model, self.params = name, model, params
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=g)  # [B, T+1]
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        self.times: list[float] = []

    def step(self, check: bool = False) -> float:
        """One training step (forward, next-token cross-entropy, backward, AdamW); returns the loss. With `check`,
        a non-finite loss or gradient raises before the optimizer step: never time a broken model."""
        x, y = self.ids[:, :-1], self.ids[:, 1:]  # [B, T]
        logits = self.model(x).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if check:
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            if not torch.isfinite(loss) or bad:
                value = float(loss.detach())
                raise RuntimeError(f"model {self.name!r}: loss {value}, non-finite gradients in {bad[:5]}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def measure(trainees: list[Trainee], warmup: int, steps: int) -> None:
    """Round-robin: each round gives every model one step; rounds after the first `warmup` are timed."""
    for r in range(warmup + steps):
        for tr in trainees:
            t0 = time.perf_counter()
            tr.step()
            if r >= warmup:
                tr.times.append(time.perf_counter() - t0)
            print(f"  round {r}: {tr.name} {time.perf_counter() - t0:.2f} s", flush=True)


def summarize(trainees: list[Trainee], tokens_per_step: int) -> dict[str, dict[str, Any]]:
    """Per model: parameters, step times, median step, tokens/s and the ratio to Transformer++ (if measured)."""
    out = {}
    for tr in trainees:
        med = statistics.median(tr.times)
        out[tr.name] = {"params": tr.params, "step_s": tr.times, "median_step_s": med,
                        "tokens_per_s": tokens_per_step / med}
    ref = out.get("transformer")
    for r in out.values():
        r["ratio_vs_transformer"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return out


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    mode = dict(MODES["tiny" if args.tiny else "full"])
    for key in ("size", "seq_len", "batch", "warmup", "steps", "threads"):
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    if isinstance(mode["size"], str) and mode["size"].isdigit():
        mode["size"] = int(mode["size"])  # a depth
    if mode["steps"] < 1 or mode["warmup"] < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {mode['steps']} and {mode['warmup']}")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    before = torch.get_num_threads()
    torch.set_num_threads(mode["threads"])
    try:
        built, skipped = build_models(names, mode["size"], args.seed)
        trainees = [Trainee(b.name, b.model.train(), b.params, mode["batch"], mode["seq_len"], args.seed)
                    for b in built]
        for tr in trainees:
            tr.step(check=True)  # untimed: also pays the one-off costs (allocations, AdamW state)
        load_start = list(os.getloadavg())
        measure(trainees, mode["warmup"], mode["steps"])
        load_end = list(os.getloadavg())
    finally:
        torch.set_num_threads(before)
    results = summarize(trainees, mode["batch"] * mode["seq_len"])
    rows = [[LABELS[n], r["params"] / 1e6, round(r["median_step_s"], 3), round(r["tokens_per_s"]),
             r["ratio_vs_transformer"]] for n, r in results.items()]
    table = markdown_table(["model", "params (M)", "median step (s)", "tokens/s", "vs Transformer++"], rows)
    doc = {
        "command": " ".join(["python -m experiments.lm_compare.throughput",
                             *(list(argv) if argv is not None else sys.argv[1:])]),
        "mode": "tiny" if args.tiny else "full", "config": mode, "dtype": "float32",
        "note": "random weights and random ids (speed only); models stepped round-robin; median of the timed steps; "
        "shared machine: see loadavg_start/end",
        "loadavg_start": load_start, "loadavg_end": load_end,
        "results": results, "skipped": skipped, "table": table,
    }
    out = Path(args.out) if args.out else DEFAULT_OUT / ("tiny" if args.tiny else "")
    path = write_result(NAME, doc, out)
    print(table)
    print(f"wrote {path}")
    return doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated presets")
    p.add_argument("--size", default=None, help="preset size (default: small; tiny with --tiny)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="context T (default 512)")
    p.add_argument("--batch", type=int, default=None, help="batch B (default 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds after the checked one (default 0)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; 1 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: results/, results/tiny/ with --tiny)")
    return p


if __name__ == "__main__":
    run()
