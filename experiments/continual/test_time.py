"""Test-time memory: how well a model still knows a document it read earlier in a stream, with no outer steps.

    python -m experiments.continual.test_time --tiny       # seconds, CPU (what the tests run)
    python -m experiments.continual.test_time              # full mode (run time: continual/README.md)

Dimensions: B batch (1 stream), T time, L tokens per document, W window of the windowed Transformer.

Each model is first trained briefly on the corpus's training split (the only outer steps). Then a stream of
held-out documents d_0, d_1, …, d_{n−1} (L tokens each) is read with the in-context state carried from call to
call (attention KV cache, neural memories, CMS fast weights); the weights θ never change. After reading d_k the
state is forked and d_0 is read again: the probe loss ℓ_k is the mean next-token loss on d_0 then, a function of
the distance k·L tokens since d_0 ended. It is compared with

- ℓ_fresh: the loss on d_0 from an empty state (first reading; no memory of it at all);
- a Transformer limited to a fixed window of W tokens (it sees only the last W stream tokens before the probe),
  which forgets d_0 completely once d_0 has left its window.

memory gain g_k = ℓ_fresh − ℓ_k (nats per byte): > 0 while the model remembers d_0. Writes
`<out>/test_time.json`, `.png` (ℓ_k against distance) and `.md` (`test_time<tag>.*` with `--tag`).

With `--ckpt NAME=PATH` (repeatable) the models are checkpoints written by `train.py` (for example the
stream-trained `experiment=hope_stream_small`), probed as they are, with no training here; the documents come
from the held-out splits of the corpus those checkpoints were trained on (`--corpus` to choose another), and
attention models are also probed with a window of `window` tokens.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from experiments.common.cli import base_parser, configured, mode_name, parse_models
from experiments.common.data import check_fits, lm_task, stream
from experiments.common.models import LABELS, build_models, count_params, fork_state, load_checkpoints
from experiments.common.results import Partial, markdown_table, plot_lines, write_result
from experiments.common.train import Diverged, TrainConfig, model_device, train_on_tasks
from hope.eval import logits_of

NAME = "test_time"
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "doc_len": 32, "n_docs": 4, "window": 32, "train_len": 64, "steps": 4, "batch": 4,
             "lr": 3e-3},
    "cpu": {"size": "small", "doc_len": 256, "n_docs": 16, "window": 512, "train_len": 512, "steps": 200,
            "batch": 8, "lr": 1e-3},
    "full": {"size": "small", "doc_len": 256, "n_docs": 32, "window": 768, "train_len": 1024, "steps": 600,
             "batch": 8, "lr": 1e-3},
}


def build_stream(docs: Sequence, n_docs: int, doc_len: int) -> Tensor:
    """The first `n_docs` documents with at least `doc_len` tokens, each cut to `doc_len`: `[n_docs, L]`."""
    if n_docs < 2:
        raise ValueError(f"n_docs must be >= 2 (one to remember, one to read after it), got {n_docs}")
    if doc_len < 2:
        raise ValueError(f"doc_len must be >= 2, got {doc_len}")
    rows = [ids[:doc_len] for ids in (stream([d]) for d in docs) if ids.numel() >= doc_len]
    if len(rows) < n_docs:
        raise ValueError(f"only {len(rows)} documents have >= {doc_len} tokens, need n_docs={n_docs}")
    return torch.stack(rows[:n_docs])  # [n_docs, L]


@torch.no_grad()
def read(model: nn.Module, ids: Tensor, state: Any) -> tuple[float, Any]:
    """Read `ids` `[L]` as one stream piece: mean next-token loss inside it and the new state, cut from the graph
    as stream training cuts it between windows (a model trained with `carry_core=False` drops its core memories
    there and carries only its CMS levels)."""
    out = model(ids[None].to(model_device(model)), state=state)
    logits = logits_of(out)[0, :-1].float()  # [L-1, V]
    loss = nn.functional.cross_entropy(logits, ids[1:].to(logits.device)).item()
    state = getattr(out, "state", None)
    if state is not None and hasattr(model, "detach_state"):
        state = model.detach_state(state)  # cut between pieces as in stream training (`HopeConfig.carry_core`)
    return loss, state


def probe_carried(model: nn.Module, docs: Tensor) -> dict[str, Any]:
    """Stream `docs` `[n, L]` with the state carried; after each document re-read docs[0] from a fork of it."""
    model.eval()
    fresh, _ = read(model, docs[0], None)
    state, probe, stream_loss = None, [], []
    for k in range(docs.shape[0]):
        loss, state = read(model, docs[k], state)
        stream_loss.append(loss)
        probe.append(read(model, docs[0], fork_state(model, state))[0])
    return _summary(docs, fresh, probe, stream_loss)


def probe_windowed(model: nn.Module, docs: Tensor, window: int) -> dict[str, Any]:
    """A fixed-window model: before each probe it reads only the last `window` stream tokens, from an empty state."""
    model.eval()
    n, L = docs.shape
    flat = docs.flatten()  # [n·L]
    fresh, _ = read(model, docs[0], None)
    probe = []
    for k in range(n):
        _, ctx = read(model, flat[max(0, (k + 1) * L - window) : (k + 1) * L], None)
        probe.append(read(model, docs[0], ctx)[0])
    return _summary(docs, fresh, probe, [])


def _summary(docs: Tensor, fresh: float, probe: list[float], stream_loss: list[float]) -> dict[str, Any]:
    L = docs.shape[1]
    return {"distance": [k * L for k in range(docs.shape[0])], "probe_loss": probe, "fresh_loss": fresh,
            "memory_gain": [fresh - p for p in probe], "stream_loss": stream_loss}


def run(argv: Sequence[str] | None = None, docs: Sequence | None = None) -> dict[str, Any]:
    """Parse flags, train and probe every model, write the outputs; return the result document.

    `docs` (Documents) replaces loading `--corpus` (the tests pass local documents).
    """
    args = parser().parse_args(argv)
    with configured(args):
        return _run(args, docs)


def _run(args: argparse.Namespace, docs: Sequence | None) -> dict[str, Any]:
    from hope.data.corpora import load_corpus, split_documents

    mode = dict(MODES[mode_name(args)])
    size, steps = args.size or mode["size"], args.steps or mode["steps"]
    loaded = load_checkpoints(args.ckpt) if args.ckpt else None
    corpus = args.corpus or (_trained_corpus(loaded) if loaded else "wikipedia")
    held_out = split_held_out(docs if docs is not None else load_corpus(corpus))
    stream_ids = build_stream(held_out, mode["n_docs"], mode["doc_len"])  # [n, L]
    if loaded:
        entries = [(name, model, count_params(model), None) for name, (model, _) in loaded.items()]
        steps = 0
    else:
        built, skipped = build_models(parse_models(args.models), size, args.seed, args.device)
        task = lm_task("pretrain", split_documents(docs if docs is not None else load_corpus(corpus))["train"],
                       held_out, mode["train_len"], steps * mode["batch"], 4, args.seed)
        entries = [(b.name, b.model, b.params, task) for b in built]
    check_fits(entries[0][1], (mode["n_docs"] + 1) * mode["doc_len"])  # the last probe's context
    cfg = TrainConfig(steps_per_task=max(steps, 1), batch_size=mode["batch"], lr=mode["lr"], seed=args.seed)
    partial = Partial(NAME + args.tag, args.out, {"mode": mode_name(args), **mode, "steps": steps, "size": size,
                                                  "seed": args.seed, "corpus": corpus if docs is None else None,
                                                  "ckpt": args.ckpt}, args.resume)
    results, rows, curves = {}, [], {}
    for name, model, params, task in entries:
        unit = partial.get(name)
        if unit is None:  # train once (unless loaded), then probe with the state carried (attention: also windowed)
            unit = _probe_model(name, model, params, task, cfg, stream_ids, mode["window"])
            unit = partial.put(name, unit)
        results.update(unit)
    for res in results.values():
        if "diverged" in res:
            rows.append([res["label"], res["params"], res["diverged"], None, None, None, None])
            continue
        rows.append([res["label"], res["params"], res["fresh_loss"], res["probe_loss"][0], res["probe_loss"][-1],
                     res["memory_gain"][0], res["memory_gain"][-1]])
        curves[res["label"]] = (res["distance"], res["probe_loss"])
    L = mode["doc_len"]
    headers = ["model", "params", "fresh loss", "re-read at 0", f"re-read at {(mode['n_docs'] - 1) * L}",
               "gain at 0", "gain at end"]
    table = markdown_table(headers, rows)
    doc = {"mode": mode_name(args), "size": size, "config": {**mode, "steps": steps}, "corpus": corpus,
           "ckpt": args.ckpt, "score": "next-token loss on the first document (nats/byte)", "models": results,
           "skipped": {} if loaded else skipped, "table": table}
    path = write_result(NAME + args.tag, doc, args.out)
    plot_lines(path.with_suffix(".png"), curves, "Loss when re-reading the stream's first document",
               "tokens read since the first document", "loss on first document (nats/byte)")
    path.with_suffix(".md").write_text(table + "\n")
    partial.finish()
    print(table)
    return doc


def split_held_out(docs: Sequence) -> list:
    """The documents no model trains on: the test split, then the validation split."""
    from hope.data.corpora import split_documents

    parts = split_documents(docs)
    return parts["test"] + parts["val"]


def _trained_corpus(loaded: dict[str, tuple[nn.Module, dict[str, Any]]]) -> str:
    """The named corpus every checkpoint was trained on; an error if they differ or one is not a named corpus."""
    sources = {name: cfg["data"]["source"] for name, (_, cfg) in loaded.items()}
    if len(set(sources.values())) != 1:
        raise ValueError(f"the checkpoints were trained on different corpora {sources}; choose one with --corpus")
    return next(iter(sources.values()))


def _probe_model(name: str, model: nn.Module, params: int, task: Any, cfg: TrainConfig, stream_ids: Tensor,
                 window: int) -> dict[str, Any]:
    """Train `model` on `task` (None: it is a loaded checkpoint, used as it is), then probe it with the state
    carried and, for attention models, through a window of `window` tokens. {key: result}."""
    from hope.layers.attention import CausalSelfAttention

    label = LABELS.get(name, name)
    trained = {"R": [[None]], "seconds": 0.0}
    if task is not None:
        print(f"{name}: {cfg.steps_per_task} training steps")
        try:
            trained = train_on_tasks(model, [task], cfg)
        except Diverged as err:  # recorded and shown as such; the other models go on
            print(f"  {err}")
            return {name: {"label": label + " (state carried)", "params": params, "diverged": str(err)}}
    attention = any(isinstance(m, CausalSelfAttention) for m in model.modules())
    windows = [None] + ([window] if (name == "transformer" or (task is None and attention)) else [])
    unit = {}
    for w in windows:
        res = probe_carried(model, stream_ids) if w is None else probe_windowed(model, stream_ids, w)
        unit[name + ("_window" if w else "")] = {
            "label": label + (f" (window {w})" if w else " (state carried)"), "params": params, "window": w, **res,
            "pretrain_eval_loss": trained["R"][0][0], "pretrain_seconds": trained["seconds"]}
    return unit


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--corpus", default=None,
                   help="a corpus of hope.data.corpora.load_corpus (default: wikipedia, or the checkpoints' corpus)")
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH",
                   help="probe this train.py checkpoint instead of training --models (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the result files (test_time<tag>.json)")
    p.add_argument("--steps", type=int, default=None, help="outer training steps before the stream")
    return p


if __name__ == "__main__":
    run()
