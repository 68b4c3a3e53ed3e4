"""The bounded KV cache of the attention core (`HopeConfig.kv_cache`), in fp64 on CPU.

With calls of L tokens and `kv_cache = L`, a stream fed with its state carried is Transformer-XL with memory
length L: token t attends to the tokens s ≤ t with s ≥ (⌊t/L⌋ − 1)·L. The reference below builds that (and the
general rule for any cut: a token of the call [a, b) sees the tokens [a − L, t]) with explicit masked attention on
the same q, k, v, computed over the whole stream at once.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from hope import CMSLevel, HopeConfig, HopeLM, preset
from hope.layers.attention import CausalSelfAttention, KVCache, apply_rope, rope_cos_sin


def core(kv_cache=None, d_model: int = 32, n_heads: int = 2) -> CausalSelfAttention:
    """The attention core of a tiny config (that of tests/test_model.py's `tiny`), in fp64."""
    torch.manual_seed(0)
    cfg = HopeConfig(vocab_size=23, d_model=d_model, n_layers=2, n_heads=n_heads, core="attention",
                     cms=[CMSLevel()], ffn_hidden=48, kv_cache=kv_cache)
    return CausalSelfAttention(cfg).double()


def run_pieces(attn, x, cuts):
    """Outputs `[B, N, D]` of `x` fed in the calls [cuts[i], cuts[i+1]) with the state carried, and the states."""
    state, outs, states = None, [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        y, state = attn(x[:, a:b], state)
        state = attn.bound(state)  # what HopeLM does at the end of each call
        outs.append(y)
        states.append(state)
    return torch.cat(outs, dim=1), states


def masked_reference(attn, x, lowest):
    """Explicit softmax attention over the whole stream `x` `[B, N, D]` in which token t attends to the tokens
    s with lowest[t] ≤ s ≤ t (absolute RoPE positions 0..N-1)."""
    B, N, D = x.shape
    H, K = attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(B, N, 3, H, K).permute(2, 0, 3, 1, 4)  # [B, H, N, K]
    cos, sin = rope_cos_sin(torch.arange(N), K, attn.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    t = torch.arange(N)[:, None]
    s = torch.arange(N)[None, :]
    allowed = (s <= t) & (s >= torch.as_tensor(lowest)[:, None])  # [N, N]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(K)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return attn.out((probs @ v).transpose(1, 2).reshape(B, N, D))


def lowest_for_cuts(cuts, L):
    """lowest[t] for the calls [a, b): the cache received at a holds the tokens [a − L, a)."""
    lowest = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        lowest += [max(0, a - L)] * (b - a)
    return lowest


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- (1) kv_cache=None: unchanged ------------------------------------------------------------------------------


def test_default_is_unbounded():
    assert HopeConfig().kv_cache is None
    assert preset("transformer", "tiny").kv_cache is None


def test_unbounded_pieces_equal_whole():
    attn = core(None)
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    whole, _ = attn(x)
    for cuts in ([0, 3, 4, 11, 16, 21], list(range(22))):
        pieces, states = run_pieces(attn, x, cuts)
        assert rel_err(pieces, whole) < 1e-10
        assert states[-1].k.shape[2] == 21  # every token kept
    assert rel_err(whole, masked_reference(attn, x, [0] * 21)) < 1e-10


def test_cache_larger_than_stream_changes_nothing():
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    unbounded, _ = run_pieces(core(None), x, [0, 5, 13, 21])
    bounded, states = run_pieces(core(21), x, [0, 5, 13, 21])
    assert rel_err(bounded, unbounded) < 1e-10
    assert states[-1].k.shape[2] == 21


# ---- (2) kv_cache = L: Transformer-XL with memory L ------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 4, 7])
def test_windows_of_L_equal_banded_mask(L):
    attn = core(L)
    N = 5 * L + (3 if L > 1 else 0)  # a last, shorter window too
    x = torch.randn(2, N, 32, dtype=torch.float64)
    cuts = list(range(0, N, L)) + [N]
    got, _ = run_pieces(attn, x, cuts)
    lowest = [max(0, (t // L - 1) * L) for t in range(N)]
    ref = masked_reference(attn, x, lowest)
    assert rel_err(got, ref) < 1e-10
    # and it is not the unbounded attention: the band matters
    assert rel_err(got, masked_reference(attn, x, [0] * N)) > 1e-6


@pytest.mark.parametrize("cuts", [[0, 3, 4, 11, 16, 21], list(range(22)), [0, 2, 21]])
def test_any_cut_sees_the_call_plus_the_last_L_tokens(cuts):
    """A call [a, b) sees its causal prefix plus the L tokens before a; one token per call is a sliding window."""
    L = 5
    attn = core(L)
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    got, _ = run_pieces(attn, x, cuts)
    assert rel_err(got, masked_reference(attn, x, lowest_for_cuts(cuts, L))) < 1e-10


def test_positions_stay_absolute():
    attn = core(4)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    _, states = run_pieces(attn, x, [0, 4, 8, 12])
    assert [st.pos.tolist() for st in states] == [[4, 4], [8, 8], [12, 12]]
    # the cached keys are those rotated at their absolute positions 8..11
    B, H, K = 2, attn.n_heads, attn.head_dim
    k = attn.qkv(x).view(B, 12, 3, H, K).permute(2, 0, 3, 1, 4)[1]
    cos, sin = rope_cos_sin(torch.arange(12), K, attn.rope_theta)
    assert rel_err(states[-1].k, apply_rope(k, cos, sin)[:, :, 8:]) < 1e-12


def test_gradient_reaches_the_previous_call_through_the_trimmed_cache():
    attn = core(4)
    x = torch.randn(1, 8, 32, dtype=torch.float64, requires_grad=True)
    state = attn.bound(attn(x[:, :4])[1])
    y, _ = attn(x[:, 4:], state)
    y.sum().backward()
    assert x.grad[:, :4].abs().sum() > 0


# ---- (3) bounded size and memory -------------------------------------------------------------------------------


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@pytest.mark.parametrize("n_heads,B", [(1, 1), (2, 2)])  # B·H = 1: a slice along S is already contiguous
@pytest.mark.parametrize("T", [1, 3, 6, 15])  # shorter, equal and longer calls than L
def test_cache_and_its_storage_never_exceed_L_tokens(n_heads, B, T):
    L = 6
    attn = core(L, d_model=16, n_heads=n_heads)
    H, K = attn.n_heads, attn.head_dim
    budget = B * H * L * K * 8  # fp64 bytes of L tokens
    state = None
    with torch.no_grad():
        for i in range(12):
            state = attn.bound(attn(torch.randn(B, T, 16, dtype=torch.float64), state)[1])
            assert state.k.shape == state.v.shape == (B, H, min(L, T * (i + 1)), K)
            for t in (state.k, state.v):
                assert t.is_contiguous()
                assert storage_bytes(t) == t.numel() * 8 <= budget
            assert state.k.untyped_storage().data_ptr() != state.v.untyped_storage().data_ptr()


def test_many_calls_hold_L_tokens():
    """Long stream, one token per call (generation): the state stays at L tokens, the unbounded one grows."""
    L, B = 8, 2
    bounded, unbounded = core(L), core(None)
    sb = su = None
    with torch.no_grad():
        for _ in range(200):
            x = torch.randn(B, 1, 32, dtype=torch.float64)
            sb = bounded.bound(bounded(x, sb)[1])
            su = unbounded.bound(unbounded(x, su)[1])
    H, K = bounded.n_heads, bounded.head_dim
    assert sb.k.shape[2] == L and su.k.shape[2] == 200
    assert storage_bytes(sb.k) + storage_bytes(sb.v) == 2 * B * H * L * K * 8
    assert int(sb.pos[0]) == 200


# ---- (4) validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, False, "8"])
def test_bad_kv_cache_raises_naming_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")) as info:
        HopeConfig(core="attention", kv_cache=bad)
    assert "kv_cache" in str(info.value)


def test_good_kv_cache_values():
    assert HopeConfig(core="attention", kv_cache=1).kv_cache == 1
    assert HopeConfig(core="attention", kv_cache=512).kv_cache == 512
    assert HopeConfig(core="attention", kv_cache=None).kv_cache is None


# ---- the model: Transformer++ with a 64-token memory -------------------------------------------------------------


def test_transformer_with_kv_cache_runs_and_roundtrips_its_state():
    torch.manual_seed(0)
    model = HopeLM(preset("transformer", "tiny", kv_cache=64)).double().eval()
    ids = torch.randint(0, 256, (2, 4 * 64))
    with torch.no_grad():
        state, outs = None, []
        for a in range(0, 3 * 64, 64):  # three windows of 64, state carried
            out = model(ids[:, a : a + 64], state)
            state = out.state
            outs.append(out.logits)
            for layer in state.layers:
                assert layer.core.k.shape == layer.core.v.shape == (2, 2, 64, 64)
        assert all(torch.isfinite(o).all() for o in outs)
        buf = io.BytesIO()
        torch.save(model.export_state(state), buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=False)
        assert set(saved["layers"][0]["core"]) == {"pos", "k", "v"}
        restored = model.import_state(saved)
        assert isinstance(restored.layers[0].core, KVCache)
        cont = model(ids[:, 3 * 64 :], restored).logits
        ref = model(ids[:, 3 * 64 :], state).logits
    assert torch.equal(cont, ref)
    # the last window did see the previous one: it differs from the same window without a state
    assert rel_err(cont, model(ids[:, 3 * 64 :]).logits) > 1e-6
