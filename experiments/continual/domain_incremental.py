"""Domain-incremental language modelling: Shakespeare → KJV → Wikipedia → BBC News, one domain after the other.

    python -m experiments.continual.domain_incremental --tiny     # seconds, CPU (what the tests run)
    python -m experiments.continual.domain_incremental            # full mode (run time: continual/README.md)

Dimensions: N windows, T time (tokens per window).

Each model (Transformer++, Titans, Hope-Attention, HOPE at one size dial, so a matched parameter budget) is trained
on the four domains in turn with each strategy (plain sequential fine-tuning, reservoir replay, EWC), all with
the same steps, batch and learning rate. After each domain the held-out loss of every domain fills a row of
R (R[i][j] = test loss per byte on domain j after training on domains 0..i); `hope.eval.continual_metrics` with
`higher_is_better=False` turns it into average loss, BWT, FWT and forgetting. Training windows come from the
`train` split and evaluation windows from the `test` split of `hope.data.corpora.split_documents`.

Writes `<out>/domain_incremental.json`, `.png` (loss on the first domain after each stage) and `.md` (table);
`--replot <out>/domain_incremental.json` redraws the PNG from the JSON alone.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.common.cli import base_parser, configured, continual_flags, mode_name, parse_models
from experiments.common.data import check_fits, lm_task
from experiments.common.models import LABELS, build_model, build_models
from experiments.common.results import Partial, markdown_table, plot_lines, publish, replot
from experiments.common.train import Task, run_strategy, strategy_config

NAME = "domain_incremental"
DOMAINS = ("shakespeare", "kjv", "wikipedia", "bbc")
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "seq_len": 32, "steps": 3, "batch": 4, "n_eval": 4, "lr": 3e-3,
             "replay_capacity": 64, "replay_batch": 2, "ewc_strength": 100.0, "ewc_batches": 2},
    "cpu": {"size": "small", "seq_len": 256, "steps": 100, "batch": 8, "n_eval": 32, "lr": 1e-3,
            "replay_capacity": 512, "replay_batch": 4, "ewc_strength": 1000.0, "ewc_batches": 8},
    "full": {"size": "small", "seq_len": 256, "steps": 300, "batch": 16, "n_eval": 64, "lr": 1e-3,
             "replay_capacity": 1024, "replay_batch": 8, "ewc_strength": 1000.0, "ewc_batches": 16},
}


def build_tasks(corpora: Mapping[str, Sequence], seq_len: int, n_train: int, n_eval: int, seed: int) -> list[Task]:
    """One language-modelling task per domain, in the order of `corpora` (domain name -> Documents).

    Raises `ValueError` for no domains or a domain too small for the window length.
    """
    if not corpora:
        raise ValueError("domain-incremental needs at least one domain, got none")
    from hope.data.corpora import split_documents

    tasks = []
    for i, (domain, docs) in enumerate(corpora.items()):
        if not docs:
            raise ValueError(f"domain {domain!r} has no documents")
        parts = split_documents(docs)
        tasks.append(lm_task(domain, parts["train"], parts["test"] or parts["val"], seq_len, n_train, n_eval,
                             seed=seed * 1000 + i))
    return tasks


def load_domains(names: Sequence[str] = DOMAINS) -> dict[str, list]:
    from hope.data.corpora import load_corpus

    return {name: load_corpus(name) for name in names}


def run(argv: Sequence[str] | None = None, corpora: Mapping[str, Sequence] | None = None) -> dict[str, Any]:
    """Parse flags, train every (model, strategy) pair, write the outputs; return the result document."""
    args = parser().parse_args(argv)
    if args.replot:  # redraw the figure of a result file, nothing trained
        return replot(args.replot, plot)
    with configured(args):
        return _run(args, corpora)


def _run(args: argparse.Namespace, corpora: Mapping[str, Sequence] | None) -> dict[str, Any]:
    mode = dict(MODES[mode_name(args)])
    size = args.size or mode["size"]
    steps = args.steps or mode["steps"]
    corpora = corpora if corpora is not None else load_domains(args.domains.split(","))
    tasks = build_tasks(corpora, mode["seq_len"], steps * mode["batch"], mode["n_eval"], args.seed)
    built, skipped = build_models(parse_models(args.models), size, args.seed, args.device)
    check_fits(built[0].model, mode["seq_len"])

    partial = Partial(NAME, args.out, {"mode": mode_name(args), **mode, "steps": steps, "size": size,
                                       "seed": args.seed, "tasks": [t.name for t in tasks]}, args.resume)
    results: dict[str, Any] = {}
    rows = []
    for entry in built:
        results[entry.name] = {"params": entry.params, "strategies": {}}
        for strategy in args.strategies.split(","):
            unit = run_strategy(partial, f"{entry.name}/{strategy}", f"{entry.name} / {strategy}",
                                functools.partial(build_model, entry.name, size, args.seed, args.device),  # same init
                                tasks, strategy_config(mode, steps, strategy, args.seed), higher_is_better=False)
            results[entry.name]["strategies"][strategy] = unit
            if "diverged" in unit:
                rows.append([LABELS[entry.name], strategy, entry.params, unit["diverged"]] + [None] * 5)
                continue
            out, metrics = unit, unit["metrics"]
            rows.append([LABELS[entry.name], strategy, entry.params, metrics["average_accuracy"],
                         metrics["backward_transfer"], metrics["average_forgetting"], metrics["forward_transfer"],
                         metrics["average_incremental_accuracy"], f"{out['seconds']:.1f}"])

    headers = ["model", "strategy", "params", "final avg loss", "BWT", "forgetting", "FWT", "avg incr. loss", "s"]
    table = markdown_table(headers, rows)
    doc = {"mode": mode_name(args), "size": size, "tasks": [t.name for t in tasks],
           "config": {**mode, "steps": steps}, "score": "test loss per byte (nats), lower is better",
           "models": results, "skipped": skipped, "table": table}
    publish(NAME, doc, args.out, lambda png: plot(doc, png), partial)
    return doc


def plot(doc: Mapping[str, Any], path: str | Path) -> Path:
    """The first domain's test loss after each domain, one line per (model, strategy); diverged runs left out."""
    first, n = doc["tasks"][0], len(doc["tasks"])
    curves = {f"{LABELS.get(name, name)} / {strategy}": (range(1, n + 1), [r[0] for r in unit["R"]])
              for name, entry in doc["models"].items() for strategy, unit in entry["strategies"].items()
              if "diverged" not in unit}
    return plot_lines(path, curves, f"Loss on {first} while learning later domains", "domains learned",
                      f"{first} test loss (nats/byte)")


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated corpora, in training order")
    return continual_flags(p, "domain")


if __name__ == "__main__":
    run()
