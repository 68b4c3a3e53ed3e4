"""Triton memory-update kernels (`hope.memory.kernels`) against the token-by-token PyTorch oracle
(hope.memory.rule.recurrent).

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk.

Without CUDA the kernels run on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py before
anything imports triton; the interpreter cannot do bf16, so bf16 is tested only on GPU). Shapes stay small
because the interpreter executes every kernel instruction in Python.
"""

import itertools
import json

import pytest
import torch
from conftest import rel_rms

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")
from hope.memory.kernels import chunk_memory_update, recurrent_memory_update  # noqa: E402
from hope.memory.kernels.common import interpreter_on  # noqa: E402
from hope.memory.rule import recurrent as oracle  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and not interpreter_on():
    pytest.skip("hope.memory.kernels was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
GRAD_NAMES = ("q", "k", "v", "eta", "alpha", "beta", "initial_state")


def make_inputs(
    B: int, T: int, H: int, K: int, V: int, erase: str, dtype: torch.dtype, with_state: bool, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Inputs as HOPE produces them: unit q and k, η = 0.9·sigmoid (docs/design.md §3 bound), α near 1, β = η or 0."""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)
    eta = 0.9 * torch.sigmoid(torch.randn(B, T, H, generator=gen))  # [B, T, H]
    x = dict(
        q=unit(B, T, H, K),
        k=unit(B, T, H, K),
        v=torch.randn(B, T, H, V, generator=gen),
        eta=eta,
        alpha=torch.sigmoid(torch.randn(B, T, H, generator=gen) + 3.0),
        beta=eta.clone() if erase == "dgd" else torch.zeros_like(eta),
    )
    x = {name: t.to(device=DEVICE, dtype=dtype) for name, t in x.items()}
    x["initial_state"] = torch.randn(B, H, K, V, generator=gen).to(DEVICE) if with_state else None
    return x


def oracle_fp64(x: dict[str, torch.Tensor | None], chunk_size: int, do: torch.Tensor, dht: torch.Tensor) -> dict:
    """Oracle outputs, final state and gradients in fp64, from the very same (possibly 16-bit) input values."""
    leaves = {n: None if t is None else t.detach().double().requires_grad_() for n, t in x.items()}
    args = [leaves[n] for n in GRAD_NAMES[:6]]
    o, ht = oracle(*args, chunk_size, leaves["initial_state"], True)
    ((o * do.double()).sum() + (ht * dht.double()).sum()).backward()
    return dict(o=o, ht=ht, **{n: t.grad for n, t in leaves.items() if t is not None})


def kernel_with_grads(x: dict[str, torch.Tensor | None], chunk_size: int, do: torch.Tensor, dht: torch.Tensor) -> dict:
    leaves = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in x.items()}
    o, ht = chunk_memory_update(*[leaves[n] for n in GRAD_NAMES[:6]], chunk_size, leaves["initial_state"], True)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return dict(o=o, ht=ht, **{n: t.grad for n, t in leaves.items() if t is not None})


def assert_all_close(got: dict, ref: dict, tol: float) -> None:
    for name, value in ref.items():
        assert got[name] is not None, f"{name}: no gradient"
        assert got[name].shape == value.shape, f"{name}: shape {tuple(got[name].shape)} vs {tuple(value.shape)}"
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"
        err = rel_rms(got[name], value)
        assert err < tol, f"{name}: relative RMS error {err:.2e} ≥ {tol:.0e}"


def run_grad_case(B, T, H, K, V, chunk_size, erase, with_state, dtype, seed=0):
    x = make_inputs(B, T, H, K, V, erase, dtype, with_state, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE, dtype)
    dht = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    assert_all_close(kernel_with_grads(x, chunk_size, do, dht), oracle_fp64(x, chunk_size, do, dht), TOL[dtype])


# (B, T, H, K, V, C, erase, initial state, dtype): T in {1, 7, 40, 64, 100, 150}; C = 1 (a tile per token),
# C < 16 (padded tiles), C not a power of two, C = T, C > T, C > 64 (a chunk cut into 2 or 3 tiles).
GRAD_CASES = [
    (2, 1, 2, 16, 16, 16, "dgd", True, torch.float32),
    (2, 7, 2, 16, 32, 3, "gd", False, torch.float32),
    (1, 7, 2, 16, 16, 1, "dgd", True, torch.float32),
    (1, 64, 2, 32, 16, 16, "dgd", True, torch.float32),
    (1, 64, 2, 16, 16, 64, "gd", True, torch.float32),
    (1, 100, 2, 20, 12, 32, "dgd", False, torch.float32),
    (2, 100, 1, 16, 16, 70, "dgd", True, torch.float32),
    (1, 150, 1, 16, 16, 130, "gd", True, torch.float32),
    (1, 100, 2, 16, 16, 16, "gd", True, torch.float16),
    (1, 64, 2, 16, 32, 24, "dgd", False, torch.float16),
    (1, 7, 1, 16, 16, 100, "dgd", True, torch.float16),
    (1, 40, 1, 100, 72, 16, "dgd", True, torch.float32),  # K, V > 64: several key/value blocks per loop
]


@pytest.mark.parametrize("B,T,H,K,V,chunk_size,erase,with_state,dtype", GRAD_CASES)
def test_chunk_kernel_matches_oracle(B, T, H, K, V, chunk_size, erase, with_state, dtype):
    """Outputs, final state and the gradients of q, k, v, η, α, β and the initial state."""
    run_grad_case(B, T, H, K, V, chunk_size, erase, with_state, dtype)


@pytest.mark.parametrize(
    "B,T,H,K,V,chunk_size,erase,with_state,dtype",
    [
        (2, 1, 2, 16, 16, 4, "dgd", True, torch.float32),
        (1, 7, 2, 16, 32, 3, "gd", False, torch.float32),
        (1, 64, 2, 20, 12, 16, "dgd", True, torch.float16),
        (1, 100, 1, 16, 16, 70, "dgd", True, torch.float32),
        (1, 20, 1, 100, 72, 8, "gd", True, torch.float32),
    ],
)
def test_recurrent_kernel_matches_oracle_and_chunk_kernel(B, T, H, K, V, chunk_size, erase, with_state, dtype):
    x = make_inputs(B, T, H, K, V, erase, dtype, with_state)
    args = [x[n] for n in GRAD_NAMES[:6]]
    o, ht = recurrent_memory_update(*args, chunk_size, x["initial_state"], True)
    ref_o, ref_ht = oracle(*[a.double() for a in args], chunk_size, x["initial_state"], True)
    chunk_o, chunk_ht = chunk_memory_update(*args, chunk_size, x["initial_state"], True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    for name, got, ref in (
        ("o", o, ref_o),
        ("final", ht, ref_ht),
        ("chunk o", chunk_o, o),
        ("chunk final", chunk_ht, ht),
    ):
        err = rel_rms(got, ref)
        assert err < TOL[dtype], f"{name}: relative RMS error {err:.2e}"


def test_unwritten_elements_are_caught_by_nan_poisoning(monkeypatch):
    """Every buffer torch.empty hands the kernels starts as NaN: any element read before written shows up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    cases = [(1, 37, 2, 20, 12, 16, "dgd", True), (1, 45, 1, 16, 16, 70, "gd", False)]  # partial tiles; 2 tiles
    for B, T, H, K, V, chunk_size, erase, with_state in cases:
        x = make_inputs(B, T, H, K, V, erase, torch.float32, with_state)
        gen = torch.Generator().manual_seed(3)
        do, dht = torch.randn(B, T, H, V, generator=gen).to(DEVICE), torch.randn(B, H, K, V, generator=gen).to(DEVICE)
        ref = oracle_fp64(x, chunk_size, do, dht)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", nan_empty)
            got = kernel_with_grads(x, chunk_size, do, dht)
            args = [x[n] for n in GRAD_NAMES[:6]]
            got["recurrent o"], got["recurrent ht"] = recurrent_memory_update(
                *args, chunk_size, x["initial_state"], True
            )
        ref["recurrent o"], ref["recurrent ht"] = ref["o"], ref["ht"]
        assert_all_close(got, ref, TOL[torch.float32])


def test_beta_none_is_plain_gd():
    x = make_inputs(1, 20, 2, 16, 16, "gd", torch.float32, True)
    args = [x[n] for n in ("q", "k", "v", "eta", "alpha")]
    o_none, ht_none = chunk_memory_update(*args, None, 8, x["initial_state"], True)
    o_zero, ht_zero = chunk_memory_update(*args, x["beta"], 8, x["initial_state"], True)
    assert torch.equal(o_none, o_zero) and torch.equal(ht_none, ht_zero)


def test_gradients_without_final_state():
    """output_final_state=False: the backward gets no state gradient and must equal the dht = 0 case."""
    B, T, H, K, V = 1, 20, 2, 16, 16
    x = make_inputs(B, T, H, K, V, "dgd", torch.float32, True)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, final = chunk_memory_update(*[leaves[n] for n in GRAD_NAMES[:6]], 8, leaves["initial_state"])
    assert final is None
    (o * do).sum().backward()
    got = {n: t.grad for n, t in leaves.items()}
    ref = kernel_with_grads(x, 8, do, torch.zeros(B, H, K, V, device=DEVICE))
    assert all(torch.equal(got[n], ref[n]) for n in GRAD_NAMES)


def test_broadcast_output_gradients():
    """o.sum() and final.sum() send stride-0 gradients into backward; they must be read as dense ones."""
    B, T, H, K, V = 1, 20, 2, 16, 16
    x = make_inputs(B, T, H, K, V, "dgd", torch.float32, True)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, final = chunk_memory_update(*[leaves[n] for n in GRAD_NAMES[:6]], 8, leaves["initial_state"], True)
    (o.sum() + final.sum()).backward()
    ones_o, ones_s = torch.ones(B, T, H, V, device=DEVICE), torch.ones(B, H, K, V, device=DEVICE)
    ref = oracle_fp64(x, 8, ones_o, ones_s)
    assert_all_close({n: t.grad for n, t in leaves.items()}, {n: ref[n] for n in GRAD_NAMES}, TOL[torch.float32])


def test_beta0_chunk1_is_the_gated_delta_rule():
    """β = 0, C = 1 ⇒ S_t = α_t S_{t−1}(I − (η_t/α_t) k kᵀ) + (η_t/α_t) (α_t v_t) kᵀ: fla's gated delta rule with
    g = log α, b = η/α and values α v (the mapping the benchmark uses), written here as its own loop."""
    B, T, H, K, V = 1, 12, 2, 16, 16
    x = make_inputs(B, T, H, K, V, "gd", torch.float32, False)
    q, k, v, eta, alpha = (x[n].double().cpu() for n in ("q", "k", "v", "eta", "alpha"))
    b, v_in = eta / alpha, v * alpha[..., None]
    state = torch.zeros(B, H, K, V, dtype=torch.float64)  # Sᵀ
    ref = []
    for t in range(T):
        a_t, b_t, k_t = alpha[:, t, :, None, None], b[:, t, :, None, None], k[:, t, :, :, None]
        state = a_t * state  # decay before the read of the delta rule
        state = state + b_t * k_t * (v_in[:, t, :, None, :] - (k_t * state).sum(-2, keepdim=True))
        ref.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o, _ = chunk_memory_update(*[x[n] for n in ("q", "k", "v", "eta", "alpha", "beta")], 1)
    assert rel_rms(o.cpu(), torch.stack(ref, 1)) < 1e-5


def test_beta0_chunk1_matches_fla_reference():
    """The same mapping against flash-linear-attention's own PyTorch reference, where fla is installed."""
    fla_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason="flash-linear-attention not installed")
    B, T, H, K, V = 2, 40, 2, 16, 32
    x = make_inputs(B, T, H, K, V, "gd", torch.float32, True)
    alpha = x["alpha"]
    ref_o, ref_ht = fla_naive.naive_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"] * alpha[..., None], x["eta"] / alpha, alpha.log(), scale=1.0,
        initial_state=x["initial_state"], output_final_state=True,
    )  # fmt: skip
    o, ht = chunk_memory_update(*[x[n] for n in GRAD_NAMES[:6]], 1, x["initial_state"], True)
    assert rel_rms(o, ref_o) < 1e-5 and rel_rms(ht, ref_ht) < 1e-5


def test_backward_saves_inputs_only():
    """Memory linear in T: the autograd graph keeps the inputs, not per-token or per-chunk [K, V] states."""
    x = make_inputs(1, 64, 2, 16, 16, "dgd", torch.float32, True)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, _ = chunk_memory_update(*[leaves[n] for n in GRAD_NAMES[:6]], 8, leaves["initial_state"])
    saved = o.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == sum(t.numel() for t in x.values())


def test_recurrent_kernel_refuses_gradients():
    x = make_inputs(1, 4, 1, 16, 16, "dgd", torch.float32, False)
    x["q"].requires_grad_()
    with pytest.raises(ValueError, match=r"\['q'\] require grad"):
        recurrent_memory_update(*[x[n] for n in GRAD_NAMES[:6]], 2)
    with torch.no_grad():
        o, _ = recurrent_memory_update(*[x[n] for n in GRAD_NAMES[:6]], 2)
    assert torch.isfinite(o).all()


def _bad(change):
    """Valid inputs [B=1, T=5, H=2, K=V=16] with one change applied; returns the argument tuple."""
    x = make_inputs(1, 5, 2, 16, 16, "dgd", torch.float32, True)
    args = dict(**{n: x[n] for n in GRAD_NAMES[:6]}, chunk_size=2, initial_state=x["initial_state"])
    args["output_final_state"] = False
    change(args)
    return args


BAD_INPUTS = [
    ("k has shape", lambda a: a.update(k=a["k"][:, :4].contiguous())),
    ("v has shape", lambda a: a.update(v=a["v"][:, :, :1].contiguous())),
    ("alpha has shape", lambda a: a.update(alpha=a["alpha"][:, :, :1].contiguous())),
    ("q must be contiguous", lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2))),
    ("eta must be contiguous", lambda a: a.update(eta=a["eta"].transpose(1, 2).contiguous().transpose(1, 2))),
    ("k is on meta", lambda a: a.update(k=a["k"].to("meta"))),
    ("initial_state is on meta", lambda a: a.update(initial_state=a["initial_state"].to("meta"))),
    ("chunk_size must be ≥ 1, got 0", lambda a: a.update(chunk_size=0)),
    ("chunk_size must be ≥ 1, got -3", lambda a: a.update(chunk_size=-3)),
    ("K=300", lambda a: a.update(q=torch.zeros(1, 5, 2, 300), k=torch.zeros(1, 5, 2, 300))),
    ("V=257", lambda a: a.update(v=torch.zeros(1, 5, 2, 257))),
    ("q has dtype torch.float64", lambda a: a.update(**{n: a[n].double() for n in ("q", "k", "v")})),
    ("k has dtype torch.float16", lambda a: a.update(k=a["k"].half())),
    ("beta has dtype torch.float64", lambda a: a.update(beta=a["beta"].double())),
    ("initial_state has shape", lambda a: a.update(initial_state=a["initial_state"][:, :1].contiguous())),
    ("initial_state has dtype torch.float16", lambda a: a.update(initial_state=a["initial_state"].half())),
    ("q has an empty dimension", lambda a: a.update(q=a["q"][:, :0], k=a["k"][:, :0])),
]


@pytest.mark.parametrize("message,change", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
@pytest.mark.parametrize("fn", [chunk_memory_update, recurrent_memory_update], ids=["chunk", "recurrent"])
def test_bad_inputs_raise_value_error_naming_the_value(fn, message, change):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        fn(**_bad(change))


@pytest.mark.parametrize(
    "change",
    [lambda a: a.update(chunk_size=2.0), lambda a: a.update(q=a["q"].numpy()), lambda a: a.update(chunk_size=True)],
)
def test_wrong_types_raise_type_error(change):
    with pytest.raises(TypeError):
        chunk_memory_update(**_bad(change))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    if HAS_CUDA:
        pytest.skip("the CPU refusal is only reachable without CUDA")
    monkeypatch.setattr("hope.memory.kernels.common.interpreter_on", lambda: False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        chunk_memory_update(**_bad(lambda a: None))


def test_bench_tiny_writes_results(tmp_path):
    from experiments.bench_kernel import bench

    with open(bench.main(["--tiny", "--out", str(tmp_path)])) as f:
        result = json.load(f)
    assert result["meta"]["device"] and result["meta"]["date"]
    timed = {(r["impl"], r["T"], r["erase"], r["mode"]) for r in result["rows"] if r["ms"] is not None}
    for impl, T, erase, mode in itertools.product(
        ("oracle", "torch_chunked"), (16, 32), ("dgd", "gd"), ("fwd", "fwdbwd")
    ):
        assert (impl, T, erase, mode) in timed
    if not HAS_CUDA:
        assert "no CUDA" in result["meta"]["skipped"]["triton_chunk"]
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_bench_refuses_to_time_a_wrong_implementation():
    from experiments.bench_kernel import bench

    cli = bench.parse_args(["--tiny"])
    x = bench.make_case(1, 20, 2, 16, "dgd", torch.float32, "cpu")
    wrong = lambda x, c: bench.memory_update(*[x[n] for n in bench.NAMES], c + 1, backend="torch")  # other chunks
    row = bench.run_row("wrong", wrong, x, 4, "fwd", cli)
    assert row["ms"] is None and "correctness check failed" in row["skipped"]
    assert bench.run_row("torch_chunked", bench.implementations("cpu")[0]["torch_chunked"], x, 4, "fwdbwd", cli)["ms"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_size,erase", [(64, "dgd"), (16, "gd"), (128, "dgd")])
def test_gpu_bf16(chunk_size, erase):
    run_grad_case(2, 1000, 4, 64, 64, chunk_size, erase, True, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("K,V,chunk_size", [(128, 128, 64), (256, 256, 64), (256, 64, 100), (64, 256, 32)])
def test_gpu_large_shapes(K, V, chunk_size):
    # the fp64 oracle's autograd graph holds ~4 [B, H, K, V] tensors per token: B·H = 2 keeps it near 4 GiB
    run_grad_case(1, 1024, 2, K, V, chunk_size, "dgd", True, torch.float32)
