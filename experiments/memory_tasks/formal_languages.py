"""Formal-language recognition of arXiv:2512.24695 Table 5: train on short strings (Bin0), test on long (Bin1).

    python -m experiments.memory_tasks.formal_languages --tiny      # seconds, CPU (what the tests run)
    python -m experiments.memory_tasks.formal_languages             # full mode (run time: memory_tasks/README.md)
    python -m experiments.memory_tasks.formal_languages --models hope --memory negative_eigenvalues=true
                                                                    # a switch of HOPE's core (the ablations)

Dimensions: N examples, T time (string length + 1, right-padded).

For each language (Parity, (aa)*, (abab)*, aⁿbⁿ, aⁿbⁿcⁿ, Shuffle-2) each model is trained on strings of length
1–50 (Bin0) and scored on held-out strings of length 1–50 and 51–100 (Bin1): after `s_1 … s_n QUERY` it must put
more mass on ACCEPT or REJECT, whichever is right (`hope.data.synthetic.formal_language_task`; half positive,
negatives are near misses). The result table sets our numbers next to the paper's Table 5. `--memory` sets
`MemoryConfig` fields of HOPE's self-modifying core (docs/design.md §4.1: `negative_eigenvalues`,
`proj_chunk_size`, `momentum`, …); the result file and the table record them. `--curriculum 10:200` first trains
200 steps on strings of length 1–10, then the mode's steps on Bin0; `--lr` sets the learning rate.

Caveat: the paper (after Irie et al. 2023) scores a different protocol, so the comparison is of trends (who
generalises to Bin1) rather than of digits; on our balanced recognition task chance is 50%, and 0% is impossible.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from experiments.common.cli import base_parser, configured, mode_name, parse_models
from experiments.common.models import LABELS, available_models, build_model
from experiments.common.results import Partial, markdown_table, plot_bars, publish
from experiments.common.train import Diverged
from experiments.memory_tasks.harness import (
    MEMORY_MODELS,
    add_memory_flag,
    check_memory_models,
    score,
    sweep_mode,
    train_on_synthetic,
)

NAME = "formal_languages"
# arXiv:2512.24695 Table 5, accuracy (%) Bin0 / Bin1 (transcribed in /work/shared/paper_notes.md §5).
_ALL100 = {lang: (100.0, 100.0) for lang in ("parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2")}
_COUNTERS = {"anbn": (100.0, 100.0), "anbncn": (100.0, 100.0), "shuffle2": (100.0, 100.0)}
PAPER_TABLE5: dict[str, dict[str, tuple[float, float]]] = {
    "LSTM": _ALL100,
    "Transformer": {"parity": (46.4, 0.0), "aa_star": (0.0, 0.0), "abab_star": (0.0, 0.0), **_COUNTERS},
    "Linear": {"parity": (78.1, 0.0), "aa_star": (0.0, 0.0), "abab_star": (0.0, 0.0), **_COUNTERS},
    "DeltaNet": {"parity": (98.2, 10.1), "aa_star": (0.0, 0.0), "abab_star": (0.0, 0.0), **_COUNTERS},
    "SRWM": _ALL100,
    "Hope": _ALL100,
}
TITLES = {"parity": "Parity", "aa_star": "(aa)*", "abab_star": "(abab)*", "anbn": "aⁿbⁿ", "anbncn": "aⁿbⁿcⁿ",
          "shuffle2": "Shuffle-2"}
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "steps": 3, "batch": 8, "n_test": 16, "lr": 3e-3, "languages": "parity,anbn"},
    "cpu": {"size": "tiny", "steps": 400, "batch": 32, "n_test": 200, "lr": 3e-3, "languages": ",".join(TITLES)},
    "full": {"size": "small", "steps": 2000, "batch": 32, "n_test": 500, "lr": 1e-3,
             "languages": ",".join(TITLES)},
}


def run_language(language: str, names: Sequence[str], mode: dict[str, Any], seed: int,
                 partial: Partial | None = None) -> dict[str, Any]:
    """Train each model on Bin0 strings of `language`; accuracy (%) on held-out Bin0 and Bin1. With `partial`,
    each (language, model) result is saved as it ends and those it already holds are not run again."""
    from hope.data.synthetic import ACCEPT, FORMAL_BINS, FORMAL_VOCAB_SIZE, REJECT, formal_language_task

    n_train = mode["steps"] * mode["batch"]
    train = formal_language_task(language, n_train, FORMAL_BINS["bin0"], seed=seed)
    tests = {b: formal_language_task(language, mode["n_test"], FORMAL_BINS[b], seed=seed + 1 + i)
             for i, b in enumerate(("bin0", "bin1"))}
    candidates = torch.tensor([ACCEPT, REJECT])
    phases: list[tuple[Any, Any, int]] = [(train, tests["bin0"], mode["steps"])]
    if mode.get("curriculum"):  # first the short strings, then Bin0
        short, n = mode["curriculum"]["max_len"], mode["curriculum"]["steps"]
        phases.insert(0, (formal_language_task(language, n * mode["batch"], (1, short), seed=seed + 100),
                          formal_language_task(language, mode["n_test"], (1, short), seed=seed + 101), n))
    out: dict[str, Any] = {}
    for name in names:
        if partial is not None and partial.get(f"{language}/{name}") is not None:
            out[name] = partial.get(f"{language}/{name}")
            continue
        extra = {"memory": mode["memory"]} if mode.get("memory") and name in MEMORY_MODELS else {}
        try:
            (first, held, n), *then = phases
            trained = train_on_synthetic(name, mode["size"], FORMAL_VOCAB_SIZE, first, held, n, mode["batch"],
                                         mode["lr"], seed, mode.get("device", "cpu"), then=then, **extra)
        except Diverged as err:  # recorded and shown as such; the other models still run
            out[name] = {"params": build_model(name, mode["size"], seed, vocab_size=FORMAL_VOCAB_SIZE).params,
                         "bin0": None, "bin1": None, "diverged": str(err)}
        else:
            acc = {b: 100.0 * score(trained.model, t.inputs, t.targets, candidates)["token_accuracy"]
                   for b, t in tests.items()}
            out[name] = {"params": trained.params, "bin0": acc["bin0"], "bin1": acc["bin1"],
                         "train_seconds": trained.train["seconds"],
                         "final_train_loss": trained.train["train_loss"][-1][-1]}
        if partial is not None:
            partial.put(f"{language}/{name}", out[name])
        print(f"{TITLES[language]:>9} {name:>15}: " + (out[name].get("diverged") or
                                                         f"Bin0 {out[name]['bin0']:.1f}  Bin1 {out[name]['bin1']:.1f}"))
    return out


def _cell(r: dict[str, Any]) -> str:
    return "diverged" if r.get("diverged") else f"{r['bin0']:.1f} / {r['bin1']:.1f}"


def comparison_table(results: dict[str, dict[str, Any]], languages: Sequence[str],
                     memory: dict[str, Any] | None = None) -> str:
    """Our rows (`ours: <model>`) under the paper's Table 5 rows, cells "Bin0 / Bin1" in %; `memory` (the
    `--memory` fields) is shown beside the models it applies to."""
    rows = [[f"paper: {m}"] + [f"{v[lang][0]:.1f} / {v[lang][1]:.1f}" for lang in languages]
            for m, v in PAPER_TABLE5.items()]
    models = list(next(iter(results.values()))) if results else []
    for m in models:
        note = f" ({', '.join(f'{k}={v}' for k, v in memory.items())})" if memory and m in MEMORY_MODELS else ""
        rows.append([f"ours: {LABELS[m]}{note}"] + [_cell(results[lang][m]) for lang in languages])
    return markdown_table(["model"] + [TITLES[lang] for lang in languages], rows)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    with configured(args):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    mode = sweep_mode(MODES, args)
    mode["memory"] = mode.get("memory", {})  # parsed by sweep_mode; {} recorded when --memory is not given
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr!r}")
        mode["lr"] = args.lr
    if args.curriculum is not None:
        mode["curriculum"] = args.curriculum
    names = parse_models(args.models)
    check_memory_models(mode, names, args.models)
    languages = [lang for lang in (args.languages or mode["languages"]).split(",") if lang]
    bad = [lang for lang in languages if lang not in TITLES]
    if not languages or bad:
        raise ValueError(f"--languages must list languages from {tuple(TITLES)}, got {args.languages!r}")
    names, skipped = available_models(names)
    mode["languages"] = ",".join(languages)  # recorded as run; units are per language, so resume needs no match
    budget = {k: v for k, v in mode.items() if k != "languages"}
    partial = Partial(NAME + args.tag, args.out, {"mode": mode_name(args), **budget, "seed": args.seed}, args.resume)
    results = {lang: run_language(lang, names, mode, args.seed, partial) for lang in languages}
    table = comparison_table(results, languages, mode["memory"])
    doc = {"mode": mode_name(args), "config": mode, "score": "recognition accuracy (%) Bin0 / Bin1",
           "paper_table5": PAPER_TABLE5, "results": results, "skipped": skipped, "table": table}
    series = {f"{LABELS[m]} {b}": [results[lang][m][b] for lang in languages] for m in names for b in ("bin0", "bin1")}
    publish(NAME + args.tag, doc, args.out, lambda png: plot_bars(
        png, [TITLES[lang] for lang in languages], series,
        "Formal languages: trained on Bin0 (1-50), tested on Bin0 and Bin1 (51-100)", "accuracy (%)"), partial)
    return doc


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--languages", default=None, help=f"comma-separated subset of {tuple(TITLES)}")
    p.add_argument("--steps", type=int, default=None, help="training steps per language and model")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the mode's)")
    p.add_argument("--curriculum", type=_curriculum, default=None, metavar="LEN:STEPS",
                   help="first train STEPS steps on strings of length 1-LEN (LEN <= 50), then the mode's steps on Bin0")
    add_memory_flag(p)
    p.add_argument("--tag", default="", help="suffix of the result files (formal_languages<tag>.json)")
    return p


def _curriculum(text: str) -> dict[str, int]:
    """`"10:200"` → {"max_len": 10, "steps": 200}: a first phase on strings of length 1–10, inside Bin0."""
    length, sep, steps = text.partition(":")
    if not (sep and length.isdigit() and steps.isdigit() and 1 <= int(length) <= 50 and int(steps) >= 1):
        raise argparse.ArgumentTypeError(f"--curriculum is LEN:STEPS with 1 <= LEN <= 50 and STEPS >= 1, got {text!r}")
    return {"max_len": int(length), "steps": int(steps)}


if __name__ == "__main__":
    run()
