"""A plain PyTorch loop that trains one model on a sequence of tasks and fills the score matrix R.

Dimensions: N rows of a task's split, B batch, T time, V vocabulary, K candidate label tokens.

R[i][j] is the score on task j after training on tasks 0..i (the input of `hope.eval.continual_metrics`);
`baseline[j]` is the score of the untrained model (for forward transfer). Strategies:

- "sequential": fine-tune on each task in turn (the lower bound every continual-learning method is measured against);
- "replay": every step after the first task also trains on `replay_batch` rows drawn from a reservoir buffer of
  all rows trained on so far (experience replay, Chaudhry et al. 2019);
- "ewc": add the EWC penalty of all finished tasks to the loss (Kirkpatrick et al. 2017).

The first task is trained identically by every strategy, so R[0][0] agrees across them (a sanity check).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.common.models import BuiltModel
from experiments.common.results import Partial
from hope.eval import EWC, IGNORE_INDEX, ReplayBuffer, continual_metrics, lm_loss, windowed_logits

STRATEGIES = ("sequential", "replay", "ewc")


@dataclass
class Task:
    """One task: training and evaluation rows of (inputs, targets), targets -100 where no loss is taken."""

    name: str
    train_inputs: Tensor  # [N, T]
    train_targets: Tensor  # [N, T]
    eval_inputs: Tensor  # [N, T]
    eval_targets: Tensor  # [N, T]
    steps: int | None = None  # training steps on this task (None: the TrainConfig's steps_per_task)

    def __post_init__(self) -> None:
        for split in ("train", "eval"):
            x, y = getattr(self, f"{split}_inputs"), getattr(self, f"{split}_targets")
            if x.dim() != 2 or x.shape != y.shape or x.shape[0] == 0:
                raise ValueError(
                    f"task {self.name!r}: {split} inputs/targets must be equal non-empty [N, T], got "
                    f"{tuple(x.shape)} and {tuple(y.shape)}"
                )


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite: training stopped there (`task`, 1-based `step`, `loss`)."""

    def __init__(self, task: str, step: int, loss: float, last_finite: float | None) -> None:
        self.task, self.step, self.loss = task, step, loss
        before = f"; the step before it had {last_finite:.3f}" if last_finite is not None else ""
        super().__init__(f"diverged: training loss {loss} at step {step} of task {task!r}{before}")


@dataclass
class TrainConfig:
    steps_per_task: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    strategy: str = "sequential"
    replay_capacity: int = 512
    replay_batch: int = 8
    ewc_strength: float = 1000.0
    ewc_batches: int = 8
    eval_batch_size: int = 32
    seed: int = 0
    window: int | None = None  # read each row in windows of this many tokens, state carried (truncated BPTT)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("steps_per_task", "batch_size", "replay_capacity", "replay_batch", "ewc_batches",
                     "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window <= 0):
            raise ValueError(f"TrainConfig.window must be a positive int or None, got {self.window!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 32, candidates: Tensor | None = None,
    window: int | None = None,
) -> float:
    """Mean loss per target token (candidates None) or accuracy of argmax over the `candidates` token ids [K].

    Accuracy restricted to the label tokens is the single-head class-incremental protocol: the model must pick the
    right class among all classes of the benchmark, not only those of the current task.
    """
    model.eval()
    device = model_device(model)
    candidates = None if candidates is None else candidates.to(device)
    total, count = 0.0, 0
    for s in range(0, inputs.shape[0], batch_size):
        x, y = inputs[s : s + batch_size].to(device), targets[s : s + batch_size].to(device)  # [b, T]
        mask = y != IGNORE_INDEX  # [b, T]
        logits = windowed_logits(model, x, window, mask).float()  # [b, T, V]
        if candidates is None:
            ce = nn.functional.cross_entropy(logits[mask], y[mask], reduction="sum")
            total += ce.item()
        else:
            pred = candidates[logits[mask][:, candidates].argmax(-1)]  # [M]
            total += (pred == y[mask]).sum().item()
        count += int(mask.sum())
    model.train()
    return total / max(count, 1)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live; data are moved there batch by batch (tasks stay on the CPU)."""
    return next(model.parameters()).device


def _batches(task: Task, batch_size: int, generator: torch.Generator, count: int, device: torch.device):
    for _ in range(count):
        idx = torch.randint(0, task.train_inputs.shape[0], (batch_size,), generator=generator)
        yield task.train_inputs[idx].to(device), task.train_targets[idx].to(device)


def train_on_tasks(
    model: nn.Module,
    tasks: Sequence[Task],
    cfg: TrainConfig,
    candidates: Tensor | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Train `model` on `tasks` in order with `cfg.strategy`; evaluate every task after each one.

    Returns {"R": N×N scores, "baseline": N scores of the untrained model, "train_loss": per task the training loss of
    every step, "seconds": wall time}. Scores are losses, or accuracies when `candidates` is given. `progress` shows a
    bar per task on stderr (step, training loss, rate), refreshed at most every 10 s.

    Raises `Diverged` at the first NaN or infinite training loss (before that step updates the weights), rather
    than going on training a broken model.
    """
    if not tasks:
        raise ValueError("train_on_tasks needs at least one task, got none")
    start = time.perf_counter()
    device = model_device(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    replay = ReplayBuffer(cfg.replay_capacity, seed=cfg.seed) if cfg.strategy == "replay" else None
    ewc = EWC(cfg.ewc_strength) if cfg.strategy == "ewc" else None

    def score_all() -> list[float]:
        return [evaluate(model, t.eval_inputs, t.eval_targets, cfg.eval_batch_size, candidates, cfg.window)
                for t in tasks]

    baseline = score_all()
    R, curves = [], []
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + i)
        losses, steps = [], task.steps or cfg.steps_per_task
        bar = tqdm(_batches(task, cfg.batch_size, gen, steps, device), total=steps,
                   desc=f"task {i + 1}/{len(tasks)} {task.name}", disable=not progress, mininterval=10, leave=False)
        for step, (x, y) in enumerate(bar, 1):
            if replay is not None and i > 0:
                rx, ry = replay.sample(cfg.replay_batch)
                x_all, y_all = torch.cat([x, rx]), torch.cat([y, ry])  # [B + b_r, T]
            else:
                x_all, y_all = x, y
            loss = lm_loss(model, x_all, y_all, cfg.window)
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                raise Diverged(task.name, step, value, losses[-1] if losses else None)
            total = loss + ewc.penalty(model) if ewc is not None and ewc.anchors else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if replay is not None:
                replay.add(x, y)
            losses.append(value)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.close()
        if ewc is not None:
            ewc.consolidate(model, list(_batches(task, cfg.batch_size, gen, cfg.ewc_batches, device)))
        R.append(score_all())
        curves.append(losses)
        log(f"  after {task.name}: " + " ".join(f"{t.name}={v:.3f}" for t, v in zip(tasks, R[-1])))
    return {"R": R, "baseline": baseline, "train_loss": curves, "seconds": time.perf_counter() - start}


def strategy_config(mode: Mapping[str, Any], steps: int, strategy: str, seed: int) -> TrainConfig:
    """The `TrainConfig` of `strategy` in a continual benchmark's `mode` (its `batch`, `lr`, `replay_capacity`,
    `replay_batch`, `ewc_strength` and `ewc_batches`), with `steps` per task."""
    return TrainConfig(steps_per_task=steps, batch_size=mode["batch"], lr=mode["lr"], strategy=strategy,
                       replay_capacity=mode["replay_capacity"], replay_batch=mode["replay_batch"],
                       ewc_strength=mode["ewc_strength"], ewc_batches=mode["ewc_batches"], seed=seed)


def run_strategy(partial: Partial, key: str, label: str, build: Callable[[], BuiltModel], tasks: Sequence[Task],
                 cfg: TrainConfig, candidates: Tensor | None = None, higher_is_better: bool = True) -> dict[str, Any]:
    """One (model, strategy) unit of a continual benchmark: the unit `partial` holds under `key`, else the fresh
    model of `build()` trained on `tasks` with `cfg` (`train_on_tasks`, announced as `label`) and saved under `key`:
    its `train_on_tasks` result with `metrics` = `hope.eval.continual_metrics` of R, or `{"diverged": message}`
    when the loss stopped being finite (the other units go on)."""
    unit = partial.get(key)
    if unit is not None:
        return unit
    print(label)
    model = build().model
    try:
        out = train_on_tasks(model, tasks, cfg, candidates=candidates)
    except Diverged as err:  # recorded and shown as such; the other runs go on
        print(f"  {err}")
        return partial.put(key, {"diverged": str(err)})
    metrics = continual_metrics(out["R"], baseline=out["baseline"], higher_is_better=higher_is_better)
    return partial.put(key, {**out, "metrics": metrics})
