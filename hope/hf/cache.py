"""`HopeCache`: the `transformers` cache of a HOPE model, which is the model's own stream state.

Legend: B batch, T new tokens, S tokens (columns) seen so far.

HOPE has no key/value cache to extend: each row's context lives in its `StreamState` (core memories, CMS fast weights,
KV cache of an attention core). Padding cannot be masked inside a recurrent memory write, so padded tokens never
reach the model: each row reads only the tokens whose attention mask is 1. A state keeps all its rows at one stream
position, so the rows are split into groups by their number of real tokens at the first call (one group without
padding), and each group carries its own `StreamState`. Later calls must give every row of a group the same number
of real tokens (true in `generate`, which appends one token per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hope.state import StreamState


@dataclass
class RowGroup:
    """Rows `rows` `[b]` of the batch that share one stream state (None until they have read a token)."""

    rows: torch.Tensor
    state: StreamState | None = None


class HopeCache:
    """The per-group stream states of a batch and the number of columns seen (`get_seq_length`, padding included).

    Beam search is not supported (no `reorder_cache`): `generate(num_beams > 1)` raises transformers' error.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, groups: list[RowGroup], seen: int = 0) -> None:
        self.groups = groups
        self.seen = seen

    @classmethod
    def for_mask(cls, mask: torch.Tensor) -> HopeCache:
        """Groups of the rows of `mask` `[B, T]` (1 = real token) with equal numbers of real tokens."""
        counts = mask.sum(dim=1)  # [B]
        return cls([RowGroup(torch.nonzero(counts == n).flatten()) for n in torch.unique(counts)])

    @classmethod
    def from_state(cls, state: StreamState, seen: int | None = None) -> HopeCache:
        """A cache continuing `state` (e.g. one restored with `HopeLM.import_state`) for all of its rows."""
        rows = torch.arange(state.pos.numel(), device=state.pos.device)
        return cls([RowGroup(rows, state)], int(state.pos[0]) if seen is None else seen)

    @property
    def batch_size(self) -> int:
        return sum(g.rows.numel() for g in self.groups)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns read so far, padding included (what `generate` compares with the length of `input_ids`)."""
        return self.seen

    def __repr__(self) -> str:
        sizes = [g.rows.numel() for g in self.groups]
        return f"HopeCache(seen={self.seen}, group sizes={sizes})"
