"""Test-suite settings and the helpers shared by the test files (`from conftest import rel_rms`).

- One intra-op thread: the suite's tensors are small, and two threads spin-waiting on a 2-core machine make them
  slower, not faster.
- Without CUDA, Triton runs under its interpreter. The flag must be set before anything imports triton, so it is
  set here, first.
"""

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hope.layers.mlp import FastWeights  # noqa: E402  (after the flag: nothing may import triton before it)


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Root-mean-square error of `got` relative to the RMS of `ref`, computed in fp64 (0 when both are 0)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300))


def self_modifying_core(knobs: dict, seed: int = 0, d_model: int = 16, n_heads: int = 2):
    """A small fp64 `SelfModifyingCore` (chunks of 8, projection chunks of 4, conv width 3) with `MemoryConfig`
    fields `knobs`, every parameter moved by 0.1·N(0, 1) from the LM init so that every path changes the output
    measurably."""
    from hope.config import HopeConfig
    from hope.layers.self_modifying import SelfModifyingCore
    from hope.memory.config import MemoryConfig

    memory = MemoryConfig(chunk_size=8, proj_chunk_size=4, conv_width=3, **knobs)
    torch.manual_seed(seed)
    config = HopeConfig(d_model=d_model, n_heads=n_heads, n_layers=2, memory=memory)
    core = SelfModifyingCore(config).to(torch.float64)
    with torch.no_grad():
        for p in core.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return core


def memory_inputs(B: int, T: int, H: int, K: int, V: int, *, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Inputs of the memory rule as HOPE makes them, for the `test_memory_*` files: q, k (unit rows) `[B, T, H, K]`,
    v `[B, T, H, V]`, η = 0.5·sigmoid and α = sigmoid(· + 2) `[B, T, H]`, drawn in this order from one generator
    seeded with `seed`. Returns (that dict, `draw(*shape)`, which draws more from the same generator)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    x = {"q": draw(B, T, H, K), "k": torch.nn.functional.normalize(draw(B, T, H, K), dim=-1), "v": draw(B, T, H, V),
         "eta": 0.5 * torch.sigmoid(draw(B, T, H)), "alpha": torch.sigmoid(draw(B, T, H) + 2)}
    return x, draw


def gates(x: dict, draw, erase: str, momentum: bool) -> dict:
    """`x` with β (erase "dgd": β = η; "gd": β = 0 as a tensor; "none": None) and γ = sigmoid (momentum) or None."""
    zeros = torch.zeros_like(x["eta"])
    x["beta"] = {"dgd": x["eta"].clone(), "gd": zeros, "none": None}[erase]
    x["gamma"] = torch.sigmoid(draw(*x["eta"].shape)) if momentum else None
    return x


class TextbookFast(FastWeights):
    """Reference CMS fast weights: products with `W + (θ − θ.detach()) − (s − s.detach())·Δ` (value W, gradients
    to θ and to a learned write scale s summed from per-sample grads), and writes that differentiate W itself
    (monkeypatch `hope.cms.level.FastWeights` with it)."""

    def matmul(self, x, name, theta):
        w = self.weights[name] + (theta - theta.detach())
        if self.scale is not None:
            w = w - (self.scale - self.scale.detach()) * self.deltas[name]
        return x @ w

    def grad_targets(self):
        return list(self.weights.values())

    def grads(self, grads_w):
        return {name: torch.zeros_like(w) if g is None else g for (name, w), g in zip(self.weights.items(), grads_w)}


def run_two_ranks(script: str, *args: str, timeout: int = 300) -> None:
    """`python -m torch.distributed.run --nproc_per_node 2 <script> <args>` on a free local port (gloo on CPU);
    fails the calling test with the end of stderr when a rank fails."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           script, *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
