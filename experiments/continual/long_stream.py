"""Long streams: does a model's carried memory help at every distance, and does it stay bounded?

    python -m experiments.continual.long_stream eval --ckpt hope=logs/hope_stream_small/checkpoints/last.ckpt \
        --ckpt transformer=logs/transformer_stream_small/checkpoints/last.ckpt      # loss against position
    python -m experiments.continual.long_stream norms --ckpt hope=...               # state norms over 1M tokens
    python -m experiments.continual.long_stream norms --replot results/long_stream_norms.json  # redraw its plot
    python -m experiments.continual.long_stream cost                                # stream vs reset step cost
    python -m experiments.continual.long_stream eval --tiny                         # seconds (what the tests run)

Dimensions: B batch (streams read side by side), T window (tokens per call), N stream length.

- `eval`: the first N tokens (default 65,536 bytes) of the held-out test split of the corpus a checkpoint was
  trained on, read in windows of T with the model's state **carried** from window to window (cut from the graph
  between windows, as in stream training) and with it **reset** at every window. Each token's next-token loss is
  kept; the table gives the mean loss (nats per byte) in position buckets 0–512, 512–2K, 2K–8K, 8K–16K and 16K–N,
  carried against reset, and the plot the mean loss of each window. Memory helps where carried < reset.
- `norms`: B streams of the train split read with the state carried for N tokens in all (default 1M); after
  every window the Frobenius norm (mean over rows) of every fast memory: each core memory of each block (e.g.
  `proj.S`, `mem.S`) and each CMS level's fast weights θ_0 − Δ. The plot shows each norm against tokens, divided
  by its value after the first window, one panel per block and one line per memory and level; bounded memories
  level off.
- `cost`: a training step of one model in stream mode (state carried, cut after the step) against the same model
  with its state reset, alternated over rounds (reset, stream, reset, stream, …) in one process; prints the median
  ratio of step times and its range.

Writes `<out>/long_stream_<command><tag>.json`, `.png` and `.md`; each result records its command, commit, date,
machine and seed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.common.cli import command_line
from experiments.common.models import load_checkpoints
from experiments.common.results import markdown_table, plot_lines, publish, pyplot, replot, save_figure
from hope import HopeConfig, HopeLM, preset
from hope.cms import fast_weight_values
from hope.state import StreamState

NAME = "long_stream"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
BUCKETS = (0, 512, 2048, 8192, 16384)


# ---- eval: loss against position -----------------------------------------------------------------------------


@torch.no_grad()
def read_stream(model: HopeLM, ids: Tensor, window: int, carry: bool) -> Tensor:
    """Next-token losses `[B, N − 1]` of `ids` `[B, N]` read in windows of `window` tokens, the state carried
    (cut from the graph between windows) or reset at every window. Each window's last prediction is scored against
    the first token of the next window."""
    B, N = ids.shape
    state: StreamState | None = None
    losses = []
    for a in range(0, N - 1, window):
        b = min(a + window, N - 1)
        out = model(ids[:, a:b], state if carry else None)
        losses.append(F.cross_entropy(out.logits.float().transpose(1, 2), ids[:, a + 1 : b + 1], reduction="none"))
        state = model.detach_state(out.state) if carry else None
    return torch.cat(losses, dim=1)


def bucket_means(losses: Tensor, n: int) -> dict[str, float]:
    """Mean loss per position bucket (position of the predicting token), over rows."""
    edges = [e for e in BUCKETS if e < n] + [n]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[f"{_k(lo)}–{_k(hi)}"] = float(losses[:, lo:hi].mean())
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def window_means(losses: Tensor, window: int) -> list[float]:
    return [float(losses[:, a : a + window].mean()) for a in range(0, losses.shape[1], window)]


# ---- norms: bounded memory -------------------------------------------------------------------------------------


def memory_norms(model: HopeLM, state: StreamState) -> dict[str, float]:
    """Frobenius norm (mean over rows) of every fast memory in `state`: core memories by their saved-state key
    (block b: `b<b>.<key>`), and each fast CMS level's weights θ_0 − s·Δ (`b<b>.cms<i>[period C]`)."""
    out = {}
    for b, (block, layer) in enumerate(zip(model.blocks, state.layers)):
        if layer.core is not None:
            for key, t in layer.core.to_flat().items():
                if key.endswith(("_start", "pos", "conv")) or key in ("k", "v"):
                    continue
                out[f"b{b}.{key}"] = float(t.float().flatten(1).norm(dim=1).mean())
        for i, (mlp, lvl, st) in enumerate(zip(block.cms, block.levels, layer.cms)):
            if st is None:
                continue
            sq = sum(w.float().flatten(1).pow(2).sum(1) for w in fast_weight_values(mlp, st.delta).values())
            out[f"b{b}.cms{i}[period {lvl.period}]"] = float(sq.sqrt().mean())
    return out


@torch.no_grad()
def track_norms(model: HopeLM, ids: Tensor, window: int) -> tuple[list[int], dict[str, list[float]]]:
    """Norms after every window of `ids` `[B, N]` read with the state carried: (tokens read, {memory: norms})."""
    state, tokens, series = None, [], {}
    for a in range(0, ids.shape[1], window):
        out = model(ids[:, a : a + window], state)
        state = model.detach_state(out.state)
        tokens.append(ids.shape[0] * min(a + window, ids.shape[1]))
        for key, value in memory_norms(model, state).items():
            series.setdefault(key, []).append(value)
    return tokens, series


# ---- cost: stream vs reset step -------------------------------------------------------------------------------


def step_cost(config: HopeConfig, batch: int, window: int, rounds: int, steps: int, seed: int) -> dict[str, Any]:
    """Seconds per training step (forward, CMS writes, backward, AdamW) with the state reset at every step and with
    it carried (stream mode), alternated over `rounds`; the first round is a warm-up and not counted."""
    torch.manual_seed(seed)
    model = HopeLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    state: StreamState | None = None

    def step(carry: bool) -> float:
        nonlocal state
        ids = torch.randint(0, config.vocab_size, (batch, window + 1), generator=g)
        t0 = time.perf_counter()
        out = model(ids[:, :-1], state if carry else None)
        if carry:  # as the trainer's stream mode: the last prediction left out, the window's writes from backward
            losses = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:-1].flatten(),
                                     reduction="none")
            end = model.detach_after_backward(out.state)
            losses.mean().backward()
            state = end.finish(losses.numel())
        else:
            F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"reset": [], "stream": []}
    ratios = []
    for r in range(rounds + 1):
        medians = {}
        for side in ("reset", "stream"):
            medians[side] = statistics.median(step(side == "stream") for _ in range(steps))
            if r:
                times[side].append(medians[side])
        if r:
            ratios.append(medians["stream"] / medians["reset"])
    return {"reset_s": times["reset"], "stream_s": times["stream"], "ratios": ratios,
            "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
            "tokens_per_step": batch * window}


# ---- command line ------------------------------------------------------------------------------------------------


def held_out(cfg: dict[str, Any], split: str, n: int) -> Tensor:
    """The first `n` tokens of a split of the corpus a run trained on (its own data config and cache)."""
    from hope.data.datamodule import DataConfig, LMDataModule

    data = {k: v for k, v in cfg["data"].items() if k != "_target_"}
    dm = LMDataModule(DataConfig(**data))
    tokens = dm.stream(split).long()
    if tokens.numel() < n:
        raise ValueError(f"the {split} split has {tokens.numel()} tokens, fewer than the {n} asked for")
    return tokens[:n]


def tiny_models() -> dict[str, tuple[HopeLM, dict[str, Any]]]:
    """Untrained tiny models for the smoke run (no checkpoint needed)."""
    torch.manual_seed(0)
    return {name: (HopeLM(preset(name, "tiny", vocab_size=256, persist=True)), {}) for name in ("transformer", "hope")}


def bound_attention(model: HopeLM, kv_cache: int | None) -> int | None:
    """Give attention cores trained without a bound the KV cache `kv_cache` for the carried reading (a Transformer
    trained on reset windows would otherwise attend to the whole stream, at positions it never saw). Returns the
    bound the attention cores use (None for other cores)."""
    from hope.layers.attention import CausalSelfAttention

    bounds = set()
    for block in model.blocks:
        if isinstance(block.core, CausalSelfAttention):
            if block.core.kv_cache is None:
                block.core.kv_cache = kv_cache
            bounds.add(block.core.kv_cache)
    return next(iter(bounds)) if bounds else None


def run_eval(args: argparse.Namespace, argv: Sequence[str] | None) -> Path:
    models = tiny_models() if args.tiny else load_checkpoints(args.ckpt)
    n = 1536 if args.tiny else args.tokens
    window = 128 if args.tiny else args.window
    rows, results = [], {}
    for name, (model, cfg) in models.items():
        bounded = bound_attention(model, args.kv_cache)
        ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0)) if args.tiny \
            else held_out(cfg, "test", n)[None]
        t0 = time.perf_counter()
        carried = read_stream(model.eval(), ids, window, carry=True)
        reset = read_stream(model, ids, window, carry=False)
        seconds = time.perf_counter() - t0
        bc, br = bucket_means(carried, n - 1), bucket_means(reset, n - 1)
        results[name] = {"carried": bc, "reset": br, "window_carried": window_means(carried, window),
                         "window_reset": window_means(reset, window), "seconds": seconds,
                         "kv_cache": bounded}
        rows.append([f"{name}, carried", *bc.values()])
        rows.append([f"{name}, reset", *br.values()])
        rows.append([f"{name}, carried / reset", *(bc[k] / br[k] for k in bc)])
        print(f"{name}: {seconds:.0f} s, carried/reset by bucket "
              + ", ".join(f"{k} {bc[k] / br[k]:.3f}" for k in bc), flush=True)
    table = markdown_table(["model, state", *next(iter(results.values()))["carried"].keys()], rows)
    doc = {"command": command_line("experiments.continual.long_stream", argv), "mode": "tiny" if args.tiny else "cpu",
           "tokens": n, "window": window, "results": results, "table": table}
    return publish(f"{NAME}_eval{args.tag}", doc, args.out, lambda png: plot_eval(png, results, window))


def plot_eval(png: Path, results: dict[str, Any], window: int) -> None:
    """Left: mean loss per position bucket, carried (solid) and reset (dashed), per model. Right: carried / reset
    per bucket (below 1: the carried memory helps)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for n, (name, r) in enumerate(results.items()):
        buckets = list(r["carried"])
        colour = f"C{n}"
        left.plot(buckets, list(r["carried"].values()), "o-", color=colour, label=f"{name}, carried")
        left.plot(buckets, list(r["reset"].values()), "o--", color=colour, alpha=0.6, label=f"{name}, reset")
        right.plot(buckets, [r["carried"][k] / r["reset"][k] for k in buckets], "o-", color=colour, label=name)
    right.axhline(1.0, color="grey", lw=1)
    left.set(title=f"Loss by position (windows of {window})", xlabel="position bucket (tokens)",
             ylabel="mean loss (nats/byte)")
    right.set(title="Carried / reset (below 1: memory helps)", xlabel="position bucket (tokens)", ylabel="ratio")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, png)


def run_norms(args: argparse.Namespace, argv: Sequence[str] | None) -> Path:
    models = tiny_models() if args.tiny else load_checkpoints(args.ckpt)
    n, batch = (2048, 2) if args.tiny else (args.tokens, args.batch)
    window = 128 if args.tiny else args.window
    results = {}
    for name, (model, cfg) in models.items():
        per_row = n // batch
        if args.tiny:
            ids = torch.randint(0, 256, (batch, per_row), generator=torch.Generator().manual_seed(0))
        else:
            train = held_out(cfg, "train", per_row * batch)
            ids = train.view(batch, per_row)
        t0 = time.perf_counter()
        tokens, series = track_norms(model.eval(), ids, window)
        results[name] = {"tokens": tokens, "norms": series, "seconds": time.perf_counter() - t0,
                         "max_over_first": {k: max(v) / v[0] for k, v in series.items()}}
        print(f"{name}: {results[name]['seconds']:.0f} s; max/first norm "
              + ", ".join(f"{k} {r:.2f}" for k, r in results[name]["max_over_first"].items()), flush=True)
    rows = [[name, key, v[0], v[len(v) // 2], v[-1], max(v)] for name, r in results.items()
            for key, v in r["norms"].items()]
    table = markdown_table(["model", "memory", "after 1 window", "halfway", "end", "max"], rows)
    doc = {"command": command_line("experiments.continual.long_stream", argv), "mode": "tiny" if args.tiny else "cpu",
           "tokens": n, "batch": batch, "window": window, "results": results, "table": table}

    return publish(f"{NAME}_norms{args.tag}", doc, args.out, lambda png: plot_norms(results, png))


def plot_norms(results: dict[str, Any], png: Path) -> None:
    """One row of panels per model, one panel per block: each fast memory's norm over the stream, divided by its
    norm after the first window (1 = where it started; a bounded memory levels off)."""
    plt = pyplot()
    blocks = sorted({key.split(".")[0] for r in results.values() for key in r["norms"]})
    fig, axes = plt.subplots(len(results), max(1, len(blocks)), figsize=(3.6 * max(1, len(blocks)),
                             3.2 * len(results)), squeeze=False, sharey=True)
    for row, (name, r) in zip(axes, results.items()):
        for ax, block in zip(row, blocks):
            series = {key: v for key, v in r["norms"].items() if key.split(".")[0] == block}
            for key, v in series.items():
                ax.plot(r["tokens"], [x / v[0] for x in v], lw=1.2, label=f"{key.partition('.')[2]} ({v[0]:.3g})")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(title=f"{name}, block {block[1:]}", xlabel="tokens read")
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=6, title="memory (norm after window 1)", title_fontsize=6)
        row[0].set_ylabel("‖state‖_F / after window 1")
    save_figure(fig, png)


def run_cost(args: argparse.Namespace, argv: Sequence[str] | None) -> Path:
    size, batch, window, rounds, steps = ("tiny", 2, 128, 3, 2) if args.tiny else \
        ("small", args.batch, args.window, args.rounds, args.steps)
    config = preset("hope_stream", size)  # experiment=hope_stream_small
    if args.tiny:  # periods that a 128-token window reaches
        config.cms = [replace(lvl, period=p) for lvl, p in zip(config.cms, (16, 128, 1024))]
    torch.set_num_threads(args.threads)
    result = step_cost(config, batch, window, rounds, steps, args.seed)
    table = markdown_table(
        ["model", "tokens/step", "reset s/step (median)", "stream s/step (median)", "stream / reset (median)",
         "range"],
        [[f"hope_stream_{size} (periods {', '.join(str(lvl.period) for lvl in config.cms)})", result["tokens_per_step"],
          statistics.median(result["reset_s"]), statistics.median(result["stream_s"]), result["median_ratio"],
          f"{result['min_ratio']:.3f}–{result['max_ratio']:.3f}"]])
    doc = {"command": command_line("experiments.continual.long_stream", argv), "mode": "tiny" if args.tiny else "cpu",
           "size": size, "batch": batch, "window": window, "rounds": rounds, "steps_per_round": steps,
           "threads": args.threads, "seed": args.seed, "result": result, "table": table}
    curves = {"reset": (list(range(1, rounds + 1)), result["reset_s"]),
              "stream": (list(range(1, rounds + 1)), result["stream_s"])}
    return publish(f"{NAME}_cost{args.tag}", doc, args.out, lambda png: plot_lines(
        png, curves, "Training step, state reset vs carried (alternated rounds)", "round", "seconds per step"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=("eval", "norms", "cost"))
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH", help="a train.py checkpoint")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run on untrained tiny models")
    p.add_argument("--tokens", type=int, default=None, help="stream length (eval: 65536; norms: 1048576)")
    p.add_argument("--window", type=int, default=512, help="tokens per call (the training window)")
    p.add_argument("--kv-cache", dest="kv_cache", type=int, default=512,
                   help="eval: KV cache (tokens) given to attention cores trained without one")
    p.add_argument("--batch", type=int, default=8, help="streams side by side (norms, cost)")
    p.add_argument("--rounds", type=int, default=3, help="cost: timed rounds after one warm-up round")
    p.add_argument("--steps", type=int, default=2, help="cost: steps per side and round")
    p.add_argument("--threads", type=int, default=2, help="cost: torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    p.add_argument("--tag", default="", help="suffix of the result files (long_stream_<command><tag>.json)")
    p.add_argument("--replot", default=None, metavar="JSON", help="norms: redraw the PNG of a result JSON, run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    if args.replot is not None:
        if args.command != "norms":
            raise SystemExit(f"--replot redraws a norms result; got command {args.command!r}")
        if not Path(args.replot).is_file():
            raise SystemExit(f"--replot: no such file {args.replot!r}")
        replot(args.replot, lambda doc, png: plot_norms(doc["results"], png))
        return Path(args.replot).with_suffix(".png")
    if args.tokens is None:
        args.tokens = {"eval": 65536, "norms": 1 << 20, "cost": 0}[args.command]
    if args.command in ("eval", "norms") and not args.tiny and not args.ckpt:
        raise SystemExit(f"{args.command} needs at least one --ckpt NAME=PATH (or --tiny)")
    if args.window < 1 or args.batch < 1 or (args.command != "cost" and args.tokens <= args.window):
        raise SystemExit(f"need --window >= 1, --batch >= 1 and --tokens > --window; got window {args.window}, "
                         f"batch {args.batch}, tokens {args.tokens}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return {"eval": run_eval, "norms": run_norms, "cost": run_cost}[args.command](args, argv)


if __name__ == "__main__":
    main()

