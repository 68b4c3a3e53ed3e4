"""AdamW, Muon, M3 and DeepMomentum training the same language models: loss against steps and against wall time.

    python -m experiments.optimizers.lm_compare_optimizers --tiny       # smoke run of the whole pipeline (seconds)
    python -m experiments.optimizers.lm_compare_optimizers              # hope_small + transformer_small, 600 steps
    python -m experiments.optimizers.lm_compare_optimizers --models transformer --optimizers m3 --sweep 0.3,1,3

Dimensions: none (curves are lists of [step, seconds, loss]; each run is one in-process `python train.py`).

Every (model, optimizer) pair trains the `<model>_small` experiment through `hope.training.run.run` (the job behind
`python train.py`) with the same seed, data order, context, batch, warm-up + cosine schedule, gradient clipping and
number of steps; only the optimizer lines differ (`optimizer_overrides`). A `LossClock` callback records each
step's training loss with the training wall time (validation excluded) and the validation bits per byte. Runs are
in one process, one after another: importing Lightning and Hydra takes 10–20 s on a busy 2-core machine, more than a
whole tiny run; the clock starts at `on_train_start`, so imports and model construction are not timed.

Learning rates (`LEARNING_RATES`, each line says why). Two rules keep everything but the update rule equal:
- decoupled weight decay shrinks weights by lr·wd per step, so each optimizer gets wd = `DECAY_PER_STEP` / lr and
  its weights decay exactly as AdamW's do (3e-3 × 0.1 = 3e-4 per step at the peak of the schedule);
- Muon and M3 route embeddings, the tied head and 1-D gains to an AdamW fallback at lr·`fallback_lr_scale`; we set
  the scale so that fallback runs at AdamW's own lr, whatever the matrix rule's lr.
`--sweep 0.3,1,3` trains every pair at each multiple of its lr and writes `lm_optimizers_sweep.json`; `--lrs
m3=1e-4` overrides one. The committed rates come from the sweep recorded in README.md.

Writes `<out>/lm_optimizers.json` (date, machine, torch version, command, load average, and per run: lr, Hydra
overrides, loss curve with wall-clock times, validation bpb, training wall time, median step time) and
`<out>/lm_optimizers.png` (`plot_lm.py`: loss against step and against wall time), and prints a Markdown table.
A model whose core does not build in this checkout (e.g. HOPE while `hope/layers/self_modifying.py` is missing) is
skipped with the reason, and its rows say so.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from experiments.common.cli import command_line, out_dir, torch_threads
from experiments.common.results import markdown_table, write_result
from experiments.common.trainer import QUIET_OVERRIDES, compose_train, place_run

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "lm_optimizers"

MODELS = ("transformer", "hope", "titans", "hope_attention")  # each has configs/experiment/<name>_small.yaml
OPTIMIZERS = ("adamw", "muon", "m3", "deep_momentum")
ADAMW_LR, ADAMW_WEIGHT_DECAY = 3e-3, 0.1  # configs/model/*.yaml
DECAY_PER_STEP = ADAMW_LR * ADAMW_WEIGHT_DECAY  # lr·wd, the per-step shrink every optimizer gets
MATRIX_OPTIMIZERS = ("muon", "m3")  # those with an AdamW fallback for embeddings and 1-D gains

# name -> (peak lr, why). Chosen by the sweep in README.md ("Learning rates"): Transformer++ small, context 128,
# batch 8, 100 steps, lowest mean training loss over the last 10 steps, each optimum bracketed by worse neighbours.
LEARNING_RATES: dict[str, tuple[float, str]] = {
    "adamw": (ADAMW_LR, "the configs' default; the sweep agrees (1e-3 ties, 9e-3 is worse)"),
    "muon": (9e-3, "scale='rms' matches AdamW's update RMS (MuonRule), yet 3x AdamW's lr is best (2.7e-2 ties)"),
    "m3": (3e-6, "NS(M1)/sqrt(V) is ~1/|g| per entry, ~100x AdamW's unit-scale step: swept 1e-8..3e-4"),
    "deep_momentum": (1.0, "read-out ~0.83·g, an unnormalised SGD-like step on clipped gradients: swept 0.03..10"),
}

MODES: dict[str, dict[str, Any]] = {
    # tiny: the pipeline end to end in seconds (depth 2, 32-token windows); its numbers mean nothing
    # (no CSV logger: writing its copy of the config costs ~0.5 s a run; LossClock records what the result needs)
    "tiny": {"size": "tiny", "seq_len": 32, "batch_size": 2, "steps": 4, "val_tokens": 256, "threads": 1,
             "logger": "none", "extra": ["trainer.limit_val_batches=2"]},
    # full: the *_small experiments as committed (depth 4, context 512, batch 8, 600 steps = 2.46M tokens)
    # (validation: the config's 262,144 held-out tokens = 64 batches, once, at the last step; CSV logs every step.
    # One thread: on the shared 2-core machine two threads made a HOPE step 33-94 s instead of 6 s; --threads 2 on
    # an idle one.)
    "full": {"size": "small", "seq_len": 512, "batch_size": 8, "steps": 600, "val_tokens": None, "threads": 1,
             "logger": "csv", "extra": []},
}


class LossClock(Callback):
    """Training loss and validation bpb of every step with the training wall time, written as JSON to `path`.

    Time t of step s is the wall time from `on_train_start` to the end of step s (forward, backward, clipping,
    optimizer step, data loading and logging) minus the time spent validating, so loss-against-time compares the
    optimizers' training cost only. Written at the end of training and on an exception (a diverged run keeps the
    curve up to its last finite step).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.curve: list[list[float]] = []  # [step, t (s), train loss]
        self.val: list[list[float]] = []  # [step, t (s), val bpb]
        self.step_s: list[float] = []
        self._t0 = self._val_start = self._batch_start = 0.0
        self._val_s = 0.0

    def _now(self) -> float:
        return time.perf_counter() - self._t0 - self._val_s

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._val_s = time.perf_counter(), 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_s.append(round(time.perf_counter() - self._batch_start, 5))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # rounded for a compact result file: 0.1 ms and 1e-6 nats are far below the noise between runs
        self.curve.append([trainer.global_step, round(self._now(), 4), round(float(loss.detach()), 6)])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._val_s += time.perf_counter() - self._val_start
        bpb = trainer.callback_metrics.get("val/bpb")
        if trainer.state.fn == "fit" and bpb is not None:
            self.val.append([trainer.global_step, round(self._now(), 4), round(float(bpb), 6)])

    def on_train_end(self, trainer, pl_module) -> None:
        self.write()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.write()

    def write(self) -> None:
        Path(self.path).write_text(json.dumps({"curve": self.curve, "val": self.val, "step_s": self.step_s}))


def optimizer_settings(name: str, lr: float) -> dict[str, Any]:
    """The `model.*` fields selecting optimizer `name` at peak lr `lr`, with AdamW's per-step weight decay (lr·wd)
    and, for Muon/M3, the fallback (embeddings, head, 1-D gains) at AdamW's lr."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"learning rate of {name!r} must be a positive finite number, got {lr!r}")
    out: dict[str, Any] = {"optimizer": name, "lr": lr, "weight_decay": DECAY_PER_STEP / lr}
    if name in MATRIX_OPTIMIZERS:
        out["optimizer_kwargs"] = {"fallback_lr_scale": ADAMW_LR / lr}
    return out


def optimizer_overrides(name: str, lr: float) -> list[str]:
    """`optimizer_settings` as `python train.py` overrides: each run records them so it can be rerun alone."""
    s = optimizer_settings(name, lr)
    out = [f"model.optimizer={name}", f"model.lr={s['lr']!r}", f"model.weight_decay={s['weight_decay']!r}"]
    out += [f"+model.optimizer_kwargs.{k}={v!r}" for k, v in s.get("optimizer_kwargs", {}).items()]  # "+": {} node
    return out


def shared_overrides(model: str, mode: dict[str, Any], seed: int) -> list[str]:
    """The overrides every optimizer shares for `model`: its *_small experiment at the mode's size, data and steps;
    one validation at the last step; no checkpoints, progress bar or test pass."""
    steps = mode["steps"]
    return [
        f"experiment={model}_small", f"seed={seed}", f"model.size={mode['size']}", f"data.seq_len={mode['seq_len']}",
        f"data.batch_size={mode['batch_size']}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1", f"logger={mode['logger']}", "test=false", *QUIET_OVERRIDES, *mode["extra"],
    ] + ([] if mode["val_tokens"] is None else [f"data.max_val_tokens={mode['val_tokens']}"])


def run_config(base, settings: dict[str, Any], run_dir: Path, clock_path: Path):
    """A copy of the composed `base` with the optimizer `settings` applied, outputs in `run_dir` and a `LossClock`.

    Composing once per model and copying saves Hydra's ~1 s per run (a tiny run takes about as long);
    `test_overrides_reproduce_the_settings` checks that this equals composing with `optimizer_overrides`.
    """
    from omegaconf import open_dict

    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        for key, value in settings.items():
            cfg.model[key] = value
    return place_run(cfg, run_dir, loss_clock={"_target_": f"{__name__}.LossClock", "path": str(clock_path)})


def train_one(base, model: str, optimizer: str, lr: float, shared: list[str], run_dir: Path) -> dict[str, Any]:
    """Train one (model, optimizer) pair from the model's composed config `base` (`shared` are its overrides); its
    curves and numbers, or a status saying why there are none."""
    from hope.training.module import NonFiniteLossError
    from hope.training.run import run

    run_dir.mkdir(parents=True, exist_ok=True)
    clock = run_dir / "clock.json"
    clock.unlink(missing_ok=True)
    settings = optimizer_settings(optimizer, lr)
    head = {"model": model, "optimizer": optimizer, "lr": lr, "weight_decay": settings["weight_decay"],
            "overrides": [*shared, *optimizer_overrides(optimizer, lr)], "loadavg_start": list(os.getloadavg())}
    t0 = time.perf_counter()
    try:
        metrics = run(run_config(base, settings, run_dir, clock))
        status, reason = "ok", None
    except NonFiniteLossError as err:
        metrics, status, reason = {}, "diverged", str(err)
    except Exception as err:  # noqa: BLE001 -- one broken pair must not lose the others' results
        metrics, status, reason = {}, "failed", "".join(traceback.format_exception_only(err)).strip()
        traceback.print_exc()
    wall = time.perf_counter() - t0
    rec = json.loads(clock.read_text()) if clock.is_file() else {"curve": [], "val": [], "step_s": []}
    step_s = rec["step_s"][1:] or rec["step_s"]  # the first step pays one-off costs (allocator, lazy imports)
    bpb = metrics.get("val/bpb")
    return {
        **head, "status": status, "reason": reason,
        "params": int(metrics["n_params"]) if "n_params" in metrics else None,
        "val_bpb": bpb if bpb is not None and math.isfinite(bpb) else None,
        "final_loss": final_loss(rec["curve"]),
        "train_wall_s": rec["curve"][-1][1] if rec["curve"] else None,
        "median_step_s": statistics.median(step_s) if step_s else None,
        "total_wall_s": wall, "curve": rec["curve"], "val_curve": rec["val"], "loadavg_end": list(os.getloadavg()),
    }


def final_loss(curve: Sequence[Sequence[float]], frac: float = 0.1) -> float | None:
    """Mean training loss over the last `frac` of the steps (at least one): the per-step loss of one batch is noisy.
    None for an empty curve or one that ends non-finite."""
    if not curve:
        return None
    tail = [c[2] for c in curve[-max(1, round(len(curve) * frac)) :]]
    value = sum(tail) / len(tail)
    return value if math.isfinite(value) else None


def summary_table(results: list[dict[str, Any]]) -> str:
    """One row per run: lr, final training loss, validation bpb, training wall time, median step time."""
    headers = ["model", "optimizer", "lr", "status", "train loss (last 10%)", "val bpb", "train wall (s)",
               "ms / step"]
    rows = []
    for r in results:
        ms = None if r.get("median_step_s") is None else f"{1e3 * r['median_step_s']:.1f}"
        wall = None if r.get("train_wall_s") is None else f"{r['train_wall_s']:.1f}"
        rows.append([r["model"], r["optimizer"], f"{r['lr']:.3g}", r["status"], r.get("final_loss"),
                     r.get("val_bpb"), wall, ms])
    return markdown_table(headers, rows, digits=4)


def best_by_pair(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For a sweep: each (model, optimizer)'s lr with the lowest final training loss (diverged runs never win)."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        key = f"{r['model']}/{r['optimizer']}"
        if r.get("final_loss") is not None and (key not in best or r["final_loss"] < best[key]["final_loss"]):
            best[key] = {"lr": r["lr"], "final_loss": r["final_loss"]}
    return best


def parse_names(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"{flag} must list distinct names from {tuple(allowed)}, got {text!r}")
    return names


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{flag} must be comma-separated positive numbers, got {text!r}")
    return values


def parse_lrs(text: str | None) -> dict[str, float]:
    """`adamw=3e-3,m3=1e-4` -> {"adamw": 0.003, "m3": 0.0001}, names checked against OPTIMIZERS."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in OPTIMIZERS:
            raise ValueError(f"--lrs items must be <optimizer>=<lr> with optimizer in {OPTIMIZERS}, got {item!r}")
        out[name.strip()] = parse_floats(value, f"--lrs {name.strip()}")[0]
    return out


def available(models: list[str]) -> tuple[list[str], dict[str, str]]:
    """The models whose core builds in this checkout (HOPE needs `hope/layers/self_modifying.py`), and the reasons
    for the others."""
    from experiments.common.models import ModelUnavailable, build_model

    ok, skipped = [], {}
    for m in models:
        try:
            build_model(m, "tiny")
            ok.append(m)
        except ModelUnavailable as err:
            skipped[m] = str(err)
            print(f"[skip] {m}: every {m} row is skipped: {err}", flush=True)
    return ok, skipped


def plan(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, float]]]:
    """The mode (with --steps, --size, --seq-len, --batch-size, --val-tokens applied) and the (optimizer, lr) runs
    per model; flags that cannot work raise `ValueError` before anything trains."""
    mode = dict(MODES["tiny" if args.tiny else "full"])
    for key in ("steps", "size", "seq_len", "batch_size", "val_tokens"):
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    for key in ("steps", "seq_len", "batch_size", "val_tokens", "threads"):
        value = args.threads if key == "threads" else mode[key]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"--{key.replace('_', '-')} must be a positive int, got {value!r}")
    lrs = {name: lr for name, (lr, _) in LEARNING_RATES.items()} | parse_lrs(args.lrs)
    factors = parse_floats(args.sweep, "--sweep") if args.sweep else [1.0]
    names = parse_names(args.optimizers, OPTIMIZERS, "--optimizers")
    runs = [(o, float(f"{lrs[o] * f:.4g}")) for o in names for f in factors]  # 9e-3, not 0.009000000000000001
    return mode, runs


def train_all(models: list[str], runs: list[tuple[str, float]], mode: dict[str, Any], seed: int,
              out: Path) -> list[dict[str, Any]]:
    """Every (optimizer, lr) of `runs` on every model, one after another; run files under `<out>/runs/`."""
    results = []
    for model in models:
        shared = shared_overrides(model, mode, seed)
        base = compose_train(shared)
        for optimizer, lr in runs:
            tag = f"{model} / {optimizer} lr={lr:.3g}"
            print(f"[{tag}] training {mode['steps']} steps ...", flush=True)
            r = train_one(base, model, optimizer, lr, shared, out / "runs" / f"{model}-{optimizer}-lr{lr:.3g}")
            print(f"[{tag}] {r['status']} in {r['total_wall_s']:.0f} s, final loss {r['final_loss']}, val bpb "
                  f"{r['val_bpb']}" + (f": {r['reason']}" if r["reason"] else ""), flush=True)
            results.append(r)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    mode, runs = plan(args)
    models, skipped = available(parse_names(args.models, MODELS, "--models"))
    name = f"{NAME}_sweep" if args.sweep else NAME
    out = out_dir(args, RESULTS)
    threads = args.threads or mode["threads"]
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # per-run GPU/TPU banners, 8+ times over
    warnings.filterwarnings("ignore", module="lightning")
    load_start = list(os.getloadavg())
    with torch_threads(threads):  # restored after: the tests call main() in the pytest process
        results = train_all(models, runs, mode, args.seed, out)
    for model, reason in skipped.items():
        results += [{"model": model, "optimizer": o, "lr": lr, "status": "skipped", "reason": reason, "curve": []}
                    for o, lr in runs]
    doc = {
        "mode": "tiny" if args.tiny else "full",
        "command": command_line("experiments.optimizers.lm_compare_optimizers", argv),
        "config": {k: v for k, v in mode.items() if k != "extra"} | {"seed": args.seed, "threads": threads,
                                                                    "sweep": args.sweep, "extra": mode["extra"]},
        "learning_rates": {o: {"lr": lr, "why": why} for o, (lr, why) in LEARNING_RATES.items()},
        "decay_per_step": DECAY_PER_STEP,
        "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
        "note": "runs one after another in one process on a machine that may be shared: see the load averages; "
        "times exclude validation; train loss is per step on one batch (the table averages the last 10%)",
        "results": results,
        "best_lr": best_by_pair(results) if args.sweep else None,
    }
    doc["table"] = summary_table(results)
    path = write_result(name, doc, out)
    from experiments.optimizers.plot_lm import plot_results

    title = (f"{doc['mode']}: {mode['size']} preset, context {mode['seq_len']}, batch {mode['batch_size']}, "
             f"{mode['steps']} steps, seed {args.seed}")
    png = plot_results(out / f"{name}.png", results, title)
    print(doc["table"])
    if args.sweep:
        print("best lr per pair:", json.dumps(doc["best_lr"]))
    print(f"wrote {path} and {png}")
    return json.loads(path.read_text())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (depth 2, 32-token windows, 4 steps)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: by mode, 4 or 600)")
    p.add_argument("--models", default="transformer,hope", help=f"comma-separated, from {MODELS}")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, from {OPTIMIZERS}")
    p.add_argument("--lrs", default=None, help="peak lr overrides, e.g. m3=1e-4,deep_momentum=0.3")
    p.add_argument("--sweep", default=None, help="lr multiples to sweep, e.g. 0.3,1,3 (writes *_sweep.json)")
    p.add_argument("--size", default=None, help="preset size (tiny/small/base or a depth; default: by mode)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="context (default: by mode)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="batch (default: by mode)")
    p.add_argument("--val-tokens", dest="val_tokens", type=int, default=None,
                   help="held-out tokens for the final validation (default: by mode; the config's 262,144 in full)")
    p.add_argument("--seed", type=int, default=1337, help="one seed for every run (init and data order)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1, see MODES)")
    p.add_argument("--out", default=None, help="output directory (default: results/, results/tiny/ with --tiny)")
    return p


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
