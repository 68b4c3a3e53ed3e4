"""Plot the optimizer comparison on language models: training loss against step and against training wall time.

    python -m experiments.optimizers.plot_lm experiments/optimizers/results/lm_optimizers.json   # re-plot a result

Dimensions: none (each run's curve is a list of [step, seconds, loss]).

One colour per optimizer, one line style per model. The per-step loss is that of one batch, so lines are a trailing
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
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on servers and in CI
    import matplotlib.pyplot as plt

    longest = max((len(r["curve"]) for r in results if r.get("curve")), default=1)
    window = max(1, longest // 50)
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if not r.get("curve"):
            continue
        steps, seconds, loss = zip(*r["curve"])
        smooth = trailing_mean(list(loss), window)
        label = f"{r['model']} / {r['optimizer']} (lr {r['lr']:.3g})" + ("" if r["status"] == "ok" else " ✗")
        style = dict(color=COLOURS.get(r["optimizer"]), linestyle=STYLES.get(r["model"], "-"), linewidth=1.2)
        ax_step.plot(steps, smooth, label=label, **style)
        ax_time.plot(seconds, smooth, **style)
    ax_step.set(xlabel="step", ylabel="training loss (nats / token)", title="loss vs step")
    ax_time.set(xlabel="training wall time (s, validation excluded)", title="loss vs wall time")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=7)
    fig.suptitle(f"{title}; trailing mean over {window} step(s)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", help="a JSON written by lm_compare_optimizers.py")
    p.add_argument("--png", default=None, help="output PNG (default: beside the JSON, same stem)")
    args = p.parse_args(argv)
    src = Path(args.result)
    doc = json.loads(src.read_text())
    if "results" not in doc:
        raise ValueError(f"{str(src)!r} has no 'results' list; is it a lm_compare_optimizers.py result?")
    cfg = doc.get("config", {})
    title = f"{doc.get('mode')}: {cfg.get('size')} preset, context {cfg.get('seq_len')}, {cfg.get('steps')} steps"
    png = plot_results(Path(args.png) if args.png else src.with_suffix(".png"), doc["results"], title)
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    main()
