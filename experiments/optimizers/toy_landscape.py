"""Figure 4's toy (arXiv:2512.24695 eq. 53): momentum vs delta momentum (and the others) on a bending valley.

    python experiments/optimizers/toy_landscape.py          # ~1 min on 2 CPU cores

    ψ(r, θ) = r² + k (r − θ + α sin(ωr))²        start (r, θ) = (−3.5, 2), minimum ψ = 0 at (0, 0)

Choice of k, α, ω (the paper gives none): the valley floor is θ = r + α sin(ωr) and its walls are k times steeper
than its floor. k = 10, α = 1, ω = 2 make the floor bend about twice between the start and the optimum, so the
curvature seen along the path changes with r, the "time-varying curvature" the paper uses to motivate delta
momentum. `--landscapes` reruns the momentum / delta-momentum comparison on other (k, α, ω) so that the main
choice is not the only evidence.

Protocol: every optimizer is a `hope.optim.memory_rule` with its library defaults (delta momentum: β = 0.9, ζ = 1;
momentum: β = 0.9), run for `--steps` steps at each learning rate of a log grid (8 per decade, 1e-3…1). All rates
run at once as one batch of independent 2-vectors `[L, 1, 2]` (the rules' batched form). A run has converged once ψ
stays below `--tol` to the end; the table reports each optimizer's best rate (fewest steps, else lowest final ψ).
Muon and M3 are matrix rules and have nothing to orthogonalise on a 2-vector, so they are left out.

Writes `results/toy_landscape.json` (config, machine, date, every number) and `results/toy_landscape.png`
(trajectories on the contour of ψ, and ψ against steps) beside this file, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from hope.optim.registry import memory_rule

START = (-3.5, 2.0)
RESULTS = Path(__file__).resolve().parent / "results"
OPTIMIZERS = {  # name -> (rule, hyper-parameters): library defaults, stated so the JSON records them
    "sgd": ("sgd", {}),
    "momentum": ("momentum", {"beta": 0.9}),
    "delta_momentum": ("delta_momentum", {"beta": 0.9, "erase": 1.0}),
    "preconditioned_momentum": ("preconditioned_momentum", {"beta": 0.9, "beta2": 0.99}),
    "adam": ("adam", {"betas": (0.9, 0.999)}),
    "deep_momentum": ("deep_momentum", {"beta": 0.9, "inner_lr": 0.5, "hidden": 16}),
}
ERASE_SWEEP = (0.01, 0.1, 1.0, 10.0)


def psi(x: torch.Tensor, k: float, alpha: float, omega: float) -> torch.Tensor:
    """ψ of eq. 53 at points x `[..., 2]` = (r, θ); returns `[...]`."""
    r, theta = x[..., 0], x[..., 1]
    return r**2 + k * (r - theta + alpha * torch.sin(omega * r)) ** 2


def grad_psi(x: torch.Tensor, k: float, alpha: float, omega: float) -> torch.Tensor:
    """∇ψ in closed form: (2r + 2k e (1 + αω cos ωr), −2k e) with e = r − θ + α sin ωr; `[..., 2]`."""
    r, theta = x[..., 0], x[..., 1]
    e = r - theta + alpha * torch.sin(omega * r)
    return torch.stack((2 * r + 2 * k * e * (1 + alpha * omega * torch.cos(omega * r)), -2 * k * e), dim=-1)


def run_grid(rule_name: str, hparams: dict, lrs: torch.Tensor, landscape: tuple, steps: int) -> dict:
    """Run one rule at every learning rate at once; returns ψ `[steps + 1, L]` and the path `[steps + 1, L, 2]`."""
    rule = memory_rule(rule_name, **hparams)
    x = torch.tensor(START, dtype=torch.float64).expand(len(lrs), 1, 2).clone()  # [L, 1, 2]
    state = rule.init_state(x)
    path, alive = [x[:, 0].clone()], torch.ones(len(lrs), dtype=torch.bool)
    for _ in range(steps):
        state, d = rule.update(state, grad_psi(x, *landscape))
        new = x - lrs[:, None, None] * d
        alive &= torch.isfinite(new).all(-1).all(-1) & (new.abs() < 1e3).all(-1).all(-1)  # freeze diverged runs
        x = torch.where(alive[:, None, None], new, x)
        path.append(x[:, 0].clone())
    path = torch.stack(path)  # [steps + 1, L, 2]
    loss = torch.where(alive, psi(path, *landscape), torch.full_like(path[..., 0], float("inf")))
    return {"loss": loss, "path": path}


def summarise(loss: torch.Tensor, lrs: torch.Tensor, tol: float) -> dict:
    """Steps until ψ stays below tol per rate (None = not settled at the end) and the best rate.

    "Stays" matters: a run that dips below tol and bounces back out (an unstable rate) does not count.
    The best rate has the fewest steps, else the lowest final ψ.
    """
    above = loss >= tol  # [steps + 1, L]
    hit = ~above[-1]
    n = loss.shape[0]
    last_above = n - 1 - above.flip(0).float().argmax(0)  # index of the last step with ψ >= tol
    first = torch.where(hit, torch.where(above.any(0), last_above + 1, 0), -1)
    if hit.any():
        best = int(torch.where(hit, first, torch.full_like(first, 10**9)).argmin())
    else:
        best = int(loss[-1].nan_to_num(float("inf")).argmin())
    return {
        "steps_to_tol": [int(s) if s >= 0 else None for s in first.tolist()],
        "best_index": best,
        "best_lr": float(lrs[best]),
        "best_steps": int(first[best]) if hit[best] else None,
        "best_final_loss": float(loss[-1, best]),
        "converged_rates": int(hit.sum()),
    }


def head_to_head(a: dict, b: dict) -> dict:
    """At equal learning rates: where both converge, how often b needs fewer steps than a."""
    pairs = [(x, y) for x, y in zip(a["steps_to_tol"], b["steps_to_tol"]) if x is not None and y is not None]
    return {
        "both_converge": len(pairs),
        "second_faster": sum(y < x for x, y in pairs),
        "ties": sum(y == x for x, y in pairs),
    }


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [
            ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln
        ]
        cpu = names[0] if names else cpu
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": commit,
    }


def plot(results: dict, landscape: tuple, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.5))
    paths = torch.cat([res["best_path"] for res in results.values()])  # [*, 2]
    lo, hi = paths.min(0).values - 0.5, paths.max(0).values + 0.5
    r, t = torch.meshgrid(torch.linspace(lo[0], hi[0], 400), torch.linspace(lo[1], hi[1], 400), indexing="ij")
    z = psi(torch.stack((r, t), -1).double(), *landscape)
    ax0.contourf(r, t, torch.log10(z + 1e-3), levels=30, cmap="Greys")
    for name, res in results.items():
        bold = name in ("momentum", "delta_momentum")
        p, width = res["best_path"], 2.0 if bold else 0.8
        ax0.plot(p[:, 0], p[:, 1], lw=width, alpha=1.0 if bold else 0.5, label=name)
        ax1.semilogy(res["best_loss"].clamp_min(1e-16), lw=width, label=f"{name} (lr={res['best_lr']:.3g})")
    ax0.plot(*START, "ko")
    ax0.plot(0, 0, "k*", ms=12)
    k, alpha, omega = landscape
    ax0.set(xlabel="r", ylabel="θ", title=f"ψ = r² + {k:g}(r − θ + {alpha:g} sin({omega:g}r))², best lr each")
    ax1.set(xlabel="step", ylabel="ψ", title="loss against steps (best lr each)")
    ax0.legend(fontsize=8)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=float, default=10.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--omega", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--landscapes", default="5,1,3;10,0.5,3;20,1,1;2,1,5;50,1,2", help="k,alpha,omega;… (extra)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    lrs = torch.logspace(-3, 0, 25, dtype=torch.float64)
    landscape = (args.k, args.alpha, args.omega)

    results, table = {}, {}
    for name, (rule, hp) in OPTIMIZERS.items():
        run = run_grid(rule, hp, lrs, landscape, args.steps)
        s = summarise(run["loss"], lrs, args.tol)
        results[name] = {
            **s,
            "best_path": run["path"][:, s["best_index"]],
            "best_loss": run["loss"][:, s["best_index"]],
        }
        table[name] = {"rule": rule, "hparams": hp, **s}

    erase = {}
    for zeta in ERASE_SWEEP:
        run = run_grid("delta_momentum", {"beta": 0.9, "erase": zeta}, lrs, landscape, args.steps)
        erase[str(zeta)] = summarise(run["loss"], lrs, args.tol)

    others = []
    for spec in filter(None, args.landscapes.split(";")):
        other = tuple(float(v) for v in spec.split(","))
        row = {"landscape": dict(zip(("k", "alpha", "omega"), other))}
        for name in ("momentum", "delta_momentum"):
            rule, hp = OPTIMIZERS[name]
            row[name] = summarise(run_grid(rule, hp, lrs, other, args.steps)["loss"], lrs, args.tol)
        row["equal_lr"] = head_to_head(row["momentum"], row["delta_momentum"])
        others.append(row)

    out = {
        "command": "python experiments/optimizers/toy_landscape.py",
        "machine": machine(),
        "config": {
            "k": args.k,
            "alpha": args.alpha,
            "omega": args.omega,
            "start": START,
            "steps": args.steps,
            "tol": args.tol,
            "lrs": lrs.tolist(),
        },  # fmt: skip
        "optimizers": table,
        "equal_lr_momentum_vs_delta": head_to_head(table["momentum"], table["delta_momentum"]),
        "delta_momentum_erase_sweep": erase,
        "other_landscapes": others,
        "best_paths": {
            n: [[round(v, 6) for v in xy] for xy in r["best_path"][:: max(1, args.steps // 300)].tolist()]
            for n, r in results.items()
        },  # fmt: skip
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "toy_landscape.json").write_text(json.dumps(out, indent=1))
    plot(results, landscape, RESULTS / "toy_landscape.png")
    print_table(out)


def print_table(out: dict) -> None:
    fmt = lambda s: "—" if s is None else str(s)
    c = out["config"]
    print(f"ψ = r² + {c['k']:g}(r − θ + {c['alpha']:g} sin({c['omega']:g} r))², start {tuple(c['start'])}")
    print(f"steps until ψ stays below {c['tol']:g}; best of 25 learning rates in [1e-3, 1] per optimizer")
    print(f"{'optimizer':<24} {'best lr':>9} {'steps to tol':>13} {'rates converged':>16}")
    for name, s in out["optimizers"].items():
        print(f"{name:<24} {s['best_lr']:>9.4g} {fmt(s['best_steps']):>13} {s['converged_rates']:>13}/25")
    h = out["equal_lr_momentum_vs_delta"]
    print(f"equal lr: both converge at {h['both_converge']} rates, delta momentum faster at {h['second_faster']}")
    print(
        "delta momentum erase sweep ζ: "
        + ", ".join(f"{z}: {fmt(s['best_steps'])}" for z, s in out["delta_momentum_erase_sweep"].items())
    )
    print(f"{'(k, α, ω)':<16} {'momentum':>9} {'delta':>7}   equal-lr: delta faster / both converge")
    for row in out["other_landscapes"]:
        ls = tuple(row["landscape"].values())
        m, d, e = row["momentum"]["best_steps"], row["delta_momentum"]["best_steps"], row["equal_lr"]
        print(f"{str(ls):<16} {fmt(m):>9} {fmt(d):>7}   {e['second_faster']} / {e['both_converge']}")


if __name__ == "__main__":
    main()
