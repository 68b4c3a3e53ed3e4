"""Result files: JSON with the date, machine and command; PNG plots (matplotlib Agg); Markdown tables.

Every published number must be reproducible from one named command and a committed result file, so each JSON
carries `meta` = {date (UTC), command, git commit, machine (platform, CPU count, torch threads, torch version)}.

Dimensions: N tasks (rows and columns of a score matrix).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hope.training.report import run_meta


def _jsonable(x: Any) -> Any:
    """Plain-JSON view of results: tensors/numpy to lists, NaN/inf to None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_result(name: str, payload: dict[str, Any], out_dir: str | Path = "results") -> Path:
    """Write `<out_dir>/<name>.json` = {"benchmark": name, "meta": run_meta(), **payload}; return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc = {"benchmark": name, "meta": run_meta(), **_jsonable(payload)}
    _write_atomic(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Partial:
    """The finished units of a long benchmark run (one model, one (model, strategy) pair, ...), saved to
    `<out_dir>/<name>.partial.json` as each one ends, so an interrupted run goes on where it stopped.

    With `resume=True` the units of an earlier run are loaded, provided it had the same `config` (the budget,
    seed and data that make units comparable); otherwise `ValueError` names the differing fields. Without it an
    old partial file is started afresh (and the run says so). `finish()` deletes the file once the final result
    is written. Units are stored as plain JSON, so a resumed unit comes back with lists where a fresh one had
    tensors.
    """

    def __init__(self, name: str, out_dir: str | Path, config: dict[str, Any], resume: bool = False):
        self.path = Path(out_dir) / f"{name}.partial.json"
        self.config = _jsonable(config)
        self.units: dict[str, Any] = {}
        if not self.path.exists():
            return
        if not resume:
            print(f"{self.path} holds units of an interrupted run; starting afresh (pass --resume to go on)")
            return
        old = json.loads(self.path.read_text())
        if old.get("config") != self.config:
            keys = sorted(set(old.get("config", {})) | set(self.config))
            diff = {k: (old.get("config", {}).get(k), self.config.get(k)) for k in keys
                    if old.get("config", {}).get(k) != self.config.get(k)}
            raise ValueError(f"cannot resume from {self.path}: it was run with another configuration "
                             f"(field: (saved, now)) {diff}")
        self.units = old["units"]
        print(f"resuming from {self.path}: {len(self.units)} finished unit(s): {', '.join(self.units)}")

    def get(self, key: str) -> Any | None:
        """The saved result of unit `key`, or None when it has not run yet."""
        return self.units.get(key)

    def put(self, key: str, value: Any) -> Any:
        """Save unit `key` (written to disk at once); return the value as stored (plain JSON)."""
        self.units[key] = _jsonable(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps({"config": self.config, "units": self.units}, allow_nan=False) + "\n")
        return self.units[key]

    def finish(self) -> None:
        """The run is complete and written: drop the partial file."""
        self.path.unlink(missing_ok=True)


def replot(path: str | Path, plot: Callable[[dict[str, Any], Path], Any]) -> dict[str, Any]:
    """`--replot`: redraw the PNG beside the result file `path` from its JSON alone (`plot(doc, png_path)`);
    nothing is trained. Returns the document."""
    doc = json.loads(Path(path).read_text())
    plot(doc, Path(path).with_suffix(".png"))
    return doc


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub Markdown table; floats rounded to `digits`, None shown as '–'."""

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """`matplotlib.pyplot` on the headless Agg backend (benchmarks run on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120, **savefig: Any) -> Path:
    """Lay out `fig`, save it as a PNG at `path` (its folder made if missing), close it; return the path.
    `savefig` goes to `Figure.savefig` (e.g. `bbox_inches="tight"`)."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **savefig)
    pyplot().close(fig)
    return Path(path)


def publish(name: str, doc: dict[str, Any], out_dir: str | Path, plot: Callable[[Path], Any],
            partial: Partial | None = None) -> Path:
    """The outputs of a finished benchmark run: `<out_dir>/<name>.json` (`write_result`), the PNG beside it
    (`plot(png_path)`), the Markdown table `doc["table"]` as `<name>.md`; then the run's `partial` file is dropped
    and the table printed. Returns the JSON's path."""
    path = write_result(name, doc, out_dir)
    plot(path.with_suffix(".png"))
    path.with_suffix(".md").write_text(doc["table"] + "\n")
    if partial is not None:
        partial.finish()
    print(doc["table"])
    return path


def line_styles(labels: Sequence[str]) -> dict[str, dict[str, str]]:
    """Matplotlib style per label: "group / variant" labels get a colour per group and a dash per variant.

    Labels without " / ", or a set with a single variant, get `{}` (matplotlib's colour cycle).
    """
    split = {label: label.rpartition(" / ") for label in labels}
    groups = list(dict.fromkeys(g for g, sep, _ in split.values() if sep))
    variants = list(dict.fromkeys(v for _, sep, v in split.values() if sep))
    dashes = ["-", "--", ":", "-."]
    out = {}
    for label, (group, sep, variant) in split.items():
        out[label] = ({"color": f"C{groups.index(group) % 10}", "linestyle": dashes[variants.index(variant) % 4]}
                      if sep and len(variants) > 1 else {})
    return out


def plot_lines(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> Path:
    """One line per entry of `series` = {label: (x, y)}; saved as a PNG at `path`.

    Labels of the form "group / variant" (e.g. "HOPE / replay") get one colour per group and one line style per
    variant, so a dozen lines stay tellable apart; with more than six lines the legend sits beside the axes.
    """
    plt = pyplot()
    styles = line_styles(list(series))
    wide = len(series) > 6
    fig, ax = plt.subplots(figsize=(8.5 if wide else 6, 4))
    for label, (x, y) in series.items():
        ax.plot(list(x), [math.nan if v is None else v for v in y], marker="o", label=label, **styles[label])
    if logx:
        ax.set_xscale("log", base=2)
    elif all(float(v).is_integer() for x, _ in series.values() for v in x):  # counts: no ticks at 1.5
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if wide:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_bars(path: str | Path, categories: Sequence[str], series: dict[str, Sequence[float]], title: str,
              ylabel: str) -> Path:
    """Grouped bars: one group per category, one bar per entry of `series` = {label: values per category}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(categories) + 2), 4))
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, [math.nan if v is None else v for v in values], width, label=label)
    ax.set_xticks(range(len(categories)), list(categories))
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_matrices(path: str | Path, matrices: dict[str, Sequence[Sequence[float]]], tasks: Sequence[str],
                  title: str) -> Path:
    """Heat maps of score matrices R[i][j] (row: after training task i, column: task j), one panel per entry."""
    plt = pyplot()
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.8, 3.4), squeeze=False)
    for ax, (label, mat) in zip(axes[0], matrices.items()):
        im = ax.imshow(mat, cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=7)
        for i, row in enumerate(mat):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
