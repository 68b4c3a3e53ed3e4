"""CPU micro-benchmarks of the inner-loop rule and the memory cores; each checks correctness before timing.

Legend: B batch, T time, H heads, K key width, V value width, C chunk, D model width.

    python -m hope.memory.bench rule --threads 1     # chunked vs token-by-token oracle, B=2 T=2048 H=4 K=V=64
    python -m hope.memory.bench core --threads 1     # core vs causal attention fwd+bwd, B=8 T=512 D=256 H=4
    python -m hope.memory.bench core --segment 16    # the core fed in 16-token pieces (HopeLM with CMS period 16)
    python -m hope.memory.bench core --compile       # also torch.compile'd attention and self-modifying cores

Timings are medians (and minima) over `--reps` interleaved runs; a shared machine makes single runs noisy.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _report(times: dict[str, list[float]], ref: str) -> None:
    base = statistics.median(times[ref])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>28s}  median {med * 1e3:8.1f} ms  min {min(ts) * 1e3:8.1f} ms  {ref}/this {base / med:5.2f}")


def bench_rule(reps: int) -> None:
    from hope.memory.chunked import chunked
    from hope.memory.rule import recurrent

    B, T, H, K, V = 2, 2048, 4, 64, 64
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    eta = 0.5 * torch.sigmoid(torch.randn(B, T, H, generator=g))
    alpha = torch.sigmoid(torch.randn(B, T, H, generator=g) + 3)
    args = (q, k, v, eta, alpha, eta)
    with torch.no_grad():
        ref, _ = recurrent(*(x.double() for x in args), 64)
        got, _ = chunked(*args, 64)
        err = float((got.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        print(f"check: chunked fp32 vs oracle fp64, relative RMS {err:.2e}")
        if err > 1e-5:
            raise SystemExit("chunked form disagrees with the oracle: not timing it")
        fns = {"recurrent (oracle) fwd": lambda: recurrent(*args, 64)}
        fns.update({f"chunked C={C} fwd": (lambda C=C: chunked(*args, C)) for C in (16, 32, 64)})
        _report(_timed(fns, reps), "recurrent (oracle) fwd")
    leaves = [x.clone().requires_grad_() for x in args]

    def fwd_bwd(C: int) -> None:
        o, _ = chunked(*leaves, C)
        o.square().mean().backward()

    _report(_timed({f"chunked C={C} fwd+bwd": (lambda C=C: fwd_bwd(C)) for C in (16, 32, 64)}, reps),
            "chunked C=16 fwd+bwd")


class _Attention(torch.nn.Module):
    """The reference: q/k/v/o projections around causal SDPA, as in the Transformer++ core."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, K]
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def bench_core(reps: int, segment: int, variants: list[str], compile: bool = False) -> None:
    from hope.config import HopeConfig
    from hope.layers.self_modifying import SelfModifyingCore
    from hope.layers.titans import TitansCore
    from hope.memory.config import MemoryConfig

    B, T, D, H = 8, 512, 256, 4
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    modules: dict[str, torch.nn.Module] = {"attention": _Attention(D, H)}
    for spec in variants:  # "name" or "name:field=value,field=value"
        name, _, knobs = spec.partition(":")
        kwargs = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in knobs.split(",") if kv)}
        config = HopeConfig(d_model=D, n_heads=H, core=name, memory=MemoryConfig(**kwargs))
        modules[spec] = (TitansCore if name == "titans" else SelfModifyingCore)(config)

    def run(m: torch.nn.Module) -> torch.Tensor:
        if isinstance(m, _Attention):
            return m(x)
        if not segment:
            return m(x)[0]
        state, ys = None, []
        for piece in x.split(segment, dim=1):
            y, state = m(piece, state)
            ys.append(y)
        return torch.cat(ys, dim=1)

    with torch.no_grad():  # pieces must equal one call before anything is timed
        for name, m in modules.items():
            if not isinstance(m, _Attention) and segment:
                err = float((run(m) - m(x)[0]).abs().max())
                if err > 1e-4:
                    raise SystemExit(f"{name}: {segment}-token pieces differ from one call by {err}: not timing it")

    if compile:  # compiled copies of the attention reference and the self-modifying cores, checked against eager
        import copy

        for name in [n for n in modules if not n.startswith("titans")]:
            compiled = copy.deepcopy(modules[name])
            compiled.compile()
            err = float((run(compiled) - run(modules[name])).detach().abs().max())  # compiles the timed graph
            if err > 1e-4:
                raise SystemExit(f"{name}: compiled output differs from eager by {err}: not timing it")
            modules[f"{name} [compiled]"] = compiled

    def step(m: torch.nn.Module) -> None:
        run(m).square().mean().backward()

    _report(_timed({name: (lambda m=m: step(m)) for name, m in modules.items()}, reps), "attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["rule", "core"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--segment", type=int, default=0, help="feed the core in pieces of this many tokens")
    parser.add_argument("--variants", nargs="*", default=["self_modifying", "titans"],
                        help='cores to time: "self_modifying", "titans", or "name:chunk_size=32,proj_chunk_size=32"')
    parser.add_argument("--compile", action="store_true",
                        help="core: also time torch.compile'd copies of attention and the self-modifying cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}")
    if args.what == "rule":
        bench_rule(args.reps)
    else:
        bench_core(args.reps, args.segment, args.variants, args.compile)


if __name__ == "__main__":
    main()
