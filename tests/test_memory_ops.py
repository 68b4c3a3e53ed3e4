"""`hope.ops`: input checks with clear errors, backend choice and dispatch, and streams fed in pieces.

Legend: B batch, T time, H heads, K key width, V value width, C chunk.
"""

from __future__ import annotations

import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from conftest import memory_inputs, rel_rms

import hope.memory.ops as memory_ops
import hope.ops as ops
from hope.memory import DeepState, LinearState
from hope.memory.deep import deep_recurrent
from hope.memory.rule import recurrent

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def case(B=2, T=10, H=2, K=4, V=3, dtype=DT, seed=0):
    x, _ = memory_inputs(B, T, H, K, V, seed=seed, dtype=dtype)
    return [x["q"], x["k"], x["v"], x["eta"], x["alpha"], x["eta"].clone()]


@pytest.mark.parametrize("backend", ["auto", "torch", "recurrent", "triton"])
def test_backends_agree_on_cpu(backend):
    args = case()
    ref, ref_s = recurrent(*args, 4, None, True)
    if backend == "triton":  # no CUDA here: an explicit Triton request must say why it cannot run
        with pytest.raises(ValueError, match="triton"):
            ops.memory_update(*args, 4, None, True, backend)
        return
    o, s = ops.memory_update(*args, 4, None, True, backend)
    assert rel_rms(o, ref) < 1e-12 and rel_rms(s, ref_s) < 1e-12


def bad(index, value):
    args = case()
    args[index] = value
    return args


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (bad(0, torch.randn(2, 10, 4)), {}, r"q must be \[B, T, H, K\], got shape \[2, 10, 4\]"),
        (bad(1, torch.randn(2, 10, 2, 5, dtype=DT)), {}, r"k must have shape \[2, 10, 2, 4\], got \[2, 10, 2, 5\]"),
        (bad(2, torch.randn(2, 9, 2, 3, dtype=DT)), {}, r"v must have shape \[2, 10, 2, 3\]"),
        (bad(2, torch.randn(2, 10, 2, 3)), {}, "v has dtype torch.float32 but q has torch.float64"),
        (bad(3, torch.rand(2, 10, 3, dtype=DT)), {}, r"eta must have shape \[2, 10, 2\], got \[2, 10, 3\]"),
        (bad(3, torch.ones(2, 10, 2, dtype=torch.long)), {}, "eta must be a floating-point tensor"),
        (bad(4, None), {}, "alpha must be a torch.Tensor, got NoneType"),
        (bad(1, torch.randn(2, 10, 2, 4, dtype=DT, device="meta")), {}, "k is on meta but q is on cpu"),
        (case(), {"chunk_size": 0}, "chunk_size must be an int >= 1, got 0"),
        (case(), {"chunk_size": True}, "chunk_size must be an int >= 1, got True"),
        (case(), {"backend": "cuda"}, "backend must be one of"),
        (case(), {"objective": "l1"}, "objective must be one of"),
        (case(), {"initial_state": torch.zeros(2, 2, 4, 4, dtype=DT)}, r"initial_state must have shape \[2, 2, 4, 3\]"),
        (case(), {"initial_state": (torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4, 3))}, "gamma is None"),
        (case(), {"gamma": torch.full((2, 10, 2), -0.5, dtype=DT)}, "gamma .* must be >= 0, got min -0.5"),
        (bad(4, torch.zeros(2, 10, 2, dtype=DT)), {}, r"alpha \(retention\) must be > 0, got min 0.0"),
        (bad(3, torch.full((2, 10, 2), float("nan"), dtype=DT)), {}, r"eta has 40 non-finite value\(s\)"),
        (bad(0, torch.full((2, 10, 2, 4), float("inf"), dtype=DT)), {}, r"q has 160 non-finite value\(s\)"),
        (bad(2, torch.randn(2, 10, 2, 3, dtype=DT)), {"objective": "self"}, r"v must have shape \[2, 10, 2, 4\]"),
        (bad(2, torch.randn(2, 10, 2, 4, dtype=DT)), {"objective": "self"}, "objective 'self' needs initial_state"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, kwargs, match):
    kwargs = {"chunk_size": 4, **kwargs}
    error = TypeError if "torch.Tensor, got" in match else ValueError
    with pytest.raises(error, match=match):
        ops.memory_update(*args, **kwargs)


def test_public_entry():
    """`hope.ops` lists exactly the public entry and the building blocks; `hope.memory` exports the same."""
    assert sorted(ops.__all__) == sorted([
        "memory_update", "memory_stream", "deep_memory", "triton_available", "resolve_backend", "BACKENDS",
        "ChunkOperators", "chunk_operators", "chunk_step", "linear_chunk", "chunk_write", "write_terms", "mlp",
        "deep_write",
    ])
    import hope.memory

    assert all(getattr(hope.memory, name) is getattr(ops, name) for name in ops.__all__)


def test_triton_available_from_any_directory(tmp_path):
    """Triton is installed in this environment: the kernels import as `hope.memory.kernels` whatever the working
    directory (a top-level `kernels` would resolve to an unrelated PyPI package outside the repository)."""
    assert ops.triton_available() is True
    code = "import hope.ops, sys; sys.exit(0 if hope.ops.triton_available() else 1)"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}  # no TRITON_INTERPRET: a plain CPU machine
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_resolve_backend_on_cpu():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="backend='triton' is unavailable: the kernel needs CUDA inputs"):
        ops.resolve_backend("triton", q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert ops.resolve_backend("auto", q) == "torch"
        assert ops.resolve_backend("auto", q, torch.zeros(1, 2, 1), "dot") == "torch"
    assert ops.resolve_backend("recurrent", q) == "recurrent" and ops.resolve_backend("torch", q) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cuda", q)


def test_resolve_backend_warns_once_per_reason_on_cuda(monkeypatch):
    """On CUDA "auto" never falls back silently: one warning per distinct reason, not one per call."""
    monkeypatch.setattr(memory_ops, "_WARNED", set())
    fake_cuda = types.SimpleNamespace(is_cuda=True, device="cuda:0", dtype=torch.float32)  # what resolve reads
    gamma = torch.zeros(1)
    with pytest.warns(UserWarning, match="momentum") as record:
        for _ in range(2):
            assert ops.resolve_backend("auto", fake_cuda, gamma) == "torch"
    assert len(record) == 1
    monkeypatch.setattr(memory_ops, "triton_available", lambda: False)
    with pytest.warns(UserWarning, match="Triton is not installed") as record:
        for _ in range(2):
            assert ops.resolve_backend("auto", fake_cuda) == "torch"
        assert ops.resolve_backend("auto", fake_cuda, gamma) == "torch"  # momentum: warned already
    assert len(record) == 1
    with pytest.raises(ValueError, match="Triton is not installed"):
        ops.resolve_backend("triton", fake_cuda)
    monkeypatch.setattr(memory_ops, "triton_available", lambda: True)
    assert ops.resolve_backend("auto", fake_cuda) == "triton"
    with pytest.warns(UserWarning, match="float64"):
        assert ops.resolve_backend("auto", types.SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "torch"


def test_triton_is_not_imported_for_cpu_inputs(monkeypatch):
    """"auto" on CPU never asks for the kernels, so `import hope` and CPU runs work without Triton."""
    calls = []
    monkeypatch.setattr(memory_ops, "triton_available", lambda: calls.append(1))
    monkeypatch.setattr(memory_ops, "_triton_kernel", lambda: calls.append(1))
    ops.memory_update(*case(), 4, backend="auto")
    ops.memory_update(*case(), 4, backend="torch")
    assert not calls


def test_auto_dispatches_to_the_kernel_when_supported(monkeypatch):
    """Where `resolve_backend` picks Triton, memory_update calls the kernel with its first nine arguments;
    momentum, other objectives or fp64 run the PyTorch form."""
    seen = []

    def fake_kernel(*args):
        seen.append(len(args))
        return "kernel", None

    monkeypatch.setattr(memory_ops, "_triton_kernel", lambda: fake_kernel)
    pick = lambda backend, q, gamma, objective: "triton" if gamma is None and objective == "l2" else "torch"
    monkeypatch.setattr(memory_ops, "resolve_backend", pick)
    assert ops.memory_update(*case(), 4)[0] == "kernel" and seen == [9]
    o, _ = ops.memory_update(*case(), 4, gamma=torch.rand(2, 10, 2, dtype=DT))
    assert isinstance(o, torch.Tensor)


def stream_case(objective, momentum, T=29):
    args = case(T=T, K=4, V=4 if objective == "self" else 3)
    gamma = torch.rand(2, T, 2, dtype=DT) if momentum else None
    S0 = torch.randn(2, 2, 4, args[2].shape[-1], dtype=DT)
    return args, gamma, S0


@pytest.mark.parametrize("objective", ["l2", "dot", "self"])
@pytest.mark.parametrize("momentum", [False, True])
def test_memory_stream_in_pieces_equals_one_call(objective, momentum):
    args, gamma, S0 = stream_case(objective, momentum)
    C = 6
    init = S0 if gamma is None else (S0, torch.zeros_like(S0))
    o_ref, final = recurrent(*args, C, init, True, gamma=gamma, objective=objective)
    S_ref = final if gamma is None else final[0]
    state = LinearState(S0, S0)
    pos, outs = 0, []
    for a, b in [(0, 1), (1, 2), (2, 9), (9, 12), (12, 25), (25, 26), (26, 29)]:
        piece = [x[:, a:b] for x in args]
        o, state = ops.memory_stream(*piece, C, state, pos % C, gamma=None if gamma is None else gamma[:, a:b],
                                     objective=objective)
        pos += b - a
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=1), o_ref) < 1e-10
    assert rel_rms(state.S, S_ref) < 1e-10
    assert (state.Z is not None) == momentum


def test_deep_memory_stream_equals_oracle():
    args = case(T=17, K=4, V=4)
    state = {"w2": torch.randn(2, 2, 4, 8, dtype=DT) * 0.5, "w1": torch.randn(2, 2, 8, 4, dtype=DT) * 0.5}
    o_ref, s_ref = deep_recurrent(*args, 4, state, act="gelu")
    st, pos, outs = DeepState(state["w2"], state["w1"], state["w2"], state["w1"]), 0, []
    for a, b in [(0, 3), (3, 4), (4, 11), (11, 17)]:
        o, st = ops.deep_memory(*[x[:, a:b] for x in args], 4, st, pos % 4, act="gelu")
        pos += b - a
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=1), o_ref) < 1e-10
    assert rel_rms(st.w2, s_ref["w2"]) < 1e-10 and rel_rms(st.w1, s_ref["w1"]) < 1e-10
    with pytest.raises(ValueError, match=r"offset must be in \[0, chunk_size=4\), got 4"):
        ops.deep_memory(*args, 4, st, 4)
