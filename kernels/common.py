"""Shared pieces of the memory-update kernels: input checks, the tiling plan and small Triton helpers.

Dimensions: B batch, T time, H heads, K key width, V value width, C chunk of the rule (``chunk_size``),
L tokens per kernel tile, BT/BK/BV block sizes (powers of two) along time / key / value.

A *chunk* is the rule's unit: every token of a chunk takes its gradient at the chunk-start state.
A *tile* is the kernel's unit of parallel work along time. A tile never straddles two chunks: when C ≤ 64 a
tile is one chunk (BT = next power of two ≥ max(C, 16)); when C > 64 a chunk is cut into ⌈C / 64⌉ tiles
processed one after the other, each knowing both its own start state and its chunk's start state.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MAX_WIDTH = 256  # largest K or V: the state kernels hold a [K, BV] block of Sᵀ in registers
MAX_TILE = 64  # longest tile along time; longer chunks are cut into several tiles
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    return isinstance(tile_bounds, InterpretedFunction)


def _check_tensor(name: str, x: object, device: torch.device, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {x.stride()} for shape {tuple(x.shape)})")
    return x


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending value unless the inputs fit the kernel contract.

    Contract: q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` of one dtype in {fp32, fp16, bf16}; eta, alpha, beta
    ``[B, T, H]`` in that dtype or fp32; initial_state ``[B, H, K, V]`` fp32; all contiguous, on one CUDA device
    (or on CPU under ``TRITON_INTERPRET=1``); 1 ≤ K, V ≤ 256; chunk_size ≥ 1. Values are not inspected (that
    would synchronise with the GPU): alpha must lie in (0, 1] — its logarithm is taken — or the result is NaN.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
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


@triton.jit
def tile_bounds(i_t, T, C, L, NSUB):
    """First token (int64), token count and index within its chunk of tile ``i_t``."""
    i_s = i_t % NSUB
    start = (i_t // NSUB).to(tl.int64) * C + i_s * L
    n = tl.minimum(tl.minimum(L, C - i_s * L), T - start)
    return start, tl.maximum(n, 0).to(tl.int32), i_s


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
