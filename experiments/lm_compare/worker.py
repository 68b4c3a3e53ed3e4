"""One training run of `compare.py`, in its own process so that its peak memory is its own.

    python -m experiments.lm_compare.worker --out run/result.json -- experiment=hope_small trainer.max_steps=600

Dimensions: none (it trains through `hope.training.run.run`, the job behind `python train.py`).

Composes `configs/train.yaml` with the given overrides exactly as `python train.py <overrides>` would (outputs
under the directory of `--out`, the token cache shared with every other run), adds a `StepTimer` callback, trains,
and writes one JSON: the final metrics, the loss curves read back from the CSV logger, the median training-step
time, the process's peak resident memory (`ru_maxrss`) and its wall time. A model whose core is not implemented
in this checkout is written as `status: "unavailable"` with the reason instead of failing the comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from experiments.common.trainer import compose_train, place_run


class StepTimer(Callback):
    """Wall time of every training step (forward, backward, optimizer step), written to `path` as JSON at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.times: list[float] = []
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.times))


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def compose(overrides: Sequence[str], run_dir: Path):
    """The config of `python train.py <overrides>`, with outputs in `run_dir` and a `StepTimer` callback."""
    return place_run(compose_train(overrides), run_dir,
                     step_timer={"_target_": f"{__name__}.StepTimer", "path": str(run_dir / "step_times.json")})


def read_curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """[step, value] pairs of train/loss, val/loss and val/bpb from the CSV logger's metrics.csv files."""
    keys = {"train_loss": "train/loss", "val_loss": "val/loss", "val_bpb": "val/bpb"}
    curves: dict[str, dict[int, float]] = {name: {} for name in keys}
    for path in sorted(run_dir.rglob("metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for name, key in keys.items():
                    if row.get(key):
                        curves[name][int(row["step"])] = float(row[key])
    return {name: [[step, v] for step, v in sorted(points.items())] for name, points in curves.items()}


def train(overrides: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """Train one variant; return its metrics, curves, step times, peak memory and wall time."""
    from hope.training.run import run

    cfg = compose(overrides, run_dir)
    t0 = time.perf_counter()
    metrics = run(cfg)
    wall = time.perf_counter() - t0
    times = json.loads((run_dir / "step_times.json").read_text())
    timed = times[1:] or times  # the first step pays one-off costs (allocator warm-up, lazy imports)
    tokens_per_step = int(cfg.data.batch_size) * int(cfg.data.seq_len)
    step_s = statistics.median(timed)
    return {
        "status": "ok",
        "params": int(metrics.pop("n_params")),
        "metrics": {k: v if math.isfinite(v) else None for k, v in metrics.items()},  # JSON has no NaN
        "steps": len(times),
        "tokens_per_step": tokens_per_step,
        "train_tokens": tokens_per_step * len(times),
        "median_step_s": step_s,
        "train_tokens_per_s": tokens_per_step / step_s,
        "peak_rss_mib": peak_rss_mib(),
        "wall_s": wall,
        "curves": read_curves(run_dir),
        "loadavg_end": list(os.getloadavg()),
        "overrides": list(overrides),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON result path; the run's files go beside it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = train(args.overrides, out.parent)
    except (ImportError, NotImplementedError) as err:
        result = {"status": "unavailable", "reason": f"{type(err).__name__}: {err}"}
    out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
