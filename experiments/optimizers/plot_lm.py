"""Plot the optimizer comparison on language models: training loss against step and against training wall time.

    python -m experiments.optimizers.plot_lm experiments/optimizers/results/lm_optimizers.json   # re-plot a result
    python -m experiments.optimizers.plot_lm results/lm_sweep/*.json --png sweep.png           # several in one plot

Dimensions: none (each run's curve is a list of [step, seconds, loss]).

One colour per optimizer, one line style per model; in a sweep, a pair's learning rates go from faint (smallest) to
solid (largest). The per-step loss is that of one batch, so lines are a trailing
mean over `window` steps (1/50 of the run, at least 1: raw for short runs); the window is printed in the title.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLOURS = {"adamw": "tab:blue", "muon": "tab:orange", "m3": "tab:green", "deep_momentum": "tab:red"}
STYLES = {"transformer": "-", "hope": "--", "titans": ":", "hope_attention": "-."}


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """y_i = mean(values[max(0, i − window + 1) : i + 1]); the first points average what exists so far."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_results(path: str | Path, results: list[dict[str, Any]], title: str) -> Path:
    """Two panels (loss vs step, loss vs training wall time) for every run with a curve; saved as a PNG at `path`."""
    from experiments.common.results import pyplot, save_figure

    longest = max((len(r["curve"]) for r in results if r.get("curve")), default=1)
    window = max(1, longest // 50)
    fig, (ax_step, ax_time) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    drawn = [r for r in results if r.get("curve")]
    for r in drawn:
        steps, seconds, loss = zip(*r["curve"])
        smooth = trailing_mean(list(loss), window)
        label = f"{r['model']} / {r['optimizer']} (lr {r['lr']:.3g})" + ("" if r["status"] == "ok" else " ✗")
        lrs = sorted({q["lr"] for q in drawn if (q["model"], q["optimizer"]) == (r["model"], r["optimizer"])})
        alpha = 0.25 + 0.75 * (lrs.index(r["lr"]) + 1) / len(lrs)
        style = dict(color=COLOURS.get(r["optimizer"]), linestyle=STYLES.get(r["model"], "-"), linewidth=1.2,
                     alpha=alpha)
        ax_step.plot(steps, smooth, **style)
        ax_time.plot(seconds, smooth, label=label, **style)
    ax_step.set(xlabel="step", ylabel="training loss (nats / token)", title="loss vs step")
    ax_time.set(xlabel="training wall time (s, validation excluded)", title="loss vs wall time")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: a sweep has many lines
    fig.suptitle(f"{title}; trailing mean over {window} step(s)", fontsize=9)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files written by lm_compare_optimizers.py (runs are pooled)")
    p.add_argument("--png", default=None, help="output PNG (default: beside the first JSON, same stem)")
    args = p.parse_args(argv)
    runs, titles = [], []
    for src in map(Path, args.results):
        doc = json.loads(src.read_text())
        if "results" not in doc:
            raise ValueError(f"{str(src)!r} has no 'results' list; is it a lm_compare_optimizers.py result?")
        runs += doc["results"]
        cfg = doc.get("config", {})
        titles.append(f"{cfg.get('size')} preset, context {cfg.get('seq_len')}, batch {cfg.get('batch_size')}, "
                      f"{cfg.get('steps')} steps")
    png = Path(args.png) if args.png else Path(args.results[0]).with_suffix(".png")
    plot_results(png, runs, " | ".join(sorted(set(titles))))
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    main()
