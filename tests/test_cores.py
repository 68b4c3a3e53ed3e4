"""The memory cores (`SelfModifyingCore`, `TitansCore`) and the causal conv: streaming, causality, batch
independence, outer gradients and input checks, in fp64 (docs/design.md §8).

Legend: B batch, T time, D model width.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_rms

from hope.config import HOPE_PAPER_MEMORY, HopeConfig
from hope.layers.conv import CausalConv, _ShiftedConv
from hope.layers.self_modifying import SelfModifyingCore
from hope.layers.titans import TitansCore
from hope.memory.config import MemoryConfig

DT = torch.float64
D, H = 16, 2

VARIANTS = {
    "hope": ("self_modifying", {}),
    "hope_deep_momentum": ("self_modifying", {"mem_depth": "deep", "proj_depth": "deep", "momentum": True,
                                              "adaptive_q": True, "self_target_mem": True, "activation": "gelu"}),
    "hope_plain_targets": ("self_modifying", {"self_targets": False, "adaptive_q": True, "objective": "dot"}),
    "hope_momentum": ("self_modifying", {"momentum": True}),
    "hope_gd": ("self_modifying", {"erase": "gd", "eta_max": 2 / 64, "momentum": True}),
    "titans": ("titans", {}),
    # retention toward the initial state (tests/test_retain_toward_init.py has its token-by-token oracle)
    "hope_retain_init": ("self_modifying", {"retain_toward": "init", "momentum": True}),
    "hope_retain_init_plain": ("self_modifying", {"retain_toward": "init", "self_targets": False,
                                                  "adaptive_q": True, "objective": "dot"}),
    # the paper's literal HOPE (preset "hope_paper"), and full-width linear projection memories
    "hope_paper": ("self_modifying", HOPE_PAPER_MEMORY),
    "hope_full_linear": ("self_modifying", {"proj_width": "full", "adaptive_q": True, "momentum": True,
                                            "negative_eigenvalues": True}),
}
LONG = [n for n in VARIANTS if n not in ("hope_paper", "hope_full_linear")]  # those two: tests/test_paper_preset.py


def make_core(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    core, knobs = VARIANTS[name]
    memory = MemoryConfig(chunk_size=8, proj_chunk_size=4, conv_width=3, **{**knobs, **overrides})
    config = HopeConfig(d_model=D, n_heads=H, n_layers=2, core=core, memory=memory)
    torch.manual_seed(seed)
    module = (SelfModifyingCore if core == "self_modifying" else TitansCore)(config).to(DT)
    with torch.no_grad():  # larger than the LM init so that every path moves the output measurably
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def inputs(B=2, T=21, seed=1) -> torch.Tensor:
    return torch.randn(B, T, D, dtype=DT, generator=torch.Generator().manual_seed(seed))


def assert_same_state(state, ref, rows=slice(None)):
    """The same tensors (to 1e-12) under the same saved-state keys; `rows` selects the rows of `ref`."""
    flat, flat_ref = state.to_flat(), ref.to_flat()
    assert flat.keys() == flat_ref.keys()
    for key, t in flat_ref.items():
        assert flat[key].shape == t[rows].shape, key
        if t.numel():  # proj.S has no columns when every projection memory is deep
            assert rel_rms(flat[key].to(DT), t[rows].to(DT)) < 1e-12, key


def run_pieces(core, x, cuts):
    state, ys = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        y, state = core(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("name", VARIANTS)
def test_pieces_equal_one_call(name):
    core, x = make_core(name), inputs()
    y, state = core(x)
    for cuts in ([0, 1, 2, 9, 10, 17, 21], [0, 4, 8, 16, 21], [0, 3, 13, 21]):
        y2, state2 = run_pieces(core, x, cuts)
        assert rel_rms(y2, y) < 1e-12, cuts
        assert all(t.shape[0] == x.shape[0] for t in state.to_flat().values())  # every state tensor is per sample
        assert_same_state(state2, state)


@pytest.mark.parametrize("name", VARIANTS)
def test_one_token_steps_equal_parallel(name):
    core, x = make_core(name), inputs(T=13)
    y, _ = core(x)
    y2, state = run_pieces(core, x, list(range(14)))
    assert rel_rms(y2, y) < 1e-12
    assert state.pos.tolist() == [13, 13] and state.pos.dtype == torch.long


@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    core, x = make_core(name), inputs()
    y, _ = core(x)
    x2 = x.clone()
    x2[:, 11] += 1.0
    y2, _ = core(x2)
    assert torch.equal(y2[:, :11], y[:, :11])
    assert (y2[:, 11:] - y[:, 11:]).abs().max() > 1e-6


@pytest.mark.parametrize("name", VARIANTS)
def test_batch_rows_are_independent(name):
    core, x = make_core(name), inputs(B=3)
    y, state = core(x)
    for b in range(3):
        y1, s1 = core(x[b : b + 1])
        assert rel_rms(y1, y[b : b + 1]) < 1e-12
        assert_same_state(s1, state, rows=slice(b, b + 1))


@pytest.mark.parametrize("name", VARIANTS)
def test_every_parameter_gets_an_outer_gradient(name):
    """Outer gradients flow through the writes, so the meta-learned initial states of the write-only
    projection memories (M_k, M_v, M_η, M_α) learn too (paper_notes A17)."""
    core, x = make_core(name), inputs(T=19)
    y, _ = core(x)
    y.square().mean().backward()
    for pname, p in core.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, pname


def test_projection_memories_learn_through_the_writes_only():
    """The scalar read-outs' initial state (columns η, α of proj_init) reaches the loss through η and α, and the
    k, v columns' through k and v: each block of proj_init gets a gradient of its own."""
    core, x = make_core("hope"), inputs(T=19)
    core(x)[0].square().mean().backward()
    K = D // H
    for cols in (slice(0, K), slice(K, 2 * K), slice(2 * K, 2 * K + 1), slice(2 * K + 1, 2 * K + 2)):
        assert core.proj_init.grad[..., cols].abs().max() > 0


@pytest.mark.parametrize("name", VARIANTS)
def test_init_weights_documents_every_parameter(name):
    core = make_core(name)
    doc = type(core).init_weights.__doc__
    for pname, _ in core.named_parameters(recurse=False):
        assert pname in doc, pname
    for child in core.children():
        assert type(child).__name__ in doc or any(n in doc for n, c in core.named_children() if c is child)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "titans"])
def test_fused_sweep_equals_the_oracle_backend(name):
    """backend="torch" runs a linear M_mem inside the projection sweep; "recurrent" runs the token-by-token
    oracle on the whole piece afterwards: same outputs and states, also for a stream fed in pieces."""
    x = inputs()
    ref, fused = make_core(name, backend="recurrent"), make_core(name, backend="torch")
    for cuts in ([0, 21], [0, 3, 4, 13, 21]):
        (y_ref, s_ref), (y, s) = run_pieces(ref, x, cuts), run_pieces(fused, x, cuts)
        assert rel_rms(y, y_ref) < 1e-12
        assert_same_state(s, s_ref)


@pytest.mark.parametrize("name", LONG)
def test_long_stream_stays_finite(name):
    """T = 4096 at the default chunk sizes and a realistic head width (K = 64), where unbounded steps (a raw
    self-target v, undamped momentum, W₁'s un-normalised GD step) blow the memories up within ~1K tokens."""
    core, knobs = VARIANTS[name]
    config = HopeConfig(d_model=128, n_heads=2, core=core, memory=MemoryConfig(**knobs))
    torch.manual_seed(3)
    module = (SelfModifyingCore if core == "self_modifying" else TitansCore)(config).to(DT)
    x = torch.randn(1, 4096, 128, dtype=DT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, state = module(x)
    state = state.to_flat()
    assert torch.isfinite(y).all() and all(torch.isfinite(t.to(DT)).all() for t in state.values())
    assert all(state[k].abs().max() < 1e3 for k in state if k.startswith(("mem", "proj")))


@pytest.mark.parametrize("name", ["hope", "titans"])
def test_bad_inputs_raise(name):
    core = make_core(name)
    with pytest.raises(ValueError, match=r"D=16\], got shape \[2, 5, 8\]"):
        core(torch.zeros(2, 5, 8, dtype=DT))
    with pytest.raises(ValueError, match=r"got shape \[5, 16\]"):
        core(torch.zeros(5, 16, dtype=DT))
    with pytest.raises(ValueError, match="floating point"):
        core(torch.zeros(2, 5, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="got list"):
        core([[0.0] * 16])
    _, state = core(inputs(B=2, T=3))
    state.pos = torch.tensor([3, 4])
    with pytest.raises(ValueError, match=r"same stream position, got \[3, 4\]"):
        core(inputs(B=2, T=2), state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size must be an int >= 1, got 0"),
        ({"erase": "delta"}, "erase must be one of"),
        ({"eta_max": 0.9}, r"eta_max=0.9 must be in \(0, 0.5\]"),
        ({"erase": "gd"}, r"eta_max=0.5 must be in \(0, 0.03125\] with erase='gd'"),
        ({"self_target_mem": True, "objective": "dot"}, "self_target_mem=True needs objective='l2'"),
        ({"momentum": 1}, "momentum must be a bool, got 1"),
        ({"hidden_mult": 0}, "hidden_mult must be > 0, got 0"),
        ({"max_horizon": 8}, "max_horizon must be an int >= 16 .*, got 8"),
    ],
)
def test_memory_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**kwargs)


@pytest.mark.parametrize("core", [SelfModifyingCore, TitansCore])
def test_max_horizon_sets_the_initial_retentions(core):
    """The heads start at horizons τ = 1/(1 − α) log-spaced in [16, max_horizon] tokens, for both cores."""
    for horizon in (1024, 16384):
        kind = "self_modifying" if core is SelfModifyingCore else "titans"
        memory = MemoryConfig(max_horizon=horizon)
        module = core(HopeConfig(d_model=32, n_heads=4, n_layers=1, core=kind, memory=memory))
        bias = module.alpha_bias if core is SelfModifyingCore else module.gates.bias[:4]
        tau = 1 / (1 - torch.sigmoid(bias.detach().double()))
        expected = torch.logspace(math.log10(16), math.log10(horizon), 4, dtype=torch.float64)
        assert torch.allclose(tau, expected, rtol=1e-4), (horizon, tau)


def test_conv_carries_its_inputs():
    conv = CausalConv(6, 4).to(DT)
    x = torch.randn(2, 9, 6, dtype=DT)
    y, cache = conv(x)
    padded = torch.nn.functional.pad(x.mT, (3, 0))
    ref = torch.nn.functional.conv1d(padded, conv.weight[:, None], conv.bias, groups=6).mT
    assert rel_rms(y, ref) < 1e-14 and torch.equal(cache, x[:, -3:])
    ys, cache = [], None
    for t in range(9):
        y_t, cache = conv(x[:, t : t + 1], cache)
        ys.append(y_t)
    assert rel_rms(torch.cat(ys, dim=1), y) < 1e-14
    with pytest.raises(ValueError, match=r"conv cache must be \[B, W−1, D\]"):
        conv(x, torch.zeros(2, 2, 6, dtype=DT))


def test_conv_backward_is_exact():
    """The hand-written backward of the shifted multiply-adds, against finite differences."""
    padded = torch.randn(2, 10, 5, dtype=DT, requires_grad=True)
    weight = torch.randn(5, 4, dtype=DT, requires_grad=True)
    bias = torch.randn(5, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(_ShiftedConv.apply, (padded, weight, bias))


def test_plain_targets_are_normalised():
    """`self_targets=False` regresses M_k, M_v, M_q onto v̄ = v/‖v‖, like the self-generated M_c(v̄): M_k's
    targets have unit norm however large the raw v read-out is. With the raw v as target (v ~50× its initial
    size here) M_k's state grows ~6× past its initial scale within 256 tokens, and a 600-step `hope_small`
    training run with it never left the unigram loss."""
    core = make_core("hope_plain_targets")
    K = D // H
    with torch.no_grad():
        core.proj_init[..., K:2 * K].mul_(50.0)  # the v columns: ‖v‖ ~ 50× its initial size
        y, state = core(inputs(B=1, T=256))
    assert torch.isfinite(y).all()
    k_cols, k_init = state.proj.S[..., :K], core.proj_init[..., :K]
    assert k_cols.abs().max() <= k_init.abs().max()


def test_titans_memory_stays_bounded_when_momentum_is_near_one():
    """γ ≈ 0.98, α ≈ 1, θ at its maximum, 512 tokens: the (1 − γ) factor of θ keeps the memory finite and moving.

    With θ = η_max/C·σ(·) alone this input overflows W₂ to inf (the NaN of a Titans LM at outer step 154)."""
    torch.manual_seed(0)
    core = TitansCore(HopeConfig(d_model=64, n_heads=2, n_layers=2, core="titans", memory=MemoryConfig()))
    with torch.no_grad():
        core.gates.bias.copy_(torch.tensor([8.0, 8.0, 8.0, 8.0, 4.0, 4.0]))  # [α | θ | γ] pre-activations per head
        core.qkv.weight.normal_(std=0.3)
        y, state = core(torch.randn(2, 512, 64))
    assert torch.isfinite(y).all()
    for name, init in (("w2", core.mem_w2), ("w1", core.mem_w1)):
        w = getattr(state.mem, name)  # [B, H, ·, ·]
        assert torch.isfinite(w).all()
        change = ((w - init).norm() / init.norm()).item()
        assert 0.05 < change < 10, (name, change)  # it learned something, and did not blow up
