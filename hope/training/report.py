"""The end of a training run: its final metrics as a table on the console and as `metrics.json` in the run's folder.

`run_meta()` is the provenance every result file carries (date, command, commit, machine); the benchmarks in
`experiments/` use it too.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# The git checkout this package lives in (an installed copy has none: its commit is then None).
_REPO = Path(__file__).resolve().parents[2]


def run_meta() -> dict[str, Any]:
    """Who/where/when of a run, for the `meta` field of every result file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False, cwd=_REPO
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit or None,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), e.g. "Intel(R) Xeon(R) Processor"; None where unknown.
    Timings from different CPUs do not compare, so every result file names its CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


SPLITS = ("val", "test")


def metrics_table(metrics: dict[str, float], steps: dict[str, int | None]) -> str:
    """The `val/…` and `test/…` metrics as a plain-text table, one row per split:

        split  step   loss    ppl     bpb
        val     600  1.783  5.946   2.572
    """
    names = sorted({k.split("/", 1)[1] for k in metrics if k.split("/", 1)[0] in SPLITS and "/" in k})
    rows = [["split", "step", *names]]
    for split in SPLITS:
        if any(f"{split}/{n}" in metrics for n in names):
            step = steps.get(split)
            rows.append([split, "-" if step is None else str(step),
                         *[_fmt(metrics.get(f"{split}/{n}")) for n in names]])
    if len(rows) == 1:
        return "no validation or test metrics (train=false and test=false, or no batches)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def write_metrics(path: str | Path, metrics: dict[str, float], steps: dict[str, int | None], seed: int,
                  config: dict[str, Any]) -> Path:
    """Write the run's final metrics to `path` (JSON: metrics, the step each split was measured at, the seed, the
    resolved config and `run_meta()`); non-finite numbers become null. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": run_meta(), "seed": seed, "steps": steps,
           "metrics": {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())}, "config": config}
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path
