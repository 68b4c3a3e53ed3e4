"""Training throughput: tokens/s of one forward + backward + AdamW step, each model against Transformer++.

    python -m experiments.lm_compare.throughput --tiny     # seconds (what the tests run)
    python -m experiments.lm_compare.throughput            # small preset, context 512, batch 8, 2 threads

Dimensions: B batch, T time (context), V vocabulary.

Models have random weights and see random byte ids: the cost of a step does not depend on what was learned.
Every model is built first, then the models take their steps in turn (round-robin: one step of each, then the
next round), so a change in the load of a shared machine hits all of them alike; the ratio to Transformer++ is
taken within this one run. A model's first step (untimed) must give a finite loss and finite gradients, or it is
not timed. Reported: the median over the timed rounds (after that checked step and `--warmup` more untimed
rounds), the ratio of the medians to Transformer++'s and the range of the per-round ratios (each model's step
against Transformer++'s step of the same round: a run whose range is wide was disturbed), fp32,
`torch.set_num_threads(2)` by default, and the load averages before and after (`os.getloadavg()`). Writes
`<out>/throughput.json`.

`--compile` compiles every model before its checked step, as the trainer's `compile: true` does
(`hope.models.lm.compile_model`): Transformer++ whole, the HOPE variants' self-modifying cores (the segment loop
and the CMS writes stay eager); Titans and Hope-Attention stay eager (see there why).

`--cms-breakdown` also steps six HOPE variants with the same parameters, `hope[frozen CMS]` (every level of period
None: no in-context writes, no segments), `hope[one level, period C]` (only the slowest fast level writes),
`hope[residual signal]` (`HopeConfig.cms_signal="residual"`: writes without a backward through the layers above),
`hope_fast` (that signal with projection-memory chunks of 32, the lm_compare variant), `hope[learned η]`
(`HopeConfig.cms_learn_lr`, one more parameter per level) and `hope[second-order CMS]`
(`HopeConfig.cms_second_order`: the outer backward runs through every write's backward), then the paper's
literal HOPE (`hope_paper`, preset "hope_paper": other memories, about the same parameters), and times the in-context
CMS writes inside each HOPE step (the inner backward and the update, as the public profiler region
`hope.cms.profile.write_timer` counts them), so the cost of the CMS can be read off one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments.common.cli import command_line, out_dir, speed_mode, speed_parser, torch_threads
from experiments.common.models import LABELS, MODEL_NAMES, BuiltModel, build_models, count_params
from experiments.common.results import markdown_table, write_result
from hope.cms.profile import WriteTimer, write_timer

NAME = "throughput"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MODES: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "seq_len": 32, "batch": 2, "warmup": 0, "steps": 2, "threads": 1},
    "full": {"size": "small", "seq_len": 512, "batch": 8, "warmup": 1, "steps": 5, "threads": 2},
}


def breakdown_models(size: str | int, seed: int) -> list[BuiltModel]:
    """HOPE with its CMS levels frozen (`hope[frozen CMS]`), with only its slowest fast level writing
    (`hope[one level, period C]`), with the residual write signal (`hope[residual signal]`, `HopeConfig.cms_signal`),
    with that signal and projection-memory chunks of 32 (`hope_fast`, the lm_compare variant), with learned inner
    rates (`hope[learned η]`) and with second-order writes (`hope[second-order CMS]`), widths as in the preset;
    then `hope_paper` (preset "hope_paper")."""
    import dataclasses

    from hope import HopeLM, preset
    from hope.config import CMSLevel

    base = preset("hope", size)
    levels = base.cms
    slowest = max(lvl.period for lvl in levels if lvl.period is not None)
    frozen = [CMSLevel(period=None, hidden=lvl.hidden) for lvl in levels]
    one = [CMSLevel(period=slowest if lvl.period == slowest else None, hidden=lvl.hidden) for lvl in levels]
    plans = {"hope[frozen CMS]": {"cms": frozen},
             f"hope[one level, period {slowest}]": {"cms": one},
             "hope[residual signal]": {"cms_signal": "residual"},
             "hope_fast": {"cms_signal": "residual",
                           "memory": dataclasses.replace(base.memory, proj_chunk_size=32)},
             "hope[learned η]": {"cms_learn_lr": True},
             "hope[second-order CMS]": {"cms_second_order": True}}
    configs = {label: preset("hope", size, **overrides) for label, overrides in plans.items()}
    configs["hope_paper"] = preset("hope_paper", size)
    out = []
    for label, config in configs.items():
        torch.manual_seed(seed)
        model = HopeLM(config)
        out.append(BuiltModel(label, model, count_params(model)))
    return out


class WriteClock:
    """Seconds spent in the in-context CMS writes (the inner backward and the update), per model name: the writes
    made inside `with clock.charge(name)` are charged to `seconds[name]`. Built on the public profiler region
    `hope.cms.profile.write_timer`; nothing is patched."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def charge(self, name: str) -> Iterator[WriteTimer]:
        """Charge the CMS writes of the block to `name`; yields the block's own timer (its writes alone)."""
        with write_timer() as timer:
            try:
                yield timer
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + timer.seconds


class Trainee:
    """A model with its AdamW optimizer and a fixed batch of random ids `[B, T + 1]`."""

    def __init__(self, name: str, model: torch.nn.Module, params: int, batch: int, seq_len: int, seed: int) -> None:
        self.name, self.model, self.params = name, model, params
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=g)  # [B, T+1]
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        self.times: list[float] = []
        self.write_times: list[float] = []  # seconds in CMS writes per timed step (with --cms-breakdown)

    def step(self, check: bool = False) -> float:
        """One training step (forward, next-token cross-entropy, backward, AdamW); returns the loss. With `check`,
        a non-finite loss or gradient raises before the optimizer step: never time a broken model."""
        x, y = self.ids[:, :-1], self.ids[:, 1:]  # [B, T]
        logits = self.model(x).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if check:
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            if not torch.isfinite(loss) or bad:
                value = float(loss.detach())
                raise RuntimeError(f"model {self.name!r}: loss {value}, non-finite gradients in {bad[:5]}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def measure(trainees: list[Trainee], warmup: int, steps: int, clock: WriteClock | None = None) -> None:
    """Round-robin: each round gives every model one step; rounds after the first `warmup` are timed. With a
    `clock`, the CMS-write time of every timed step is appended to the trainee's `write_times`."""
    for r in range(warmup + steps):
        for tr in trainees:
            with clock.charge(tr.name) if clock is not None else nullcontext() as writes:
                t0 = time.perf_counter()
                tr.step()
                step_s = time.perf_counter() - t0
            if r >= warmup:
                tr.times.append(step_s)
                if writes is not None:
                    tr.write_times.append(writes.seconds)
            print(f"  round {r}: {tr.name} {step_s:.2f} s", flush=True)


def summarize(trainees: list[Trainee], tokens_per_step: int) -> dict[str, dict[str, Any]]:
    """Per model: parameters, step times, median step, tokens/s and the ratio to Transformer++ (if measured):
    the ratio of the medians, and the paired ratio of each round (Transformer++'s step over the model's step in
    the same round, so that a load change within the run shows as spread instead of moving one side only)."""
    out = {}
    for tr in trainees:
        med = statistics.median(tr.times)
        out[tr.name] = {"params": tr.params, "step_s": tr.times, "median_step_s": med,
                        "tokens_per_s": tokens_per_step / med}
        if tr.write_times:
            out[tr.name]["cms_write_s"] = tr.write_times
            out[tr.name]["median_cms_write_s"] = statistics.median(tr.write_times)
    ref = out.get("transformer")
    for r in out.values():
        r["ratio_vs_transformer"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        if ref:
            r["ratio_per_round"] = [t_ref / t for t_ref, t in zip(ref["step_s"], r["step_s"])]
            r["ratio_range"] = [min(r["ratio_per_round"]), max(r["ratio_per_round"])]
    return out


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    mode = speed_mode(MODES, args, ("size", "seq_len", "batch", "warmup", "steps", "threads"))
    if mode["steps"] < 1 or mode["warmup"] < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {mode['steps']} and {mode['warmup']}")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    with torch_threads(mode["threads"]):
        built, skipped = build_models(names, mode["size"], args.seed)
        if args.cms_breakdown:
            built += breakdown_models(mode["size"], args.seed)
        if args.compile:
            from hope.models.lm import compile_model

            for b in built:
                compile_model(b.model)
        trainees = [Trainee(b.name, b.model.train(), b.params, mode["batch"], mode["seq_len"], args.seed)
                    for b in built]
        for tr in trainees:
            tr.step(check=True)  # untimed: also pays the one-off costs (allocations, AdamW state)
        load_start = list(os.getloadavg())
        measure(trainees, mode["warmup"], mode["steps"], WriteClock() if args.cms_breakdown else None)
        load_end = list(os.getloadavg())
    results = summarize(trainees, mode["batch"] * mode["seq_len"])
    headers = ["model", "params (M)", "median step (s)", "tokens/s", "vs Transformer++", "per round (min–max)"]
    spread = lambda r: f"{r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f}" if "ratio_range" in r else None
    rows = [[LABELS.get(n, n), r["params"] / 1e6, round(r["median_step_s"], 3), round(r["tokens_per_s"]),
             r["ratio_vs_transformer"], spread(r)] for n, r in results.items()]
    if args.cms_breakdown:
        headers.append("CMS writes (s)")
        for row, r in zip(rows, results.values()):
            row.append(round(r["median_cms_write_s"], 3) if "median_cms_write_s" in r else None)
    table = markdown_table(headers, rows)
    doc = {
        "command": command_line("experiments.lm_compare.throughput", argv),
        "mode": "tiny" if args.tiny else "full", "config": mode, "dtype": "float32", "compiled": args.compile,
        "note": "random weights and random ids (speed only); models stepped round-robin; median of the timed steps; "
        "ratio_per_round pairs each step with Transformer++'s step of the same round; shared machine: see "
        "loadavg_start/end",
        "loadavg_start": load_start, "loadavg_end": load_end,
        "results": results, "skipped": skipped, "table": table,
    }
    path = write_result(NAME, doc, out_dir(args, DEFAULT_OUT))
    print(table)
    print(f"wrote {path}")
    return doc


def parser() -> argparse.ArgumentParser:
    p = speed_parser(__doc__.splitlines()[0], models=",".join(MODEL_NAMES))
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="context T (default 512)")
    p.add_argument("--batch", type=int, default=None, help="batch B (default 8)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds after the checked one (default 1; 0 with --tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed rounds; the median is reported (default 5; 2 with --tiny)")
    p.add_argument("--cms-breakdown", dest="cms_breakdown", action="store_true",
                   help="also step HOPE with frozen CMS levels, with one fast level, with the residual write signal "
                   "and as hope_fast, and time the CMS writes")
    p.add_argument("--compile", action="store_true",
                   help="compile every model first as the trainer's compile: true does (hope.models.lm.compile_model); "
                   "the checked step and the warm-up rounds pay the compilation")
    return p


if __name__ == "__main__":
    run()
