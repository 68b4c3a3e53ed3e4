"""Time the inner-loop memory update: PyTorch oracle, PyTorch chunked form, Triton kernels, fla's gated delta rule.

    python experiments/bench_kernel/bench.py            # CUDA: T ∈ 1K…32K, H ∈ {4, 16}, K = V ∈ {64, 128}, bf16
    python experiments/bench_kernel/bench.py --tiny     # CPU smoke run (seconds); Triton rows skipped with a reason

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk.

Two rules are timed. The HOPE rule (β = η, C = --chunk): oracle (`hope.memory.rule.recurrent`), PyTorch chunked
(`hope.ops.memory_update(backend="torch")`), Triton chunk kernel, Triton recurrent kernel (forward only). The
coinciding case (β = 0, C = 1), where our rule is fla's `chunk_gated_delta_rule` with g = log α, b = η/α and
values α·v: the same rows plus fla when it is installed. Before any row is timed, its outputs (and, for fwd+bwd,
every input gradient) on the first tokens are checked against the fp64 oracle run on that prefix; a row that
fails is reported and not timed. Ratios are within this run only. Results: a dated JSON naming the device and a
PNG plot under experiments/bench_kernel/results/ (or --out).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from hope.memory.rule import recurrent as oracle
from hope.ops import memory_update

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # fp32: 256-token prefix, vs 1e-5 in tests
NAMES = ("q", "k", "v", "eta", "alpha", "beta")
Impl = Callable[[dict, int], tuple[torch.Tensor, torch.Tensor | None]]


def make_case(B: int, T: int, H: int, K: int, erase: str, dtype: torch.dtype, device: str) -> dict:
    """HOPE-like inputs (unit q, k; η = 0.9·sigmoid; α near 1; β = η or 0), all requiring grad."""
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)
    eta = 0.9 * torch.sigmoid(rand(B, T, H))  # [B, T, H]
    x = dict(
        q=torch.nn.functional.normalize(rand(B, T, H, K), dim=-1),
        k=torch.nn.functional.normalize(rand(B, T, H, K), dim=-1),
        v=rand(B, T, H, K),
        eta=eta,
        alpha=torch.sigmoid(rand(B, T, H) + 3.0),
        beta=eta.clone() if erase == "dgd" else torch.zeros_like(eta),
    )
    return {n: t.to(dtype).requires_grad_() for n, t in x.items()}


def fla_gated_delta(x: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our rule at β = 0, C = 1 through fla: g = log α, b = η/α, values α·v, no query scaling (README)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    alpha = x["alpha"].float()
    v = x["v"] * x["alpha"][..., None]
    b = (x["eta"].float() / alpha).to(x["q"].dtype)  # [B, T, H]
    o, _ = chunk_gated_delta_rule(x["q"], x["k"], v, alpha.log(), b, scale=1.0)
    return o, None


def implementations(device: str) -> tuple[dict[str, Impl], dict[str, str]]:
    """Callables by row name, and the reason for every row that cannot run here."""
    impls: dict[str, Impl] = {
        "oracle": lambda x, c: oracle(*[x[n] for n in NAMES], c),
        "torch_chunked": lambda x, c: memory_update(*[x[n] for n in NAMES], c, backend="torch"),
    }
    skipped = {}
    if device != "cuda":
        reason = "no CUDA device (the Triton interpreter checks correctness, it is not a timer)"
        skipped.update(triton_chunk=reason, triton_recurrent=reason, fla_gated_delta=reason)
        return impls, skipped
    try:
        from hope.memory import kernels

        impls["triton_chunk"] = lambda x, c: kernels.chunk_memory_update(*[x[n] for n in NAMES], c)
        impls["triton_recurrent"] = lambda x, c: kernels.recurrent_memory_update(*[x[n] for n in NAMES], c)
    except ImportError as error:
        skipped.update(triton_chunk=f"hope.memory.kernels not importable: {error}",
                       triton_recurrent=f"hope.memory.kernels: {error}")
    try:
        import fla.ops.gated_delta_rule  # noqa: F401

        impls["fla_gated_delta"] = fla_gated_delta
    except ImportError:
        skipped["fla_gated_delta"] = "flash-linear-attention (fla) is not installed"
    return impls, skipped


def check(impl: Impl, x: dict, chunk_size: int, prefix: int, backward: bool) -> float:
    """Largest relative RMS error over o (and every input gradient) on the first `prefix` tokens vs the fp64 oracle.

    The implementation runs on the whole case (the timed shapes); the loss keeps only prefix outputs, so the
    gradients of later tokens must be exactly zero (causality), and prefix gradients must match the oracle's.
    """
    ref_in = {n: t[:, :prefix].detach().double().requires_grad_() for n, t in x.items()}
    ref_o, _ = oracle(*[ref_in[n] for n in NAMES], chunk_size)
    gen = torch.Generator(device=ref_o.device).manual_seed(1)
    do = torch.randn(ref_o.shape, generator=gen, device=ref_o.device, dtype=torch.float64)
    leaves = {n: t.detach().clone().requires_grad_(backward) for n, t in x.items()}
    with torch.set_grad_enabled(backward):
        o, _ = impl(leaves, chunk_size)
    errors = [rel_rms(o[:, :prefix], ref_o)]
    if backward:
        (ref_o * do).sum().backward()
        (o[:, :prefix].double() * do).sum().backward()
        for n in NAMES:
            grad = leaves[n].grad
            if grad is None or (grad[:, prefix:] != 0).any():
                return math.inf
            errors.append(rel_rms(grad[:, :prefix], ref_in[n].grad))
    return max(errors)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def time_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of fn in milliseconds (CUDA: triton.testing.do_bench, which synchronises)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(50, 20 * repeats), return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_row(name: str, impl: Impl, x: dict, chunk_size: int, mode: str, cli: argparse.Namespace) -> dict:
    """Check, then time one implementation on one case; returns the row (ms is None when not timed)."""
    row = dict(impl=name, mode=mode, ms=None)
    T = x["q"].shape[1]
    if name == "oracle" and T > cli.oracle_max_t:
        return row | dict(skipped=f"oracle is a Python loop over T; not timed beyond T={cli.oracle_max_t}")
    if name == "triton_recurrent" and mode == "fwdbwd":
        return row | dict(skipped="forward-only kernel (decoding)")
    backward = mode == "fwdbwd"
    error = check(impl, x, chunk_size, min(T, cli.check_tokens), backward)
    row["check_rel_rms"] = error
    if not error < TOL[x["q"].dtype]:
        print(f"  REFUSED {name} {mode}: correctness check failed (relative RMS {error:.2e})")
        return row | dict(skipped=f"correctness check failed: {error:.2e}")
    do = torch.randn_like(x["v"])

    def step():
        with torch.set_grad_enabled(backward):
            o, _ = impl(x, chunk_size)
        if backward:
            torch.autograd.backward(o, do)

    if x["q"].is_cuda:
        torch.cuda.reset_peak_memory_stats()
    row["ms"] = time_ms(step, cli.device, cli.repeats)
    if x["q"].is_cuda:
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def bench_case(case: dict, impls: dict[str, Impl], cli: argparse.Namespace) -> list[dict]:
    """All rows of one (T, H, K, rule) case, both modes, printed with ratios to the PyTorch chunked form."""
    x = make_case(cli.batch, case["T"], case["H"], case["K"], case["erase"], cli.dtype, cli.device)
    rows = []
    for mode in cli.modes:
        timed = {}
        for name, impl in impls.items():
            if name == "fla_gated_delta" and case["erase"] != "gd":
                continue  # fla computes the rule only in the coinciding case β = 0, C = 1
            row = case | run_row(name, impl, x, case["C"], mode, cli)
            rows.append(row)
            if row["ms"] is not None:
                timed[name] = row["ms"]
        base = timed.get("torch_chunked")
        cells = [f"{n} {ms:8.2f} ms" + (f" ({base / ms:5.2f}x)" if base else "") for n, ms in timed.items()]
        print(f"T={case['T']:6d} H={case['H']:3d} K=V={case['K']:4d} C={case['C']:3d} {case['erase']:3s} {mode:6s} | "
              + " | ".join(cells))  # fmt: skip
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU ({os.cpu_count()} threads, torch {torch.get_num_threads()} threads)"


def plot(rows: list[dict], path: str) -> None:
    """ms against T (log-log), one panel per (rule, mode), a line per implementation and (H, K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["erase"], r["C"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (erase, chunk, mode) in zip(axes[0], panels):
        lines = sorted({(r["impl"], r["H"], r["K"]) for r in rows})
        for impl, heads, width in lines:
            pts = [(r["T"], r["ms"]) for r in rows if (r["impl"], r["H"], r["K"], r["erase"], r["C"], r["mode"])
                   == (impl, heads, width, erase, chunk, mode) and r["ms"] is not None]  # fmt: skip
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=f"{impl} H={heads} K={width}")
        title = f"{mode}, β={'η' if erase == 'dgd' else 0}, C={chunk}"
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized smoke run for tests")
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="K = V")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=64, help="C of the HOPE rule (β = η)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    parser.add_argument("--oracle-max-t", type=int, default=2048)
    parser.add_argument("--check-tokens", type=int, default=256, help="prefix checked against the oracle")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    cli = parser.parse_args(argv)
    cli.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cli.tiny:
        cli.T, cli.heads, cli.widths, cli.chunk, cli.repeats, cli.check_tokens = [16, 32], [2], [16], 8, 1, 16
    cli.dtype = getattr(torch, cli.dtype or ("bfloat16" if cli.device == "cuda" else "float32"))
    return cli


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; returns the path of the JSON result file."""
    cli = parse_args(argv)
    impls, skipped = implementations(cli.device)
    device = device_name(cli.device)
    print(f"device: {device}; dtype {cli.dtype}; B={cli.batch}")
    for name, reason in skipped.items():
        print(f"  skipping {name}: {reason}")
    rows = []
    for heads in cli.heads:
        for width in cli.widths:
            for T in cli.T:
                for erase, chunk in (("dgd", cli.chunk), ("gd", 1)):
                    rows += bench_case(dict(T=T, H=heads, K=width, C=chunk, erase=erase), impls, cli)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    slug = "".join(c if c.isalnum() else "-" for c in device.split(" (")[0]).strip("-").lower()
    base = os.path.join(cli.out, f"{stamp:%Y-%m-%d}_{slug}{'_tiny' if cli.tiny else ''}")
    os.makedirs(cli.out, exist_ok=True)
    meta = dict(date=stamp.isoformat(timespec="seconds"), device=device, torch=torch.__version__, dtype=str(cli.dtype),
                batch=cli.batch, command="python experiments/bench_kernel/bench.py" + (" --tiny" if cli.tiny else ""),
                skipped=skipped)  # fmt: skip
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    plot(rows, base + ".png")
    print(f"wrote {base}.json and {base}.png")
    return base + ".json"


if __name__ == "__main__":
    main()
