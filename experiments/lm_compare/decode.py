"""Generation speed against context length: tokens/s of one-token steps after 1K, 4K and 16K tokens of context.

    python -m experiments.lm_compare.decode --tiny        # seconds (what the tests run)
    python -m experiments.lm_compare.decode               # small preset, contexts 1K/4K/16K, batch 1, 2 threads

Dimensions: B batch (1), T time, L context length, N timed new tokens, V vocabulary.

A Transformer++ step attends over a KV cache that grows with the context, so its cost per token grows with L; a
recurrent core (Titans, HOPE) carries a fixed-size state, so its cost should stay flat. For each model one stream
of random byte ids is prefilled up to each context length in turn — in pieces of `--prefill-chunk` tokens with
the state carried, which bounds memory — and then N tokens are generated greedily, one `model(ids, state)` call
each, timed; the models take these steps round-robin, one token each in turn, so that the load of a shared machine
hits them alike. A CMS level of period C writes its weights every C tokens (an inner backward pass), so every
context and N are multiples of the write cycle A = lcm of the compared models' CMS periods: the reported rate (N /
total time) includes each level's writes in their true proportion, the amortized cost: the writes due at L (the
prefill's last chunks) are applied, untimed, before the first timed step, and those due at L + N (the last chunks
generated), which the model would apply at its next call, are timed with the last step. The median and the longest
single step are reported beside it. Also reported: the prefill rate and the size of the carried state (KV cache or
fast memories) in MiB. Random weights: speed does not depend on what was learned. Writes `<out>/decode.json`
and `<out>/decode.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.common.models import LABELS, MODEL_NAMES, build_models
from experiments.common.results import markdown_table, plot_lines, write_result

NAME = "decode"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
WARMUP_TOKENS = 8  # untimed one-token steps on a throw-away stream before each model's sweep
MODES: dict[str, dict[str, Any]] = {
    # new_tokens None: one write cycle A (the lcm of the CMS periods), at least 64
    "tiny": {"size": "tiny", "contexts": [256, 768], "new_tokens": None, "prefill_chunk": 256, "threads": 1},
    "full": {"size": "small", "contexts": [1024, 4096, 16384], "new_tokens": None, "prefill_chunk": 512,
             "threads": 2},
}


def write_cycle(names: Sequence[str], size: str | int) -> int:
    """A = lcm of every finite CMS period of the named presets (1 when none has one)."""
    from hope import preset

    return math.lcm(1, *[p for name in names for p in preset(name, size).fast_periods])


def state_mib(state: Any) -> float:
    """Bytes of the distinct tensors in a (nested) model state (dataclasses, dicts, lists), in MiB."""
    seen: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr()] = max(seen.get(x.data_ptr(), 0), x.numel() * x.element_size())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(state)
    return sum(seen.values()) / 2**20


def check_logits(name: str, logits: torch.Tensor, pos: int) -> None:
    """Refuse to time a model whose outputs are not finite."""
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"model {name!r} produced non-finite logits at stream position {pos}: not timing it")


class Stream:
    """One model's generation stream: its state, last logits `[1, V]`, position, and random-id source."""

    def __init__(self, name: str, model: torch.nn.Module, seed: int) -> None:
        self.name, self.model = name, model
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab = model.config.vocab_size
        self.state, self.logits, self.pos = None, None, 0
        self.times: list[float] = []

    def ids(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (1, n), generator=self.gen)  # [1, n]

    @torch.no_grad()
    def warm_up(self) -> None:
        """A throw-away stream: one-off allocations and lazy set-up are not timed."""
        warm = None
        for _ in range(WARMUP_TOKENS):
            warm = self.model(self.ids(1), warm).state

    @torch.no_grad()
    def prefill(self, length: int, chunk: int) -> float | None:
        """Feed random ids up to position `length` in pieces of `chunk`; returns tokens/s (None if none fed)."""
        t0, first = time.perf_counter(), self.pos
        while self.pos < length:
            out = self.model(self.ids(min(chunk, length - self.pos)), self.state)
            self.logits, self.state, self.pos = out.logits[:, -1], out.state, self.pos + out.logits.shape[1]
        self.flush()  # the writes due at `length` are the prefill's
        check_logits(self.name, self.logits, self.pos)
        return (length - first) / (time.perf_counter() - t0) if length > first else None

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the in-context writes due at the current position now; a model applies them lazily, at its next
        call. Nothing else changes (for a model without CMS writes this only cuts the state from the graph)."""
        self.state = self.model.detach_state(self.state)

    @torch.no_grad()
    def step(self) -> None:
        """One timed greedy token."""
        t0 = time.perf_counter()
        out = self.model(self.logits.argmax(dim=-1, keepdim=True), self.state)  # [1, 1] in
        self.logits, self.state, self.pos = out.logits[:, -1], out.state, self.pos + 1  # [1, V]
        self.times.append(time.perf_counter() - t0)


def sweep_contexts(streams: list[Stream], contexts: list[int], n_new: int, chunk: int) -> dict[str, list[dict]]:
    """For each context: prefill every stream to it, then `n_new` timed tokens round-robin (one token of each
    model in turn, so a change in the machine's load hits every model alike)."""
    rows: dict[str, list[dict]] = {s.name: [] for s in streams}
    for st in streams:
        st.warm_up()
    for L in contexts:
        prefill = {st.name: st.prefill(L, chunk) for st in streams}
        for st in streams:
            st.times = []
        for _ in range(n_new):
            for st in streams:
                st.step()
        for st in streams:
            # the writes of the last chunks generated (due at L + N) would run at the next call: timed with the last
            # step, so the window counts every level's writes once per write cycle
            t0 = time.perf_counter()
            st.flush()
            st.times[-1] += time.perf_counter() - t0
            check_logits(st.name, st.logits, st.pos)
            t = st.times
            rows[st.name].append({
                "context": L, "tokens_per_s": n_new / sum(t), "median_step_ms": 1e3 * statistics.median(t),
                "max_step_ms": 1e3 * max(t), "prefill_tokens_per_s": prefill[st.name], "state_mib": state_mib(st.state),
            })
            print(f"  {st.name} @ {L}: {n_new / sum(t):.1f} tokens/s (median step {1e3 * statistics.median(t):.1f} "
                  f"ms, longest {1e3 * max(t):.0f} ms), state {rows[st.name][-1]['state_mib']:.2f} MiB", flush=True)
    return rows


def check_mode(mode: dict[str, Any], cycle: int) -> None:
    """Contexts and N: positive multiples of the write cycle, ascending, and far enough apart for one stream."""
    bad = [c for c in mode["contexts"] if c <= 0 or c % cycle]
    if bad or mode["new_tokens"] <= 0 or mode["new_tokens"] % cycle:
        raise ValueError(f"contexts and --new-tokens must be positive multiples of {cycle} (the CMS write cycle, lcm "
                         f"of the periods), got contexts {mode['contexts']} and new tokens {mode['new_tokens']}")
    if mode["prefill_chunk"] <= 0:
        raise ValueError(f"--prefill-chunk must be positive, got {mode['prefill_chunk']}")
    if sorted(set(mode["contexts"])) != list(mode["contexts"]):
        raise ValueError(f"contexts must be distinct and ascending, got {mode['contexts']}")
    for lo, hi in zip(mode["contexts"], mode["contexts"][1:]):
        if hi - lo < mode["new_tokens"]:
            raise ValueError(f"contexts {lo} and {hi} are closer than --new-tokens={mode['new_tokens']}: the stream "
                             "that reaches one context already holds the previous context's generated tokens")


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    mode = dict(MODES["tiny" if args.tiny else "full"])
    if args.contexts is not None:
        mode["contexts"] = [int(c) for c in args.contexts.split(",")]
    for key in ("size", "new_tokens", "prefill_chunk", "threads"):
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    if isinstance(mode["size"], str) and mode["size"].isdigit():
        mode["size"] = int(mode["size"])  # a depth
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if not names or bad:
        raise ValueError(f"--models={args.models!r}: unknown models {bad}; choose from {list(MODEL_NAMES)}")
    cycle = write_cycle(names, mode["size"])
    mode["write_cycle"] = cycle
    if mode["new_tokens"] is None:
        mode["new_tokens"] = cycle * -(-64 // cycle)
    check_mode(mode, cycle)
    before = torch.get_num_threads()
    torch.set_num_threads(mode["threads"])
    try:
        built, skipped = build_models(names, mode["size"], args.seed)
        load_start = list(os.getloadavg())
        streams = [Stream(b.name, b.model.eval(), args.seed) for b in built]
        rows = sweep_contexts(streams, mode["contexts"], mode["new_tokens"], mode["prefill_chunk"])
        results = {b.name: {"params": b.params, "by_context": rows[b.name]} for b in built}
        load_end = list(os.getloadavg())
    finally:
        torch.set_num_threads(before)
    return write(args, mode, results, skipped, [load_start, load_end], argv)


def write(args: argparse.Namespace, mode: dict[str, Any], results: dict[str, Any], skipped: dict[str, str],
          loads: list[list[float]], argv: Sequence[str] | None) -> dict[str, Any]:
    """The JSON, the PNG (tokens/s against context) and the printed table."""
    contexts = mode["contexts"]
    rows = []
    for name, r in results.items():
        by_l = {row["context"]: row for row in r["by_context"]}
        first, last = by_l[contexts[0]]["tokens_per_s"], by_l[contexts[-1]]["tokens_per_s"]
        r["slowdown_last_vs_first"] = first / last  # 1.0 = flat cost per token
        rows.append([LABELS[name], *[round(by_l[c]["tokens_per_s"], 1) for c in contexts], r["slowdown_last_vs_first"],
                     by_l[contexts[-1]]["state_mib"]])
    headers = ["model", *[f"tok/s @ {c}" for c in contexts], f"slowdown {contexts[-1]} vs {contexts[0]}",
               f"state MiB @ {contexts[-1]}"]
    table = markdown_table(headers, rows, digits=2)
    doc = {
        "command": " ".join(["python -m experiments.lm_compare.decode", *(list(argv) if argv is not None
                                                                           else sys.argv[1:])]),
        "mode": "tiny" if args.tiny else "full", "config": mode, "dtype": "float32", "batch": 1,
        "note": "random weights and random ids (speed only); greedy one-token steps after a chunked prefill; "
        "tokens/s = new tokens / total time; shared machine: see loadavg_start/end",
        "loadavg_start": loads[0], "loadavg_end": loads[1], "results": results, "skipped": skipped, "table": table,
    }
    out = Path(args.out) if args.out else DEFAULT_OUT / ("tiny" if args.tiny else "")
    path = write_result(NAME, doc, out)
    series = {LABELS[n]: (contexts, [row["tokens_per_s"] for row in r["by_context"]]) for n, r in results.items()}
    plot_lines(out / f"{NAME}.png", series, f"generation, batch 1, {mode['size']} preset, random weights",
               "context (tokens)", "tokens / s", logx=True)
    print(table)
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--models", default="transformer,titans,hope", help="comma-separated presets")
    p.add_argument("--size", default=None, help="preset size (default: small; tiny with --tiny)")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths (default 1024,4096,16384)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=None,
                   help="timed tokens per context (default: the CMS write cycle, at least 64)")
    p.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, default=None, help="prefill piece (512)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; 1 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: results/, results/tiny/ with --tiny)")
    return p


if __name__ == "__main__":
    run()
