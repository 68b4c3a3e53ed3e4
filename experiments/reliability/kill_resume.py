"""Killed and resumed: the model presets trained by `train.py`, SIGKILLed at random moments and resumed with
`ckpt_path=last`, against the same run left alone. Every logged loss must agree to the last bit.

    python -m experiments.reliability.kill_resume                       # Transformer++ and HOPE presets, 2 kills each
    python -m experiments.reliability.kill_resume --presets transformer_small --kills 3 --steps 40
    python -m experiments.reliability.kill_resume --tiny                # the tiny model: seconds, what the test runs

Each preset is trained `--steps` steps twice in its own run folder under a temporary PROJECT_ROOT: once
uninterrupted, and once killed `--kills` times, each kill at a random moment (seeded) after the attempt's first
checkpoint has appeared, then resumed. The compared values are every training, validation and test metric both
runs logged at the same step (Lightning's ThroughputMonitor times and counts since the process started are left
out: no resume can reproduce them). Writes `<out>/kill_resume.{json,md}`.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.common.results import markdown_table, write_result

ROOT = Path(__file__).resolve().parents[2]

# The recipe: checkpoints every 10 steps, one validation at the end; logged every step, flushed at once.
COMMON = ["trainer.val_check_interval={steps}", "trainer.limit_val_batches=2", "++trainer.limit_test_batches=1",
          "callbacks.model_checkpoint.every_n_train_steps={every}", "logger=csv",
          "+logger.csv.flush_logs_every_n_steps=1", "trainer.log_every_n_steps=1", "~callbacks.progress_bar",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
TINY = ["model.size=tiny", "data.seq_len=32", "data.batch_size=2", "data.max_val_tokens=256"]


def process_local(key: str) -> bool:
    """ThroughputMonitor's wall-clock times and rates, and its counts since the process started."""
    stage, _, name = key.partition("/")
    return stage in ("train", "validate", "test") and (name in ("time", "batches", "samples", "lengths")
                                                         or name.startswith("device/") or name.endswith("_per_sec"))


def logged(run_dir: Path) -> list[dict[tuple[int, str], str]]:
    """Per attempt, in order: {(step, metric): value as written}."""
    paths = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    out = []
    for path in paths:
        values = {}
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key not in ("step", "epoch") and not process_local(key):
                        values[(int(row["step"]), key)] = value
        out.append(values)
    return out


def start(root: Path, name: str, overrides: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "PROJECT_ROOT": str(root), "OMP_NUM_THREADS": str(threads), "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides, f"run_name={name}",
                             f"paths.data_cache={ROOT / '.cache' / 'data'}"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate()
    return proc.returncode, err


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem[4:]) for p in (run_dir / "checkpoints").glob("step*.ckpt"))


def one_preset(preset: str, args: argparse.Namespace, rng: random.Random, root: Path) -> dict[str, Any]:
    overrides = [f"experiment={preset}", f"trainer.max_steps={args.steps}", f"seed={args.seed}",
                 *(c.format(steps=args.steps, every=args.every) for c in COMMON), *(TINY if args.tiny else [])]
    began = time.perf_counter()
    proc, appeared = start(root, "uninterrupted", overrides, args.threads), {}
    while proc.poll() is None:  # when each checkpoint appears: the time a checkpoint interval takes
        for step in checkpoint_steps(root / "logs" / "uninterrupted") if (root / "logs").exists() else []:
            appeared.setdefault(step, time.perf_counter())
        time.sleep(0.05)
    code, err = finish(proc)
    if code != 0:
        raise SystemExit(f"error: the uninterrupted {preset} run failed:\n{err[-3000:]}")
    alone_s = time.perf_counter() - began
    first, last = min(appeared, default=0), max(appeared, default=0)
    interval_s = ((appeared[last] - appeared[first]) / (last - first) * args.every if last > first
                  else alone_s / args.steps * args.every)
    run_dir = root / "logs" / "killed"
    kills, attempts = [], 0
    while True:
        resume = ["ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").exists() else []
        before = checkpoint_steps(run_dir) if run_dir.exists() else []
        proc = start(root, "killed", [*overrides, *resume], args.threads)
        attempts += 1
        if len(kills) < args.kills:
            # wait for this attempt's first new checkpoint, then kill at a random moment of the next interval
            while proc.poll() is None and not (run_dir.exists() and set(checkpoint_steps(run_dir)) - set(before)):
                time.sleep(0.05)
            t0, delay = time.perf_counter(), rng.uniform(0.0, interval_s)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                finish(proc)
                kills.append({"after_s": round(time.perf_counter() - t0, 2),
                              "checkpoints": checkpoint_steps(run_dir)})
                continue
        code, err = finish(proc)
        if code != 0:
            raise SystemExit(f"error: attempt {attempts} of the killed {preset} run failed:\n{err[-3000:]}")
        break
    (ref,) = logged(root / "logs" / "uninterrupted")
    seen, differ = set(), []
    for n, values in enumerate(logged(run_dir)):
        for key, value in values.items():
            if key not in ref or ref[key] != value:
                differ.append({"attempt": n, "step": key[0], "metric": key[1], "value": value,
                               "uninterrupted": ref.get(key)})
        seen |= values.keys()
    missing = sorted(set(ref) - seen)
    return {"preset": preset, "steps": args.steps, "kills": kills, "attempts": attempts,
            "compared": len(ref), "differ": differ, "never_logged": [list(k) for k in missing],
            "exact": not differ and not missing, "uninterrupted_s": round(alone_s, 1),
            "checkpoint_interval_s": round(interval_s, 2)}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="transformer_small,hope_small", help="experiment presets, comma-separated")
    p.add_argument("--steps", type=int, default=40, help="training steps of each run")
    p.add_argument("--every", type=int, default=10, help="checkpoint interval in steps")
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs of the interrupted run")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments and the training runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each train.py process")
    p.add_argument("--tiny", action="store_true", help="the tiny model at 32-token windows (seconds)")
    p.add_argument("--out", default="experiments/reliability/results")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.every > args.steps or args.kills < 0:
        raise SystemExit(f"error: need steps >= every >= 1 and kills >= 0, got steps={args.steps} "
                         f"every={args.every} kills={args.kills}")
    rng = random.Random(args.seed)
    results = []
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
            res = one_preset(preset, args, rng, Path(tmp))
        results.append(res)
        print(f"{preset}: {len(res['kills'])} kills, {res['compared']} values compared, "
              f"{len(res['differ'])} differ, {len(res['never_logged'])} never logged", file=sys.stderr)
    rows = [[r["preset"], r["steps"], len(r["kills"]), "; ".join(f"{k['after_s']} s after a checkpoint "
             f"(on disk: {k['checkpoints'][-1] if k['checkpoints'] else 'none'})" for k in r["kills"]),
             r["compared"], len(r["differ"]) + len(r["never_logged"]), "yes" if r["exact"] else "NO"]
            for r in results]
    table = markdown_table(["preset", "steps", "kills", "when", "values compared", "lost or different",
                            "bitwise exact"], rows)
    name = "kill_resume_tiny" if args.tiny else "kill_resume"
    path = write_result(name, {"config": vars(args), "presets": results, "table": table}, args.out)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    return {"presets": results, "path": str(path)}


if __name__ == "__main__":
    out = run()
    if not all(r["exact"] for r in out["presets"]):
        raise SystemExit(1)
