"""What the memory benchmarks share: train a named model on a synthetic task, score it on held-out sets.

Dimensions: N examples, T time, V vocabulary, K candidate answer tokens.

Data come from `hope.data.synthetic` (MQAR, passkey, formal languages); each benchmark trains on one setting
(short sequences) and tests on others (longer ones). Scores are teacher-forced: per-token accuracy over the scored
positions, and exact match per example (every scored token right). With teacher forcing, an example is an exact
match exactly when greedy decoding would produce its whole answer, so no decoding loop is needed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from experiments.common.cli import base_parser, mode_name, parse_models
from experiments.common.data import check_fits
from experiments.common.models import BuiltModel, available_models, build_model, count_params
from experiments.common.results import Partial
from experiments.common.train import Diverged, Task, TrainConfig, model_device, train_on_tasks
from hope.eval import IGNORE_INDEX, windowed_logits

MEMORY_MODELS = ("hope",)  # the models whose core takes `--memory` (the self-modifying core)


@dataclass
class Trained:
    name: str
    model: nn.Module
    params: int
    train: dict[str, Any]


def train_on_synthetic(
    name: str, size: str | int, vocab_size: int, train: Any, held_out: Any, steps: int, batch: int, lr: float,
    seed: int, device: str = "cpu", window: int | None = None, then: Sequence[tuple[Any, Any, int]] = (),
    start: nn.Module | None = None, **overrides: Any,
) -> Trained:
    """Build `name` with the task's vocabulary and train it for `steps` on `train` (a `SyntheticBatch`), then on
    each `(train, held_out, steps)` of `then` in turn (a curriculum, e.g. longer sequences).

    With `window`, every sequence is read in windows of that many tokens with the state carried and cut between
    windows (truncated BPTT, `hope.eval.windowed_logits`), and attention models keep a cache of the last `window`
    tokens (`kv_cache`, Transformer-XL style), so no call sees more than two windows. Raises `ValueError` when a
    call would be longer than the model's `max_seq_len`. With `start` (a model `load_trained` read) nothing is
    built: `start` goes on with the phases of `then` only (the first phase is what it was trained on before).
    """
    if window is not None:
        overrides.setdefault("kv_cache", window)
    if start is not None:
        if not then:
            raise ValueError(f"{name}: a saved model goes on with the phases of --then, and there are none")
        built = BuiltModel(name, start.to(device).train(), count_params(start))
        phases = list(then)
    else:
        built = build_model(name, size, seed, device, vocab_size=vocab_size, **overrides)
        phases = [(train, held_out, steps), *then]
    longest = max(max(t.inputs.shape[1], h.inputs.shape[1]) for t, h, _ in phases)
    check_fits(built.model, longest if window is None else min(longest, window))
    tasks = [Task(f"train{i or ''}", t.inputs, t.targets, h.inputs, h.targets, steps=n)
             for i, (t, h, n) in enumerate(phases)]
    cfg = TrainConfig(steps_per_task=steps, batch_size=batch, lr=lr, weight_decay=0.0, seed=seed, window=window)
    out = train_on_tasks(built.model, tasks, cfg, log=lambda _: None)
    return Trained(name, built.model, built.params, out)


@torch.no_grad()
def score(model: nn.Module, inputs: Tensor, targets: Tensor, candidates: Tensor | None = None,
          batch_size: int = 16, window: int | None = None) -> dict[str, float]:
    """Teacher-forced per-token accuracy and per-example exact match on the scored positions.

    `candidates` `[K]` restricts the argmax to the answer tokens (e.g. ACCEPT/REJECT, the ten digits); `window`
    reads each sequence in windows with the state carried (`hope.eval.windowed_logits`).
    """
    model.eval()
    device = model_device(model)
    candidates = None if candidates is None else candidates.to(device)
    correct = total = exact = 0
    for s in range(0, inputs.shape[0], batch_size):
        x, y = inputs[s : s + batch_size].to(device), targets[s : s + batch_size].to(device)  # [b, T]
        logits = windowed_logits(model, x, window).float()  # [b, T, V]
        if candidates is not None:
            pred = candidates[logits[..., candidates].argmax(-1)]  # [b, T]
        else:
            pred = logits.argmax(-1)  # [b, T]
        mask = y != IGNORE_INDEX  # [b, T]
        hit = (pred == y) & mask
        correct += int(hit.sum())
        total += int(mask.sum())
        exact += int((hit.sum(1) == mask.sum(1)).sum())
    model.train()
    return {"token_accuracy": correct / max(total, 1), "exact_match": exact / max(inputs.shape[0], 1)}


def sweep(
    names: list[str],
    make: Callable[[int, int, int], Any],
    train_setting: int,
    test_settings: Sequence[int],
    vocab_size: int,
    candidates: Tensor | None,
    mode: dict[str, Any],
    seed: int,
    partial: Partial | None = None,
    save_dir: str | None = None,
    load_dir: str | None = None,
    init_dir: str | None = None,
) -> dict[str, Any]:
    """Train each model at `train_setting`, score it at every test setting (context length, number of pairs, ...).

    `make(setting, n_examples, seed)` returns a `SyntheticBatch`; training, validation and each test set use
    different seeds, so no test example was trained on. Returns {model: {"params", "train_seconds",
    "token_accuracy": [...], "exact_match": [...]}} with one entry per test setting. With `partial`, each model's
    result is saved as it ends and models it already holds are not run again. With `save_dir` each trained model is
    written to `<save_dir>/<name>.pt` (`save_trained`); with `load_dir` none is trained: each is read from there and
    only scored (its result keeps the training time and loss it was saved with, and says where it came from); with
    `init_dir` each starts from the model saved there and is trained on the `then` phases only.
    """
    train = make(train_setting, mode["steps"] * mode["batch"], seed)
    held_out = make(train_setting, mode["n_test"], seed + 1)
    tests = [make(s, mode["n_test"], seed + 2 + i) for i, s in enumerate(test_settings)]
    window = mode.get("window")
    then = [(make(p["train_len"], p["steps"] * mode["batch"], seed + 1000 * (k + 1)),
             make(p["train_len"], mode["n_test"], seed + 1000 * (k + 1) + 1), p["steps"])
            for k, p in enumerate(mode.get("then", ()))]
    out: dict[str, Any] = {}
    for name in names:
        if partial is not None and partial.get(name) is not None:
            out[name] = partial.get(name)
            continue
        if load_dir is not None:
            model, info = load_trained(Path(load_dir) / f"{name}.pt")
            out[name] = scored(name, model, info, tests, test_settings, candidates, mode["eval_batch"], window)
            if partial is not None:
                partial.put(name, out[name])
            continue
        print(f"{name}: {mode['steps']} steps × {mode['batch']} at setting {train_setting}"
              + "".join(f", then {p['steps']} at {p['train_len']}" for p in mode.get("then", ()))
              + (f", read in windows of {window} tokens" if window else ""), flush=True)
        extra = {"memory": mode["memory"]} if mode.get("memory") and name in MEMORY_MODELS else {}
        start, before = load_trained(Path(init_dir) / f"{name}.pt") if init_dir is not None else (None, {})
        try:
            trained = train_on_synthetic(name, mode["size"], vocab_size, train, held_out, mode["steps"],
                                         mode["batch"], mode["lr"], seed, mode.get("device", "cpu"), window, then,
                                         start=start, **extra)
        except Diverged as err:  # recorded and shown as such; the other models still run
            print(f"{name:>15}: {err}")
            none = [None] * len(tests)
            out[name] = {"params": build_model(name, mode["size"], seed, vocab_size=vocab_size).params,
                         "diverged": str(err), "token_accuracy": none, "exact_match": none}
        else:
            info = {"params": trained.params, "train_seconds": trained.train["seconds"],
                    "final_train_loss": trained.train["train_loss"][-1][-1]}
            if start is not None:  # the time of the phases before it, and where they came from
                info.update(train_seconds=before["train_seconds"] + info["train_seconds"],
                            started_from=before["loaded_from"])
            if save_dir is not None:
                save_trained(trained.model, Path(save_dir) / f"{name}.pt", info)
            out[name] = scored(name, trained.model, info, tests, test_settings, candidates, mode["eval_batch"],
                               window)
        if partial is not None:
            partial.put(name, out[name])
    return out


def scored(name: str, model: nn.Module, info: dict[str, Any], tests: Sequence[Any], settings: Sequence[int],
           candidates: Tensor | None, batch_size: int, window: int | None) -> dict[str, Any]:
    """`info` with the model's scores at each test setting (`score`), printed as exact match per setting."""
    scores = [score(model, t.inputs, t.targets, candidates, batch_size, window) for t in tests]
    print(f"{name:>15}: " + "  ".join(f"{s}: {v['exact_match']:.2f}" for s, v in zip(settings, scores)))
    return {**info, "token_accuracy": [s["token_accuracy"] for s in scores],
            "exact_match": [s["exact_match"] for s in scores]}


def save_trained(model: nn.Module, path: Path, info: dict[str, Any]) -> Path:
    """Write a trained benchmark model (its config, weights and `info`: params, training time and loss) to `path`,
    through a temporary file beside it, so that a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), "info": dict(info)}, tmp)
    os.replace(tmp, path)
    return path


def load_trained(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model `save_trained` wrote to `path` (in eval mode, on the CPU) and its info, plus "loaded_from"."""
    from hope import HopeConfig, HopeLM

    if not path.is_file():
        raise FileNotFoundError(f"no saved model at {str(path)!r} (write one with --save-models)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = HopeLM(HopeConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), {**saved["info"], "loaded_from": str(path)}


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """The flags of a length or load sweep (MQAR, passkey): the shared ones, `--steps`, `--memory` and `--tag`."""
    p = base_parser(description)
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    add_memory_flag(p)
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. passkey_stream<tag>.json)")
    p.add_argument("--save-models", metavar="DIR", default=None, help="write each trained model to DIR/<model>.pt")
    p.add_argument("--from-saved", metavar="DIR", default=None,
                   help="train nothing: score the models that --save-models wrote to DIR")
    p.add_argument("--init-from", metavar="DIR", default=None,
                   help="start each model from the one --save-models wrote to DIR, and train only the --then phases")
    return p


def add_memory_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", default="", help=f"MemoryConfig fields of the core of {', '.join(MEMORY_MODELS)}, "
                   "e.g. negative_eigenvalues=true,proj_chunk_size=1 or retain_toward=init (docs/design.md §3–4)")


def check_memory_models(mode: Mapping[str, Any], names: Sequence[str], models_arg: str) -> None:
    """`--memory` must reach a model whose core takes it (`MEMORY_MODELS`)."""
    if mode.get("memory") and not set(names) & set(MEMORY_MODELS):
        raise ValueError(f"--memory sets the core of {MEMORY_MODELS}, which --models={models_arg!r} does not list")


def parse_memory(text: str) -> dict[str, Any]:
    """`--memory "negative_eigenvalues=true,proj_chunk_size=1"` → MemoryConfig fields (validated by MemoryConfig)."""
    from dataclasses import fields

    from hope.memory.config import MemoryConfig

    known = [f.name for f in fields(MemoryConfig)]
    out: dict[str, Any] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"--memory takes KEY=VALUE items separated by commas, got {item!r}")
        if key not in known:
            raise ValueError(f"--memory: unknown MemoryConfig field {key!r}; choose from {known}")
        low = value.lower()
        out[key] = (low == "true" if low in ("true", "false") else
                    int(value) if value.lstrip("-").isdigit() else _number_or_text(value))
    MemoryConfig(**out)  # unknown fields and bad values fail here, with MemoryConfig's message
    return out


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value




def sweep_mode(modes: Mapping[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """A copy of the budget of `--mode` with `--size`, `--steps` (where given) and `--device` applied."""
    mode = dict(modes[mode_name(args)])
    mode["size"] = args.size or mode["size"]
    mode["steps"] = args.steps or mode["steps"]
    mode["device"] = args.device
    if getattr(args, "memory", ""):
        mode["memory"] = parse_memory(args.memory)
    return mode


def run_sweep(bench: str, args: argparse.Namespace, mode: dict[str, Any], make: Callable[[int, int, int], Any],
              train_setting: int, test_settings: Sequence[int], vocab_size: int, candidates: Tensor | None,
              xlabel: str, score: str) -> dict[str, Any]:
    """A whole sweep benchmark: every model of `--models` that builds here trained at `train_setting` and scored
    at each of `test_settings` (`sweep`, resumable with `--resume`), then its result files (`write_sweep`, the
    settings on a log axis); `score` says what the numbers are. Returns the result document."""
    names, skipped = available_models(parse_models(args.models))
    check_memory_models(mode, names, args.models)
    bench += args.tag
    partial = Partial(bench, args.out, {"mode": mode_name(args), **mode, "seed": args.seed}, args.resume)
    if args.from_saved and args.init_from:
        raise ValueError("--from-saved scores saved models and --init-from trains them further: give one of them")
    results = sweep(names, make, train_setting, test_settings, vocab_size, candidates, mode, args.seed, partial,
                    args.save_models, args.from_saved, args.init_from)
    doc = {"mode": mode_name(args), "config": mode, "train_setting": train_setting, "test_settings": test_settings,
           "score": score, "results": results, "skipped": skipped}
    return write_sweep(bench, doc, test_settings, xlabel, args.out, logx=True, partial=partial)


def sweep_table(doc: dict[str, Any], xlabel: str) -> str:
    """Markdown table: per model, exact match and per-query (token) accuracy in % at every test setting."""
    from experiments.common.models import LABELS
    from experiments.common.results import markdown_table

    settings = doc["test_settings"]
    memory = doc.get("config", {}).get("memory") or {}
    note = lambda m: f" ({', '.join(f'{k}={v}' for k, v in memory.items())})" if memory and m in MEMORY_MODELS else ""
    rows = [[LABELS[m] + note(m), r["params"]] + (["diverged"] * len(settings) if r.get("diverged") else
                                        [f"{100 * e:.1f} / {100 * a:.1f}" for e, a in
                                         zip(r["exact_match"], r["token_accuracy"])])
            for m, r in doc["results"].items()]
    return markdown_table(["model", "params"] + [f"{xlabel} {s}: exact / per-token %" for s in settings], rows)


def plot_sweep(path: Path, doc: dict[str, Any], xlabel: str, logx: bool = False) -> Path:
    """Two panels against the test setting: exact match and per-token accuracy, one line per model."""
    from experiments.common.models import LABELS
    from experiments.common.results import pyplot, save_figure

    plt = pyplot()
    settings = doc["test_settings"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, ylabel in zip(axes, ("exact_match", "token_accuracy"), ("exact match", "per-token accuracy")):
        for m, r in doc["results"].items():
            ys = [float("nan") if v is None else v for v in r[key]]
            ax.plot(settings, ys, marker="o", label=LABELS[m] + (" (diverged)" if r.get("diverged") else ""))
        if logx:
            ax.set_xscale("log", base=2)
        ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['benchmark']}: trained at {xlabel} = {doc['train_setting']} ({doc['mode']} mode)")
    return save_figure(fig, path)


def write_sweep(bench: str, doc: dict[str, Any], settings: list[int], xlabel: str, out_dir: str,
                logx: bool = False, partial: Partial | None = None) -> dict[str, Any]:
    """Write `<out_dir>/<bench>.json`, a PNG of exact match and per-token accuracy against the setting, and a
    Markdown table; then drop the run's `partial` file."""
    from experiments.common.results import write_result

    doc = {**doc, "test_settings": list(settings), "xlabel": xlabel, "logx": logx}
    doc["table"] = sweep_table(doc, xlabel)
    path = write_result(bench, doc, out_dir)
    doc["benchmark"] = bench
    render(path)
    if partial is not None:
        partial.finish()
    print(doc["table"])
    return doc


def render(path: str | Path) -> None:
    """Rewrite the table (in the JSON and its `.md`) and the PNG of a sweep's result file from its numbers; the
    run's `meta` (date, command, commit) is kept. `python -m experiments.memory_tasks.harness <result.json>`."""
    path = Path(path)
    doc = json.loads(path.read_text())
    xlabel = doc.get("xlabel") or {"mqar": "pairs", "passkey": "tokens"}.get(doc.get("benchmark"))
    if xlabel is None or "results" not in doc:
        raise ValueError(f"{str(path)!r} is not a sweep result file (benchmark {doc.get('benchmark')!r}); accepted: "
                         "the mqar and passkey results, or one with an 'xlabel'")
    logx = doc.get("logx", True)
    doc["table"] = sweep_table(doc, xlabel)
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    plot_sweep(path.with_suffix(".png"), doc, xlabel, logx)
    path.with_suffix(".md").write_text(doc["table"] + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Redraw the table (JSON and .md) and the PNG of sweep result files "
                                "(mqar, passkey) from their numbers.")
    p.add_argument("results", nargs="+", metavar="JSON", help="a result file, e.g. results/mqar.json")
    args = p.parse_args(argv)
    for arg in args.results:
        if not Path(arg).is_file():
            p.error(f"no result file at {arg!r}: pass the .json a sweep wrote (e.g. results/mqar.json)")
    for arg in args.results:
        try:
            render(arg)
        except (ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
            p.error(str(e))
        print(f"rendered {arg}")


if __name__ == "__main__":
    main()
