"""Shared pieces of the memory-update kernels: input checks, the tiling plan, launches and small Triton helpers.

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk of the rule (``chunk_size``),
L tokens per kernel tile, BT/BK/BV block sizes (powers of two) along time / key / value.

A *chunk* is the rule's unit: every token of a chunk takes its gradient at the chunk-start state.
A *tile* is the kernel's unit of parallel work along time. A tile never straddles two chunks: when C ≤ 64 a
tile is one chunk (BT = next power of two ≥ max(C, 16)); when C > 64 a chunk is cut into ⌈C / 64⌉ tiles
processed one after the other, each knowing both its own start state and its chunk's start state.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from hope._checks import check_tensor

Tensor = torch.Tensor

MAX_WIDTH = 256  # largest K or V: the state kernels hold a [K, BV] block of Sᵀ in registers
MAX_TILE = 64  # longest tile along time; longer chunks are cut into several tiles
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Inputs(NamedTuple):
    """The checked inputs of one call (β filled with zeros when None), in the order of the kernels' gradients."""

    q: Tensor  # [B, T, H, K]
    k: Tensor  # [B, T, H, K]
    v: Tensor  # [B, T, H, V]
    eta: Tensor  # [B, T, H]
    alpha: Tensor  # [B, T, H]
    beta: Tensor  # [B, T, H]
    initial_state: Tensor | None  # [B, H, K, V] fp32

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(B, T, H, K, V)."""
        return (*self.q.shape, self.v.shape[-1])


@dataclass(frozen=True)
class Tiling:
    """How a sequence of T tokens is cut into chunks of the rule and tiles of the kernel."""

    chunk_size: int  # C
    tile_len: int  # L = min(C, MAX_TILE) tokens per tile (the last tile of a chunk may hold fewer)
    block_t: int  # BT, power of two ≥ max(L, 16) (tl.dot needs 16)
    n_sub: int  # tiles per chunk, ⌈C / L⌉
    n_tiles: int  # NT = ⌈T / C⌉ · n_sub (trailing tiles of a short last chunk are empty)

    @property
    def multi(self) -> bool:
        """True when a chunk spans several tiles, so a tile's start state differs from its chunk's."""
        return self.n_sub > 1


def plan_tiles(seq_len: int, chunk_size: int) -> Tiling:
    """Tiling of ``seq_len`` tokens for a rule with chunk size ``chunk_size``."""
    tile_len = min(chunk_size, MAX_TILE)
    n_sub = triton.cdiv(chunk_size, tile_len)
    block_t = max(16, triton.next_power_of_2(tile_len))
    return Tiling(chunk_size, tile_len, block_t, n_sub, triton.cdiv(seq_len, chunk_size) * n_sub)


def tile_args(x: Inputs, tiling: Tiling) -> tuple[int, ...]:
    """(T, H, K, V, C, L, NSUB): the leading scalar arguments of every tile kernel."""
    _, seq_len, heads, key_dim, value_dim = x.dims
    return seq_len, heads, key_dim, value_dim, tiling.chunk_size, tiling.tile_len, tiling.n_sub


def state_block_v(key_dim: int, value_dim: int) -> tuple[int, int]:
    """(BK, BV) for kernels that keep a whole-K block of the state in registers: BK · BV ≤ 4096."""
    block_k = max(16, triton.next_power_of_2(key_dim))
    return block_k, max(16, min(triton.next_power_of_2(value_dim), 4096 // block_k))


def loop_blocks(key_dim: int, value_dim: int) -> tuple[int, int]:
    """(BK, BV) for kernels that loop over the key and value widths in blocks of at most 64."""
    return min(64, max(16, triton.next_power_of_2(key_dim))), min(64, max(16, triton.next_power_of_2(value_dim)))


def fp32(x: Inputs, *shape: int) -> Tensor:
    """An uninitialised fp32 buffer on the inputs' device."""
    return torch.empty(*shape, device=x.q.device, dtype=torch.float32)


def launch(kernel, grid: tuple[int, ...], *args, block_t: int, sequential: bool = False, **constexprs) -> None:
    """``kernel[grid](*args, BT=block_t, **constexprs)`` with the num_warps / num_stages of `launch_options`."""
    kernel[grid](*args, BT=block_t, **constexprs, **launch_options(sequential, block_t))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: full fp32 for fp32 inputs (TF32 would cost ~1e-3 relative error), TF32 for 16-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_options(sequential: bool, block_t: int) -> dict[str, int]:
    """num_warps / num_stages of a launch; reasoned from compiling for sm_90 without a GPU, not tuned by timing.

    ``experiments/bench_kernel/compile_check.py`` showed that Triton's default 3 pipeline stages overflow the
    227 KB of shared memory an H100 block may use (state kernels at K = V = 256: ~280 KB; the dq/dk kernel at
    K = V = 128: 240 KB), so every kernel runs unpipelined; and that [64, 64] fp32 tiles spill registers at
    4 warps, hence 8 warps for 64-token tiles and for the sequential kernels.
    """
    return dict(num_warps=8 if sequential or block_t >= 64 else 4, num_stages=1)


def interpreter_on() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when first imported)."""
    return isinstance(tile_rows, InterpretedFunction)


def _check_tensor(name: str, x: object, device: torch.device, ndim: int) -> torch.Tensor:
    check_tensor(name, x, device)
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {x.stride()} for shape {tuple(x.shape)})")
    return x


def checked_inputs(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor | None, chunk_size: int,
    initial_state: Tensor | None, output_final_state: bool,
) -> Inputs:
    """The inputs (``beta=None`` as zeros: plain GD, the kernels always read a β); raise ``TypeError``/``ValueError``
    naming the offending value unless they fit the kernel contract.

    Contract: q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` of one dtype in {fp32, fp16, bf16}; eta, alpha, beta
    ``[B, T, H]`` in that dtype or fp32; initial_state ``[B, H, K, V]`` fp32; all contiguous, on one CUDA device
    (or on CPU under ``TRITON_INTERPRET=1``); 1 ≤ K, V ≤ 256; chunk_size ≥ 1. Values are not inspected (that
    would synchronise with the GPU): alpha must lie in (0, 1] — its logarithm is taken — or the result is NaN.
    """
    if beta is None and isinstance(eta, torch.Tensor):
        beta = torch.zeros_like(eta)
    check_tensor("q", q, getattr(q, "device", None))
    device = q.device
    _check_tensor("q", q, device, 4)
    if device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"q is on {device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before the kernels "
            "package is first imported to run them on CPU"
        )
    batch, seq_len, heads, key_dim = q.shape
    if min(q.shape) == 0:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)}")
    _check_tensor("k", k, device, 4)
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}")
    _check_tensor("v", v, device, 4)
    if v.shape[:3] != q.shape[:3] or v.shape[3] == 0:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [B, T, H, V] = [{batch}, {seq_len}, {heads}, V]")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported: float32, float16, bfloat16")
    for name, x in (("eta", eta), ("alpha", alpha), ("beta", beta)):
        _check_tensor(name, x, device, 3)
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B, T, H] = {tuple(q.shape[:3])}")
        if x.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"{name} has dtype {x.dtype}; expected {q.dtype} (as q) or float32")
    value_dim = v.shape[3]
    if key_dim > MAX_WIDTH or value_dim > MAX_WIDTH:
        raise ValueError(f"K={key_dim} and V={value_dim} must both be ≤ {MAX_WIDTH}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, device, 4)
        if initial_state.shape != (batch, heads, key_dim, value_dim):
            raise ValueError(
                f"initial_state has shape {tuple(initial_state.shape)}; expected [B, H, K, V] = "
                f"{(batch, heads, key_dim, value_dim)}"
            )
        if initial_state.dtype != torch.float32:
            raise ValueError(f"initial_state has dtype {initial_state.dtype}; the state is float32")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {output_final_state!r}")
    return Inputs(q, k, v, eta, alpha, beta, initial_state)


@triton.jit
def tile_rows(i_t, T, C, L, NSUB, BT: tl.constexpr):
    """Tile ``i_t``: its first token (int64), token count n, index within its chunk, the row indices r = 0 … BT−1,
    which rows hold a token (r < n) and their token indices."""
    i_s = i_t % NSUB
    start = (i_t // NSUB).to(tl.int64) * C + i_s * L
    n = tl.maximum(tl.minimum(tl.minimum(L, C - i_s * L), T - start), 0).to(tl.int32)
    r = tl.arange(0, BT)
    return start, n, i_s, r, r < n, start + r


@triton.jit
def block_cols(i_c, BC: tl.constexpr, W: tl.constexpr, row_ok):
    """Columns i_c·BC … i_c·BC + BC − 1 of a width-W block, and the mask [BT, BC] of the tile's rows × the columns
    inside W."""
    c = i_c * BC + tl.arange(0, BC)
    return c, row_ok[:, None] & (c < W)[None, :]


@triton.jit
def tile_decays(g_buf, head, start, n, rows, row_ok):
    """The tile's log-decays g [BT] (zero on empty rows) and g at its last token (zero for an empty tile)."""
    g = tl.load(g_buf + head + rows, mask=row_ok, other=0.0)
    g_last = tl.load(g_buf + head + start + n - 1, mask=n > 0, other=0.0)
    return g, g_last


@triton.jit
def gate_offsets(i_b, i_h, T, H: tl.constexpr, rows):
    """Offsets [BT] of the tile's rows in a [B, T, H] gate."""
    return i_b.to(tl.int64) * T * H + i_h + rows * H


@triton.jit
def token_ptrs(base, i_b, i_h, T, H: tl.constexpr, W: tl.constexpr, rows):
    """``base`` + the offsets [BT, 1] of the tile's rows in a [B, T, H, W] input (add the column offsets); base 0
    gives the offsets themselves, for inputs that share them."""
    return base + i_b.to(tl.int64) * T * H * W + i_h * W + rows[:, None] * (H * W)


@triton.jit
def buf_ptrs(buf, head, rows, W: tl.constexpr, cols):
    """Pointers [BT, BW] to rows ``head + rows`` and columns ``cols`` of a head-major [B·H·T, W] fp32 buffer."""
    return buf + (head + rows)[:, None] * W + cols[None, :]


@triton.jit
def tile_state(h_buf, i_bh, i_t, NT, K: tl.constexpr, V: tl.constexpr):
    """Pointer to state i_t of head i_bh in a [B, H, NT, K, V] buffer (tile-start states or their gradients)."""
    return h_buf + (i_bh.to(tl.int64) * NT + i_t) * K * V


@triton.jit
def state_block(h0, i_v, i_bh, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_H0: tl.constexpr):  # fmt: skip
    """Value block i_v of a [K, V] state held in registers: key / value indices, the [BK, BV] mask and offsets,
    and that block of state i_bh of ``h0`` (fp32 zeros without one)."""
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    m_kv = (ck < K)[:, None] & (cv < V)[None, :]
    p_kv = ck[:, None] * V + cv[None, :]  # [BK, BV] offsets inside one state
    m = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        m += tl.load(h0 + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)
    return ck, cv, m_kv, p_kv, m


@triton.jit
def store_state(ht, m, i_bh, p_kv, m_kv, K: tl.constexpr, V: tl.constexpr, STORE: tl.constexpr):
    """Write the register block ``m`` of state i_bh to ``ht`` when STORE."""
    if STORE:
        tl.store(ht + i_bh.to(tl.int64) * K * V + p_kv, m, mask=m_kv)


@triton.jit
def causal_decayed(x, g, r, row_ok):
    """x ⊙ D [BT, BT] with D[t, i] = e^{g_t − g_i} on the causal part i ≤ t of the tile's rows, zero elsewhere
    (the exponent is masked first, so no ratio above 1 is formed)."""
    causal = (r[:, None] >= r[None, :]) & row_ok[:, None]
    return tl.where(causal, x * tl.exp(tl.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)


@triton.jit
def gram(a_rows, b_rows, row_ok, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """A Bᵀ [BT, BT] (fp32) of two [BT, K] row blocks whose row r starts at ``a_rows[r]`` / ``b_rows[r]``
    (pointer columns [BT, 1]); rows where ``row_ok`` is false count as zero."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        ck = i_k * BK + tl.arange(0, BK)
        mask = row_ok[:, None] & (ck < K)[None, :]
        b_a = tl.load(a_rows + ck[None, :], mask=mask, other=0.0).to(tl.float32)  # [BT, BK]
        b_b = tl.load(b_rows + ck[None, :], mask=mask, other=0.0).to(tl.float32)  # [BT, BK]
        acc += tl.dot(b_a, tl.trans(b_b), input_precision=PREC)
    return acc


@triton.jit
def unit_lower_inverse(a, BT: tl.constexpr, PREC: tl.constexpr):
    """(I + A)⁻¹ for a strictly lower-triangular A [BT, BT] (BT ≤ 64), by doubling the inverted diagonal blocks.

    With X the inverse of the block-diagonal part of I + A in blocks of s, the inverse in blocks of 2s is
    X − X A_s X, where A_s keeps the entries of A in the lower-left s×s quarter of each 2s block:
    [[X₁, 0], [−X₂ A₂₁ X₁, X₂]]. Six levels of two small matmuls replace 64 sequential row updates. PREC is the
    kernel's dot precision: exact fp32 ("ieee") for fp32 inputs, TF32 (the precision of the inputs) for 16-bit ones.
    """
    r = tl.arange(0, BT)
    inv = (r[:, None] == r[None, :]).to(tl.float32)
    for level in tl.static_range(6):
        if (1 << level) < BT:  # blocks of s = 2^level merge into blocks of 2s
            same_2s = (r[:, None] >> (level + 1)) == (r[None, :] >> (level + 1))
            quarter = same_2s & ((r[:, None] >> level) != (r[None, :] >> level))
            inv -= tl.dot(tl.dot(inv, tl.where(quarter, a, 0.0), input_precision=PREC), inv, input_precision=PREC)
    return inv
