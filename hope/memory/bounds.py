"""Chunk bookkeeping of a stream fed in pieces, written once: where a piece is cut by chunk boundaries.

Every chunked memory in `hope` aligns its chunks to the start of the stream, not to the start of a call, so that
pieces with the state carried equal one call. A piece of T tokens that starts at stream position `pos` is cut
wherever `pos + t` is a multiple of a chunk size.
"""

from __future__ import annotations


def cuts(T: int, pos: int, sizes: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """The non-empty spans `[a, b)` of `[0, T)` between consecutive chunk boundaries of any of `sizes`."""
    points = {0, T}
    for size in sizes:
        points.update(range(-pos % size, T, size))
    points = sorted(p for p in points if 0 <= p <= T)
    return [(a, b) for a, b in zip(points[:-1], points[1:]) if b > a]


def head_body_tail(T: int, offset: int, size: int) -> tuple[int, int, int]:
    """Split a piece of T tokens whose first token is `offset` tokens into a chunk of `size` into
    (head, n_full, tail): `head` tokens finishing the current chunk (0 if the piece starts on a boundary),
    `n_full` whole chunks, and `tail` tokens of a chunk left unfinished."""
    if not 0 <= offset < size:
        raise ValueError(f"offset must be in [0, chunk_size={size}), got {offset}")
    head = min(T, (size - offset) % size)
    n_full = (T - head) // size
    return head, n_full, T - head - n_full * size
