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

`--stream` runs the stream protocol instead (plain sequential training; HOPE and Transformer++, each in its
stream configuration, the presets of `experiment=hope_stream_small` and `transformer_stream_small`: CMS levels of
periods 64/512/4096 with retention 1/16 and the core carried, retaining toward its initial state, and a
Transformer-XL cache of one window). Each of `batch`
rows reads the domains' training splits one after the other as one continuing stream, `seq_len` tokens a step,
and the fast state (core memories, CMS fast weights, KV cache) is carried from window to window and across the
domain switches, cut from the graph between windows (truncated BPTT); `--train-state reset` trains the same
models with the state reset at every window instead, for comparison. After each domain, every domain's held-out
stream is read twice:

- carried: `eval_windows` consecutive windows per row, starting from the state the training stream holds then
  (a fork of it) and carrying it: what the model knows, weights and memory together; `R_stream`;
- weights: the same windows each from an empty state: what the weights alone know; `R_weights`.

Forgetting is `hope.eval.continual_metrics` of each. The switch probe reads the next domain's held-out stream
(`probe_windows` windows) from the state after the current domain, weights fixed: its loss in the first 1,024
tokens (bytes) against the later ones is the in-context adaptation after a domain switch. Writes
`<out>/domain_incremental_stream.*`.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.common.cli import base_parser, configured, continual_flags, mode_name, parse_models
from experiments.common.data import check_fits, lm_task
from experiments.common.models import LABELS, MODEL_NAMES, build_model, build_models, fork_state
from experiments.common.results import Partial, markdown_table, plot_lines, publish, replot
from experiments.common.train import STRATEGIES, Diverged, Task, run_strategy, strategy_config
from hope.optim.multi_frequency import MultiFrequency, cms_level_periods

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


STREAM_MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "seq_len": 64, "steps": 3, "batch": 2, "eval_windows": 2, "probe_windows": 4,
             "switch": 128, "lr": 3e-3},
    "cpu": {"size": "small", "seq_len": 256, "steps": 100, "batch": 8, "eval_windows": 4, "probe_windows": 16,
            "switch": 1024, "lr": 1e-3},
    "full": {"size": "small", "seq_len": 512, "steps": 300, "batch": 16, "eval_windows": 8, "probe_windows": 32,
             "switch": 1024, "lr": 1e-3},
}
STREAM_MODELS = ("hope", "transformer")


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
    if args.stream:
        return _run_stream(args, corpora)
    if args.outer_periods is not None or args.tag:
        raise ValueError("--outer-periods and --tag belong to the stream protocol; add --stream")
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


# ---- the stream protocol ---------------------------------------------------------------------------------------


def stream_model(name: str, size: str | int, seed: int, seq_len: int, device: str = "cpu"):
    """`name` in its stream configuration (presets "hope_stream" and "transformer_stream", the latter keeping
    the previous `seq_len` tokens' keys and values), as `build_model` builds it."""
    if name not in STREAM_MODELS:
        raise ValueError(f"--stream compares the models that have a stream configuration, {STREAM_MODELS}; "
                         f"got {name!r}")
    overrides = {"kv_cache": seq_len} if name == "transformer" else {}
    return build_model(name, size, seed, device, preset_name=f"{name}_stream", **overrides)


@torch.no_grad()
def read_rows(model, ids: Tensor, rows: int, seq_len: int, windows: int, state=None, carry: bool = True) -> Tensor:
    """Mean next-token loss of each of `windows` consecutive windows of `rows` streams of `ids` `[N]` (row ρ
    starting at ρ·⌊N/rows⌋), the state carried from `state` (a fork of it) or reset at every window: `[windows]`."""
    from hope.data.datamodule import StreamWindows

    data = StreamWindows(ids, seq_len, rows)
    state = fork_state(model, state) if carry else None
    model.eval()
    out = []
    for n in range(windows):
        items = [data[n * rows + r] for r in range(rows)]
        x, y = torch.stack([it["input_ids"] for it in items]), torch.stack([it["labels"] for it in items])
        res = model(x, state if carry else None)
        out.append(F.cross_entropy(res.logits.float().transpose(1, 2), y).item())
        state = model.detach_state(res.state) if carry else None
    model.train()
    return torch.tensor(out)


def train_stream(model, streams: Sequence[tuple[str, Tensor, Tensor]], mode: Mapping[str, Any], carry: bool,
                 seed: int) -> dict[str, Any]:
    """Train on each domain's stream in turn (`streams`: name, train ids, held-out ids), the state carried across
    windows and domains (`carry`) or reset at every window; evaluate after each domain (module docstring)."""
    import time

    B, T, steps = mode["batch"], mode["seq_len"], mode["steps"]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=mode["lr"], weight_decay=0.1)
    if mode.get("outer_periods") and len(model.config.cms) > 1:  # the models with CMS levels (HOPE)
        opt = MultiFrequency(opt, cms_level_periods(model, mode["outer_periods"]))
    state, losses, R_stream, R_weights, switches = None, [], [], [], []
    start = time.perf_counter()
    from hope.data.datamodule import StreamWindows

    for i, (name, train_ids, _) in enumerate(streams):
        data = StreamWindows(train_ids, T, B)
        for n in tqdm(range(steps), desc=f"{name} ({i + 1}/{len(streams)})", mininterval=10, leave=False):
            items = [data[n * B + r] for r in range(B)]
            x, y = torch.stack([it["input_ids"] for it in items]), torch.stack([it["labels"] for it in items])
            out = model(x, state if carry else None)
            # the window's last prediction (its target opens the next window) is left out, as the trainer's
            # stream mode does, so that the outer backward also gives the window-end CMS writes (`WindowEnd`)
            loss = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), y[:, :-1])
            end = model.detach_after_backward(out.state) if carry else None
            if not math.isfinite(loss.item()):
                raise Diverged(name, n + 1, loss.item(), losses[-1] if losses else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            state = end.finish(B * (T - 1)) if carry else None
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        R_stream.append([float(read_rows(model, ids, B, T, mode["eval_windows"], state).mean())
                         for _, _, ids in streams])
        R_weights.append([float(read_rows(model, ids, B, T, mode["eval_windows"], carry=False).mean())
                          for _, _, ids in streams])
        if i + 1 < len(streams):
            probe = read_rows(model, streams[i + 1][2], B, T, mode["probe_windows"], state)
            k = max(1, mode["switch"] // T)
            switches.append({"to": streams[i + 1][0], "first": float(probe[:k].mean()),
                             "later": float(probe[k:].mean()), "per_window": probe.tolist()})
    return {"R_stream": R_stream, "R_weights": R_weights, "switches": switches, "train_loss": losses,
            "seconds": time.perf_counter() - start}


def _run_stream(args: argparse.Namespace, corpora: Mapping[str, Sequence] | None) -> dict[str, Any]:
    from experiments.common.data import stream
    from hope.data.corpora import split_documents
    from hope.eval import continual_metrics

    mode = dict(STREAM_MODES[mode_name(args)])
    size, mode["steps"] = args.size or mode["size"], args.steps or mode["steps"]
    if args.outer_periods is not None:
        mode["outer_periods"] = args.outer_periods
    if args.strategies not in (",".join(STRATEGIES), "sequential"):
        raise ValueError(f"--stream trains with the sequential strategy only, got --strategies {args.strategies!r}")
    names = parse_models(args.models if args.models != ",".join(MODEL_NAMES) else ",".join(STREAM_MODELS))
    corpora = corpora if corpora is not None else load_domains(args.domains.split(","))
    streams = []
    for name, docs in corpora.items():
        parts = split_documents(docs)
        streams.append((name, stream(parts["train"]), stream(parts["test"] or parts["val"])))
    carry = args.train_state == "carried"
    bench = f"{NAME}_stream_{args.train_state}{args.tag}"
    partial = Partial(bench, args.out,
                      {"mode": mode_name(args), **mode, "size": size, "seed": args.seed,
                       "domains": [s[0] for s in streams]}, args.resume)
    results, rows = {}, []
    for name in names:
        key = f"{name}/{args.train_state}"
        unit = partial.get(key)
        if unit is None:
            built = stream_model(name, size, args.seed, mode["seq_len"], args.device)
            print(f"{key}: {mode['steps']} steps × {mode['batch']} rows × {mode['seq_len']} tokens per domain")
            try:
                unit = train_stream(built.model, streams, mode, carry, args.seed)
            except Diverged as err:
                unit = {"diverged": str(err)}
            unit = partial.put(key, {"params": built.params, **unit})
        results[key] = unit
        if "diverged" in unit:
            rows.append([LABELS[name], args.train_state, unit["params"], unit["diverged"]] + [None] * 5)
            continue
        ms = continual_metrics(unit["R_stream"], higher_is_better=False)
        mw = continual_metrics(unit["R_weights"], higher_is_better=False)
        unit["metrics_stream"], unit["metrics_weights"] = ms, mw
        first = sum(s["first"] for s in unit["switches"]) / max(len(unit["switches"]), 1)
        later = sum(s["later"] for s in unit["switches"]) / max(len(unit["switches"]), 1)
        rows.append([LABELS[name], args.train_state, unit["params"], ms["average_accuracy"],
                     ms["average_forgetting"], mw["average_accuracy"], mw["average_forgetting"], first, later])
    headers = ["model", "training state", "params", "final avg loss, carried", "forgetting, carried",
               "final avg loss, weights only", "forgetting, weights only",
               f"after a switch: first {mode['switch']} bytes", "later bytes"]
    table = markdown_table(headers, rows)
    doc = {"mode": mode_name(args), "size": size, "protocol": "stream", "train_state": args.train_state,
           "tasks": [s[0] for s in streams], "config": mode, "score": "test loss per byte (nats), lower is better",
           "models": results, "table": table}
    publish(bench, doc, args.out, lambda png: plot_stream(doc, png), partial)
    return doc


def plot_stream(doc: Mapping[str, Any], path: str | Path) -> Path:
    """The first domain's held-out loss after each domain, carried and weights-only, one line per model."""
    first, n = doc["tasks"][0], len(doc["tasks"])
    curves = {}
    for key, unit in doc["models"].items():
        if "diverged" in unit:
            continue
        label = f"{LABELS.get(key.split('/')[0], key)} ({key.split('/')[1]}-trained)"
        curves[f"{label}, carried"] = (range(1, n + 1), [r[0] for r in unit["R_stream"]])
        curves[f"{label}, weights only"] = (range(1, n + 1), [r[0] for r in unit["R_weights"]])
    return plot_lines(path, curves, f"Loss on {first} while streaming later domains", "domains learned",
                      f"{first} held-out loss (nats/byte)")


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated corpora, in training order")
    p.add_argument("--stream", action="store_true", help="the stream protocol (module docstring)")
    p.add_argument("--train-state", dest="train_state", choices=("carried", "reset"), default="carried",
                   help="--stream: carry the fast state across windows and domains in training, or reset it")
    p.add_argument("--outer-periods", dest="outer_periods", type=_periods, default=None, metavar="P0,P1,...",
                   help="--stream: HOPE's CMS level ℓ takes an outer step every Pℓ steps (hope.optim.multi_frequency)")
    p.add_argument("--tag", default="", help="--stream: suffix of the result files")
    return continual_flags(p, "domain")


def _periods(text: str) -> list[int]:
    items = [i.strip() for i in text.split(",")]
    if not all(i.isdigit() and int(i) >= 1 for i in items):
        raise argparse.ArgumentTypeError(f"--outer-periods takes ints >= 1 separated by commas, got {text!r}")
    return [int(i) for i in items]


if __name__ == "__main__":
    run()
