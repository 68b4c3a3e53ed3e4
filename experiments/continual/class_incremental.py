"""Class-incremental text classification as next-token prediction of a label token.

    python -m experiments.continual.class_incremental --tiny                # BBC topics only; CPU smoke run
    python -m experiments.continual.class_incremental --mode cpu \
        --backbone transformer=logs/ls_transformer_small/checkpoints/last.ckpt \
        --backbone hope=logs/ls_hope_small/checkpoints/last.ckpt             # which corpus; pretrained backbones
    python -m experiments.continual.class_incremental                       # BBC topics, KJV sections, plays
    python -m experiments.continual.class_incremental --sources hf:clinc150,hf:banking77,hf:dbpedia14  # network
    python -m experiments.continual.class_incremental --sources file:my.jsonl    # {"text": ..., "label": ...}

Dimensions: N examples, T time (tokens per example), K classes.

An example is `pad… text-bytes SEP` (T tokens, left-padded) and its target is the class's label token after SEP;
no other position is scored. Class k's label token is `vocab − K + k`, a byte id of its own. Classes are put in
a seeded random order and cut into tasks of `classes_per_task`; each model learns the tasks in turn (plain
sequential, reservoir replay, EWC) and is scored, after each task, by single-head accuracy: argmax over the K
label tokens of the whole benchmark, so old classes compete with new ones (the class-incremental protocol,
van de Ven et al. 2022, "Three types of incremental learning"). R[i][j] is the accuracy on task j's classes
after task i, for `hope.eval.continual_metrics`. The `joint` strategy is the upper bound: the same total number
of steps on all tasks shuffled together, then the mean of the per-task accuracies. A setting is informative when
that bound reaches at least twice chance (1/K); the result file says so per model (`informative`).

`--backbone NAME=PATH` starts model NAME from a `train.py` checkpoint, or from Hope-Attention made with
`python -m hope.convert` (the paper's §7.3 path); the checkpoint must hold NAME's architecture.

Offline sources: BBC News (5 topics), the KJV with books grouped into 7 sections, Shakespeare's 37 plays (one
class per play, modern spelling), and `corpora`: which of Shakespeare, KJV, Wikipedia and BBC a piece comes from.
Held-out examples come from the `test` split of `hope.data.corpora.split_documents` (whole articles for BBC; the
last 5% of each book or play otherwise). The paper's Figure 6 uses CLINC150, Banking77 and DBpedia14 with Llama-3
backbones; `hf:<name>` loads them.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from experiments.common.cli import base_parser, configured, continual_flags, mode_name, parse_models
from experiments.common.data import check_fits, encode
from experiments.common.models import LABELS, BuiltModel, build_model, build_models, count_params
from experiments.common.results import Partial, markdown_table, plot_lines, publish, replot
from experiments.common.train import (
    STRATEGIES,
    Diverged,
    Task,
    TrainConfig,
    evaluate,
    run_strategy,
    strategy_config,
    train_on_tasks,
)
from hope.eval import IGNORE_INDEX

NAME = "class_incremental"
PAD, SEP = 0, 1  # byte 0 and 1 never occur in the corpora's text
KJV_SECTIONS = {
    "law": "Genesis Exodus Leviticus Numbers Deuteronomy",
    "history": "Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther",
    "wisdom": "Job Psalms Proverbs Ecclesiastes Song_of_Solomon",
    "major_prophets": "Isaiah Jeremiah Lamentations Ezekiel Daniel",
    "minor_prophets": "Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi",
    "gospels_acts": "Matthew Mark Luke John Acts",
    "letters": "Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians 1_Thessalonians "
    "2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude "
    "Revelation",
}
SHAKESPEARE_POEMS = {"A Lover's Complaint", "The Passionate Pilgrim", "The Phoenix and the Turtle",
                     "The Rape of Lucrece", "Sonnets", "Venus and Adonis"}
# name -> (dataset, config, text column, label column, classes per task)
HF_SOURCES = {
    "clinc150": ("clinc_oos", "plus", "text", "intent", 15),
    "banking77": ("PolyAI/banking77", None, "text", "label", 7),
    "dbpedia14": ("fancyzhx/dbpedia_14", None, "content", "label", 2),
}
CORPUS_CLASSES = ("shakespeare", "kjv", "wikipedia", "bbc")  # source "corpora": which corpus a piece is from
CLASSES_PER_TASK = {"bbc": 2, "kjv": 2, "shakespeare": 5, "corpora": 2}
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"sources": "bbc", "size": "tiny", "seq_len": 32, "steps": 4, "batch": 4, "max_per_class": 16,
             "eval_per_class": 4, "lr": 3e-3, "replay_capacity": 64, "replay_batch": 2, "ewc_strength": 100.0,
             "ewc_batches": 2},
    "cpu": {"sources": "corpora", "size": "small", "seq_len": 64, "steps": 60, "batch": 16, "max_per_class": 1000,
            "eval_per_class": 40, "lr": 1e-3, "replay_capacity": 512, "replay_batch": 8, "ewc_strength": 1000.0,
            "ewc_batches": 8},
    "full": {"sources": "bbc,kjv,shakespeare", "size": "small", "seq_len": 128, "steps": 200, "batch": 32,
             "max_per_class": 2000, "eval_per_class": 50, "lr": 1e-3, "replay_capacity": 1024, "replay_batch": 16,
             "ewc_strength": 1000.0, "ewc_batches": 16},
}


def labelled_documents(source: str) -> list:
    """Documents whose `.label` is the class: BBC topic, KJV section, Shakespeare play, or a file / HF label."""
    from hope.data.corpora import Document, load_corpus, load_hf_documents, load_text_files

    if source == "bbc":
        return load_corpus("bbc")
    if source == "corpora":
        return [Document(d.source, d.title, d.text, name) for name in CORPUS_CLASSES for d in load_corpus(name)]
    if source == "kjv":
        section = {book.replace("_", " "): name for name, books in KJV_SECTIONS.items() for book in books.split()}
        return [Document(d.source, d.title, d.text, section[d.title]) for d in load_corpus("kjv")]
    if source == "shakespeare":
        return [Document(d.source, d.title, d.text, d.title) for d in load_corpus("shakespeare")
                if d.title not in SHAKESPEARE_POEMS and not d.title.endswith(" (First Folio)")]
    if source.startswith("file:"):
        docs = load_text_files([source.removeprefix("file:")])
        if any(d.label is None for d in docs):
            raise ValueError(f"{source}: every record needs a 'label' field")
        return docs
    if source.startswith("hf:") and source.removeprefix("hf:") in HF_SOURCES:
        name, config, text_field, label_field, _ = HF_SOURCES[source.removeprefix("hf:")]
        if label_field == "label":
            return load_hf_documents(name, config, split="train", text_field=text_field, streaming=False)
        return _hf_with_label_field(name, config, text_field, label_field)
    raise ValueError(f"unknown source {source!r}; use bbc, kjv, shakespeare, corpora, file:<path.jsonl> or "
                     f"hf:{{{','.join(HF_SOURCES)}}}")


def _hf_with_label_field(name: str, config: str | None, text_field: str, label_field: str) -> list:
    """CLINC150 stores its class in an `intent` column; map it to names and drop the out-of-scope class."""
    import datasets

    from hope.data.corpora import Document

    ds = datasets.load_dataset(name, config, split="train")
    names = ds.features[label_field].int2str
    return [Document(f"hf:{name}", f"{name}/{i}", r[text_field], names(r[label_field]))
            for i, r in enumerate(ds) if names(r[label_field]) != "oos"]


def group_classes(classes: Sequence[str], per_task: int, seed: int) -> list[list[str]]:
    """Seeded random class order cut into consecutive tasks of `per_task` classes (the last may be smaller)."""
    if not isinstance(per_task, int) or per_task <= 0:
        raise ValueError(f"classes_per_task must be a positive int, got {per_task!r}")
    order = sorted(set(classes))
    random.Random(seed).shuffle(order)
    return [order[i : i + per_task] for i in range(0, len(order), per_task)]


def _examples(docs: Sequence, seq_len: int, limit: int, rng: random.Random) -> torch.Tensor:
    """Up to `limit` examples `[N, T]`: pieces of T−1 bytes of the documents, left-padded, then SEP.

    Pieces are cut at multiples of T−1 in each document (a short tail of a long document is dropped: it says
    little about its class); `limit` of them are drawn at random, so only the kept pieces are materialised.
    """
    width = seq_len - 1
    ids = [encode(d.text) for d in docs]  # each [L_d]
    pieces = [(k, s) for k, x in enumerate(ids) for s in range(0, x.numel(), width)
              if s == 0 or x.numel() - s >= min(width, 8)]
    rng.shuffle(pieces)
    rows = []
    for k, s in pieces[:limit]:
        piece = ids[k][s : s + width]
        rows.append(torch.cat([torch.full((width - piece.numel(),), PAD), piece, torch.tensor([SEP])]))
    return torch.stack(rows) if rows else torch.empty(0, seq_len, dtype=torch.long)


def build_tasks(docs: Sequence, groups: Sequence[Sequence[str]], seq_len: int, max_per_class: int,
                eval_per_class: int, seed: int, vocab_size: int = 256) -> tuple[list[Task], torch.Tensor]:
    """Tasks of (example, label-token) pairs for the class `groups`, and the label tokens of all classes `[K]`.

    Raises `ValueError` for no tasks, an empty group, a class in two tasks, a class with no documents or no
    held-out text, more classes than free token ids, or a sequence too short to hold text and SEP.
    """
    from hope.data.corpora import split_documents

    if not groups:
        raise ValueError("class-incremental needs at least one task, got none")
    seen: dict[str, int] = {}
    for t, group in enumerate(groups):
        if not group:
            raise ValueError(f"task {t} has no classes")
        for c in group:
            if c in seen:
                raise ValueError(f"class {c!r} is in task {seen[c]} and task {t}: tasks must not share classes")
            seen[c] = t
    classes = [c for g in groups for c in g]
    if len(classes) > vocab_size - 2:
        raise ValueError(f"{len(classes)} classes do not fit a vocabulary of {vocab_size} next to PAD and SEP")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (text and SEP), got {seq_len}")
    label_token = {c: vocab_size - len(classes) + k for k, c in enumerate(classes)}
    parts = split_documents([d for d in docs if d.label in label_token])
    rng = random.Random(seed)
    tasks = []
    for t, group in enumerate(groups):
        split = {}
        for name, per_class in (("train", max_per_class), ("test", eval_per_class)):
            xs, ys = [], []
            for c in group:
                x = _examples([d for d in parts[name] if d.label == c], seq_len, per_class, rng)  # [n, T]
                if x.shape[0] == 0:
                    raise ValueError(f"class {c!r} has no {name} text (documents: "
                                     f"{sum(d.label == c for d in docs)})")
                y = torch.full_like(x, IGNORE_INDEX)
                y[:, -1] = label_token[c]
                xs.append(x)
                ys.append(y)
            split[name] = (torch.cat(xs), torch.cat(ys))
        tasks.append(Task(f"t{t}", *split["train"], *split["test"]))  # the classes of task t: groups[t]
    return tasks, torch.tensor([label_token[c] for c in classes])


def joint_task(tasks: Sequence[Task]) -> Task:
    """Every task's training and held-out rows in one task: the joint-training upper bound sees all classes at
    once (rows drawn at random from the union, so the classes are shuffled together)."""
    cat = [torch.cat([getattr(t, f) for t in tasks]) for f in ("train_inputs", "train_targets", "eval_inputs",
                                                                  "eval_targets")]
    return Task("joint", *cat)


def run_joint(partial: Partial, key: str, label: str, build: Callable[[], BuiltModel], tasks: Sequence[Task],
              cfg: TrainConfig, candidates: torch.Tensor) -> dict[str, Any]:
    """The joint-training upper bound of one model: `cfg.steps_per_task · len(tasks)` steps (the total budget of
    a sequential run) on all tasks shuffled together, then the accuracy on each task's held-out rows.

    `accuracy` lists the per-task accuracies and `average_accuracy` their mean: the quantity a continual run's
    final average accuracy is compared with. Saved in `partial` under `key` like a strategy unit."""
    unit = partial.get(key)
    if unit is not None:
        return unit
    print(label)
    model = build().model
    steps = cfg.steps_per_task * len(tasks)
    try:
        out = train_on_tasks(model, [joint_task(tasks)], replace(cfg, steps_per_task=steps), candidates=candidates)
    except Diverged as err:
        print(f"  {err}")
        return partial.put(key, {"diverged": str(err)})
    acc = [evaluate(model, t.eval_inputs, t.eval_targets, cfg.eval_batch_size, candidates) for t in tasks]
    print("  joint: " + " ".join(f"{t.name}={a:.3f}" for t, a in zip(tasks, acc)))
    return partial.put(key, {"steps": steps, "accuracy": acc, "average_accuracy": sum(acc) / len(acc),
                             "train_loss": out["train_loss"][0], "seconds": out["seconds"]})


FAMILIES = {  # model name -> (core, whether its CMS levels write in context)
    "transformer": ("attention", False), "hope_attention": ("attention", True), "titans": ("titans", False),
    "hope": ("self_modifying", True),
}


def parse_backbones(items: Sequence[str] | None, names: Sequence[str]) -> dict[str, str]:
    """`--backbone NAME=PATH` flags as {model name: checkpoint path}; each NAME must be one of the `--models`."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path or name not in names:
            raise ValueError(f"--backbone takes NAME=PATH with NAME one of the --models {list(names)}, got {item!r}")
        if name in out:
            raise ValueError(f"--backbone gives model {name!r} twice ({out[name]!r} and {path!r})")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--backbone {name}: checkpoint {path!r} does not exist")
        out[name] = path
    return out


def load_backbone(name: str, path: str, device: str) -> BuiltModel:
    """Model `name` with the weights of the train.py (or `hope.convert`) checkpoint at `path`, in train mode.

    Raises `ValueError` when the checkpoint holds another architecture than `name` (e.g. a HOPE checkpoint given
    for transformer), naming both."""
    from hope.training.inference import load_checkpoint

    model = load_checkpoint(path)[0].model
    cfg = model.config
    found = (cfg.core, bool(cfg.fast_periods))
    if found != FAMILIES[name]:
        have = next((n for n, f in FAMILIES.items() if f == found), "unknown")
        raise ValueError(f"--backbone {name}={path}: the checkpoint holds a {have} model (core {cfg.core!r}, CMS "
                         f"periods {cfg.fast_periods}), not a {name} model")
    if cfg.vocab_size != 256:
        raise ValueError(f"--backbone {name}={path}: the benchmark reads bytes (vocabulary 256), the checkpoint's "
                         f"vocabulary is {cfg.vocab_size}")
    return BuiltModel(name, model.train().to(device), count_params(model))


def run(argv: Sequence[str] | None = None, sources: Mapping[str, Sequence] | None = None) -> dict[str, Any]:
    """Parse flags, run every (source, model, strategy), write the outputs; return the result document.

    `sources` ({name: labelled Documents}) replaces loading `--sources` (the tests pass local documents).
    """
    args = parser().parse_args(argv)
    if args.replot:  # redraw the figure of a result file, nothing trained
        return replot(args.replot, plot)
    with configured(args):
        return _run(args, sources)


def _run(args: argparse.Namespace, sources: Mapping[str, Sequence] | None) -> dict[str, Any]:
    mode = dict(MODES[mode_name(args)])
    size, steps = args.size or mode["size"], args.steps or mode["steps"]
    names = list(sources) if sources is not None else (args.sources or mode["sources"]).split(",")
    models = parse_models(args.models)
    strategies = parse_strategies(args.strategies)
    backbones = parse_backbones(args.backbone, models)
    built, skipped = build_models([m for m in models if m not in backbones], size, args.seed, args.device) \
        if set(models) - set(backbones) else ([], {})
    built += [load_backbone(m, backbones[m], args.device) for m in models if m in backbones]
    built.sort(key=lambda b: models.index(b.name))
    check_fits(built[0].model, mode["seq_len"])
    partial = Partial(NAME, args.out, {"mode": mode_name(args), **mode, "steps": steps, "size": size,
                                       "seed": args.seed, "classes_per_task": args.classes_per_task,
                                       "backbones": backbones}, args.resume)
    results, rows = {}, []
    for source in names:
        docs = sources[source] if sources is not None else labelled_documents(source)
        hf = HF_SOURCES.get(source.removeprefix("hf:"))
        per_task = args.classes_per_task or CLASSES_PER_TASK.get(source, hf[4] if hf else 2)
        groups = group_classes([d.label for d in docs], per_task, args.seed)
        tasks, candidates = build_tasks(docs, groups, mode["seq_len"], mode["max_per_class"],
                                        mode["eval_per_class"], args.seed)
        chance = 1 / len(candidates)
        results[source] = {"groups": groups, "chance": chance, "models": {}}
        for entry in built:
            runs = results[source]["models"][entry.name] = {"params": entry.params, "strategies": {},
                                                            "backbone": backbones.get(entry.name)}
            build = (functools.partial(load_backbone, entry.name, backbones[entry.name], args.device)
                     if entry.name in backbones else
                     functools.partial(build_model, entry.name, size, args.seed, args.device))
            for strategy in strategies:
                key, label = f"{source}/{entry.name}/{strategy}", f"{source}: {entry.name} / {strategy}"
                fresh, load_before = partial.get(key) is None, os.getloadavg()[0]
                if strategy == "joint":
                    cfg = strategy_config(mode, steps, "sequential", args.seed)
                    unit = run_joint(partial, key, label, build, tasks, cfg, candidates)
                else:
                    unit = run_strategy(partial, key, label, build, tasks,
                                        strategy_config(mode, steps, strategy, args.seed), candidates=candidates)
                if fresh:  # the machine's 1-minute load average when the unit started and ended (shared CPUs)
                    unit = partial.put(key, {**unit, "load_average": [load_before, os.getloadavg()[0]]})
                runs["strategies"][strategy] = unit
                rows.append(table_row(source, entry, backbones.get(entry.name), strategy, unit, chance))
        for entry in results[source]["models"].values():
            joint = entry["strategies"].get("joint", {})
            if "average_accuracy" in joint:
                entry["informative"] = joint["average_accuracy"] >= 2 * chance
    headers = ["source", "model", "backbone", "strategy", "params", "final acc", "avg incr. acc", "BWT",
               "forgetting", "s"]
    table = markdown_table(headers, rows)
    doc = {"mode": mode_name(args), "size": size, "config": {**mode, "steps": steps},
           "score": "single-head accuracy over all label tokens", "sources": results, "skipped": skipped,
           "backbones": backbones, "table": table}
    publish(NAME, doc, args.out, lambda png: plot(doc, png), partial)
    return doc


def parse_strategies(text: str) -> list[str]:
    """`--strategies` as a list: `joint` (the upper bound) and the continual strategies of `STRATEGIES`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("joint", *STRATEGIES)]
    if not names or bad:
        raise ValueError(f"--strategies must list names from {('joint', *STRATEGIES)}, got {text!r}")
    return names


def backbone_label(path: str | None) -> str:
    """A backbone's short name in the table: the run folder of `<run>/checkpoints/x.ckpt`, else the file's stem."""
    if path is None:
        return "random init"
    p = Path(path)
    return p.parent.parent.name if p.parent.name == "checkpoints" else p.stem


def table_row(source: str, entry: BuiltModel, backbone: str | None, strategy: str, unit: Mapping[str, Any],
              chance: float) -> list:
    """One row of the Markdown table. The joint upper bound has a final accuracy only (its strategy cell says
    how many times chance it is); a diverged unit shows its message."""
    head = [source, LABELS[entry.name], backbone_label(backbone), strategy, entry.params]
    if "diverged" in unit:
        return head + [unit["diverged"]] + [None] * 4
    if strategy == "joint":
        head[3] = f"joint (upper bound, {unit['average_accuracy'] / chance:.1f}× chance)"
        return head + [unit["average_accuracy"], None, None, None, f"{unit['seconds']:.1f}"]
    m = unit["metrics"]
    return head + [m["average_accuracy"], m["average_incremental_accuracy"], m["backward_transfer"],
                   m["average_forgetting"], f"{unit['seconds']:.1f}"]


def plot(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Mean accuracy over the tasks seen so far, after each task, per (source, model, strategy); diverged runs
    left out."""
    curves = {}
    for source, res in doc["sources"].items():
        for name, entry in res["models"].items():
            for strategy, unit in entry["strategies"].items():
                if "diverged" not in unit and strategy != "joint":  # joint has no per-task curve
                    R = unit["R"]
                    curves[f"{source}: {LABELS.get(name, name)} / {strategy}"] = (
                        range(1, len(R) + 1), [sum(r[: i + 1]) / (i + 1) for i, r in enumerate(R)])
    return plot_lines(path, curves, "Class-incremental accuracy on the classes seen so far", "tasks learned",
                      "accuracy (seen classes)")


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sources", default=None, help="comma-separated: bbc, kjv, shakespeare, file:<path.jsonl>, "
                   "hf:clinc150|banking77|dbpedia14 (default: bbc with --tiny, else bbc,kjv,shakespeare)")
    p.add_argument("--classes-per-task", type=int, default=None, help="default: 2 (BBC, KJV), 5 (plays), by HF set")
    p.add_argument("--backbone", action="append", metavar="NAME=PATH",
                   help="start model NAME from a train.py or hope.convert checkpoint (repeat per model); the "
                   "others start from random weights")
    continual_flags(p, "task")
    p.set_defaults(strategies=",".join(("joint", *STRATEGIES)))
    next(a for a in p._actions if a.dest == "strategies").help = (
        f"subset of {('joint', *STRATEGIES)}; joint: the upper bound, all tasks shuffled together")
    return p


if __name__ == "__main__":
    run()
