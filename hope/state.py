"""The state of a batch of streams: what `HopeLM` carries from one call to the next, typed.

```
StreamState
├── pos         [B] int64: tokens seen so far (every row at the same position)
├── pending     [B, V] logits of the last token, whose target arrives with the next call (CMS chunk losses)
├── layers[b]   LayerState, one per block
│   ├── core    the sequence core's own state (attention: `KVCache`; memory cores: their `*State`), None at first
│   └── cms[i]  LevelState of the block's i-th CMS level (None for a level that never writes in context)
│       ├── delta  {name: [B, *θ.shape]}  the writes so far: fast weights are θ_0 − Δ
│       ├── opt    {name: ...}            the level optimizer's memory (e.g. momentum)
│       ├── fast   FastWeights            θ_0 − Δ, recording the products a write differentiates
│       └── grad   {name: [B, *θ.shape]}  the chunk's gradient from earlier windows (stream training), or None
└── schedule    WriteSchedule: the CMS engine's bookkeeping between calls (chunk losses, due writes, replays)
```

`HopeLM.export_state` turns a state into plain tensors in nested dicts (`torch.save`-able, format version
`STATE_VERSION`), and `HopeLM.import_state` turns that back into a `StreamState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hope.layers.mlp import FastWeights

Tensor = torch.Tensor

STATE_VERSION = 1  # the format of `HopeLM.export_state`; files without a "version" key are version 1


@dataclass
class LevelState:
    """One fast CMS level of one block, per sample. `fast` is None in a saved copy (a snapshot or an export),
    whose fast weights are rebuilt from Δ when it is used again. `grad` is the gradient of the current chunk's
    loss carried over from earlier windows when the stream was cut from the graph inside the chunk (truncated
    backpropagation through time; `hope.cms.schedule`), None when nothing is carried."""

    delta: dict[str, Tensor]
    opt: dict[str, Any]
    fast: FastWeights | None = None
    grad: dict[str, Tensor] | None = None


@dataclass
class LayerState:
    """One block's state: its sequence core's state and its CMS levels' states."""

    core: Any
    cms: list[LevelState | None]


@dataclass
class ChunkRecord:
    """A CMS chunk in progress, kept so that it can be replayed in one call when it is written: the stream state
    at its start, its token ids so far, whether every piece of it was recorded with a graph, and the levels
    written at its inner boundaries (other periods' writes), keyed by stream position."""

    start: StreamState
    ids: list[Tensor] = field(default_factory=list)
    recorded: bool = True
    inner: dict[int, SavedLevels] = field(default_factory=dict)


@dataclass
class SavedLevels:
    """The levels of `periods` as a write left them, keyed (block, level), cut from the graph."""

    periods: list[int]
    levels: dict[tuple[int, int], LevelState]


@dataclass
class WriteSchedule:
    """The CMS engine's bookkeeping between calls, per period C: the chunk loss accumulated so far (`acc`), the
    final residual streams of the chunk (`finals`, residual signal only), the chunk records for replays, the
    periods whose writes are due before the next token, and whether the graph is cut after them."""

    acc: dict[int, Tensor | None] = field(default_factory=dict)
    finals: dict[int, list[Tensor]] = field(default_factory=dict)
    replay: dict[int, ChunkRecord] = field(default_factory=dict)
    due: list[int] = field(default_factory=list)
    cut: bool = False


@dataclass
class StreamState:
    """See the module docstring."""

    pos: Tensor
    layers: list[LayerState]
    pending: Tensor | None = None
    schedule: WriteSchedule = field(default_factory=WriteSchedule)
