"""The CMS write schedule (docs/design.md §5): when each level writes, from which loss, and how a stream fed in
pieces (down to one token at a time) makes exactly the writes of one call.

The language model hands `CMSSchedule.run` one function, `step(ids, state, finals) -> logits`, that runs the
network on a piece whose CMS fast weights are fixed; the schedule does the rest:

- **Segments.** A call is cut at every multiple of a CMS period (absolute stream position), because a level's
  weights for one chunk depend on the whole network's loss on the previous chunk.
- **Chunk losses.** Each segment adds its next-token losses to the loss of every period's current chunk.
- **Lazy writes.** A chunk that ends is written when the next segment (or `detach`) needs the new weights, so
  the write at the end of a training sequence, whose result nobody reads, costs nothing.
- **Shared backward.** With the exact signal the writes of nested periods that end together share one
  backward, that of the largest chunk's loss (`_write`).
- **Windows.** `detach` cuts a stream from the graph between windows (truncated backpropagation through time). A
  chunk still in progress there keeps the gradient of its loss so far in `LevelState.grad`, and its write adds
  it: a level whose period spans many windows learns from all of them. What the cut loses is the part of the
  gradient that flows across windows (through the carried core state, and the one prediction whose target opens
  the next window).
- **Replays.** Inner gradients need autograd, so the schedule computes them even under `torch.no_grad()`. There,
  pieces shorter than the smallest period (token-by-token generation) run without a graph; a chunk seen that way
  is replayed in one call from its start state when it is written (`_replay_write`), which costs far less than
  differentiating hundreds of one-token graphs.

The schedule keeps its bookkeeping in `StreamState.schedule` and reads the levels by attribute; it never imports
the model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial

import torch

from hope.cms.level import (
    Level,
    apply_writes,
    chunk_loss,
    detach_level_state,
    detach_tree,
    ensure_fast,
    init_level_state,
    level_grads,
    level_memory,
    materialize,
    prediction_losses,
    write_levels,
)
from hope.cms.profile import write_region
from hope.config import CMSLevel
from hope.layers.mlp import SwiGLU
from hope.memory.bounds import cuts
from hope.state import ChunkRecord, LayerState, LevelState, SavedLevels, StreamState

Step = Callable[[torch.Tensor, StreamState, "list[torch.Tensor] | None"], torch.Tensor]


class CMSSchedule:
    """The write schedule of a model's CMS levels. `levels[b]` lists block b's levels as (MLP, config) pairs,
    fastest first; `signal` is `HopeConfig.cms_signal`; `carry_core` False drops the cores' states at a cut
    (`detach`), so that only the CMS levels carry a stream across windows."""

    def __init__(self, levels: list[list[tuple[SwiGLU, CMSLevel]]], signal: str, carry_core: bool = True) -> None:
        self.levels = levels
        self.signal = signal
        self.carry_core = carry_core
        self.periods = sorted({lvl.period for block in levels for _, lvl in block if lvl.period is not None})

    # ---- state ---------------------------------------------------------------------------------------------

    def init_levels(self, batch_size: int) -> list[list[LevelState | None]]:
        """Fresh fast-level states per block (None for a level that never writes in context)."""
        return [[None if lvl.period is None else init_level_state(mlp, lvl, batch_size) for mlp, lvl in block]
                for block in self.levels]

    def restore_levels(self, saved: list[list[LevelState | None]]) -> list[list[LevelState | None]]:
        """Saved levels (Δ and optimizer memory) with their fast weights rebuilt, in new containers."""
        return [[None if st is None else LevelState(dict(st.delta), dict(st.opt), materialize(mlp, st.delta),
                                                    None if st.grad is None else dict(st.grad))
                 for st, (mlp, _) in zip(block_saved, block)] for block_saved, block in zip(saved, self.levels)]

    def detach_(self, state: StreamState) -> None:
        """Cut `state` from the autograd graph in place (new level containers; their fast weights are rebuilt from
        θ_0 when the stream next runs)."""
        for layer in state.layers:
            layer.core = detach_tree(layer.core)
            layer.cms = [None if st is None else detach_level_state(st) for st in layer.cms]
        if state.pending is not None:
            state.pending = state.pending.detach()

    def detach(self, step: Step, state: StreamState) -> StreamState:
        """A copy of `state` cut from the autograd graph, after the writes that are due (what the next call would
        make first). A chunk still in progress carries the gradient of its loss so far into the copy's
        `LevelState.grad` (one shared backward for all of them); `state` itself keeps its chunk losses. Pieces
        of a chunk that were run without a graph (one-token calls under `torch.no_grad()`, replayed only when the
        chunk ends) cannot be carried: their loss is dropped, with a warning."""
        with torch.enable_grad():
            carried = self._finish_window(step, state)
        sched = state.schedule
        if any(r.ids and not r.recorded for r in sched.replay.values()):
            warnings.warn(
                f"state detached at position {int(state.pos[0])}, inside a CMS chunk of periods {self.periods} that "
                "was run without a graph (calls shorter than the smallest period under torch.no_grad()): the "
                "partial chunk's inner loss is dropped",
                stacklevel=3,
            )
        return self._cut(state, carried)

    def _cut(self, state: StreamState, carried: dict[tuple[int, int], dict[str, torch.Tensor]]) -> StreamState:
        """A copy of `state` cut from the graph, its levels keyed in `carried` adding those gradients to theirs."""
        out = StreamState(state.pos.clone(), [LayerState(ls.core, list(ls.cms)) for ls in state.layers],
                          state.pending)
        self.detach_(out)
        if not self.carry_core:
            for layer in out.layers:
                layer.core = None
        for (b, i), grads in carried.items():
            level = out.layers[b].cms[i]
            level.grad = grads if level.grad is None else {n: level.grad[n] + g for n, g in grads.items()}
        return out

    def defer_detach(self, step: Step, state: StreamState) -> WindowEnd:
        """`detach`, with the gradients of the writes due now and of the chunks in progress taken from the outer
        backward that is about to run instead of a backward of their own (`WindowEnd`). Exact when the outer loss
        is the sum (or mean) of the window's next-token losses whose targets lie inside the window, which are
        exactly the losses those chunks hold; the trainer's stream mode leaves out the window's last prediction
        for that reason. With the residual signal, or pieces run without a graph, it is `detach` itself."""
        sched = state.schedule
        due = sorted(sched.due)
        periods = [C for C in self.periods if C in due or sched.acc.get(C) is not None]
        if not periods or self.signal == "residual" or any(r.ids and not r.recorded for r in sched.replay.values()):
            return WindowEnd(ready=self.detach(step, state))
        return WindowEnd(self, state, due, [key for C in periods for key in self._keys(C)])

    def _finish_window(self, step: Step, state: StreamState) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """Make the writes due and take the gradients of the chunks in progress (`_partial_grads`). With the exact
        signal and every due chunk recorded, one backward serves both, that of the chunk that started first (every
        chunk ends here, so the others are its tails): a window boundary then costs one backward, not two."""
        sched = state.schedule
        due = sorted(sched.due)
        replayed = any(C in sched.replay and not sched.replay[C].recorded for C in due)
        if not due or replayed or self.signal == "residual":
            self._write_due(step, state)
            return self._partial_grads(state)
        grads = self._partial_grads(state, due)
        self._write_from(state, due, grads)
        return grads

    def _write_from(self, state: StreamState, due: list[int], grads: dict[tuple[int, int], dict]) -> None:
        """Make the writes of the periods `due`, whose chunks end here, from gradients already taken (popped from
        `grads`, keyed (block, level)), then start their next chunks."""
        sched = state.schedule
        with write_region():
            apply_writes([lv for C in due for lv in self._levels_with_period(C, state)],
                         [grads.pop(key) for C in due for key in self._keys(C)])
        for C in due:
            sched.replay.pop(C, None)
            self._end_chunk(C, state)
        sched.due = []
        if sched.cut:
            sched.cut = False
            self.detach_(state)

    def _keys(self, C: int) -> list[tuple[int, int]]:
        """(block, level) of every level of period C."""
        return [(b, i) for b, block in enumerate(self.levels) for i, (_, lvl) in enumerate(block) if lvl.period == C]

    def _partial_grads(self, state: StreamState, due: list[int] = ()) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """The gradients of the chunks in progress (and of the chunks of `due`, which end here), keyed
        (block, level). With the exact signal one backward serves every level, that of the chunk that started
        first: the others are its tails, and the losses it holds from before a tail began were computed before the
        tail's fast weights made any product."""
        sched = state.schedule
        partial = [C for C in self.periods if C in due or sched.acc.get(C) is not None]
        if not partial:
            return {}
        pos = int(state.pos[0]) if state.pos.numel() else 0
        start = lambda C: pos - C if C in due else pos - pos % C  # where the period-C chunk began
        first = min(partial, key=lambda C: (start(C), -C))  # the earliest chunk; the larger period on a tie
        keys = {C: self._keys(C) for C in partial}
        levels = {C: self._levels_with_period(C, state) for C in partial}
        with write_region():
            if self.signal == "residual":
                grads = [g for C in partial for g in level_grads(levels[C], sched.acc.get(C), sched.finals.get(C, []))]
            else:
                grads = level_grads([lv for C in partial for lv in levels[C]], sched.acc.get(first))
        return dict(zip([k for C in partial for k in keys[C]], grads))

    # ---- the segment loop ------------------------------------------------------------------------------------

    def run(self, step: Step, ids: torch.Tensor, state: StreamState, start: int) -> torch.Tensor:
        """Logits `[B, T, V]` of `ids` `[B, T]` at stream position `start`, with the CMS writes of the stream."""
        grad_enabled = torch.is_grad_enabled()
        record = grad_enabled or ids.shape[1] >= self.periods[0]
        with torch.enable_grad():
            logits = torch.cat([self._learn_segment(step, ids[:, s:e], start + s, state, grad_enabled, record)
                                for s, e in cuts(ids.shape[1], start, self.periods)], dim=1)
        return logits if grad_enabled else logits.detach()

    def _learn_segment(self, step: Step, ids: torch.Tensor, start: int, state: StreamState, keep_graph: bool,
                       record: bool = True) -> torch.Tensor:
        """Forward one segment and add its next-token losses to each period's chunk loss.

        Every chunk also keeps its start state and token ids, so that a chunk not wholly recorded (`record`
        False: no graph, no chunk loss) can be replayed when it is written; it also keeps the levels written at
        its inner boundaries (other periods' writes), which its replay takes instead of making those writes again.
        """
        self._write_due(step, state)
        sched = state.schedule
        written_here = [C for C in self.periods if start % C == 0]  # the periods whose chunks start here
        for C in self.periods:
            if C in written_here:
                sched.replay[C] = ChunkRecord(self._snapshot(state, start))
            elif written_here and C in sched.replay and not keep_graph:
                # a chunk that may be replayed keeps the levels written at its inner boundaries: its replay takes
                # them instead of writing them again, and could not redo a write whose chunk began before its own
                if not (record and sched.replay[C].recorded) or any(c > start % C for c in written_here):
                    sched.replay[C].inner[start] = self._levels_at(state, written_here)
        for layer, block in zip(state.layers, self.levels):
            for st, (mlp, _) in zip(layer.cms, block):
                if st is not None:
                    ensure_fast(mlp, st)
        finals = [] if record and self.signal == "residual" else None
        with torch.set_grad_enabled(record):
            logits = step(ids, state, finals)
        for C in self.periods:
            replay = sched.replay.get(C)
            if replay is not None:
                replay.ids.append(ids)
                replay.recorded = replay.recorded and record
        if record:
            ce, positions = prediction_losses(logits, ids, start, state.pending)
            for C in self.periods:
                loss = chunk_loss(ce, positions, C)
                sched.acc[C] = loss if sched.acc.get(C) is None else sched.acc[C] + loss
                if finals is not None:
                    sched.finals.setdefault(C, []).extend(finals)
        state.pending = logits[:, -1] if record else logits[:, -1].detach()
        end = start + ids.shape[1]
        sched.due = [C for C in self.periods if end % C == 0]
        if not keep_graph and record and end % math.lcm(*self.periods) == 0:
            # every chunk loss is spent with the writes now due: the graph is cut right after them (so inference
            # memory stays bounded), and they too wait until the weights are needed, so an evaluation that drops
            # its state never pays for the last writes
            sched.cut = True
        return logits

    # ---- writes ------------------------------------------------------------------------------------------------

    def _write_due(self, step: Step, state: StreamState) -> None:
        """Make the writes due at the current position, largest period first: a replayed chunk also writes the
        smaller periods that end with it (`_replay_write`), and the recorded ones share one backward (`_write`)."""
        sched = state.schedule
        written, recorded = set(), []
        for C in sorted(sched.due, reverse=True):
            replay = sched.replay.pop(C, None)
            if C in written:
                continue
            if replay is not None and not replay.recorded:
                written.update(self._replay_write(step, C, replay, state))
            else:
                recorded.append(C)
        for C in written:
            self._end_chunk(C, state)
        if recorded:
            self._write(recorded, state)
        sched.due = []
        if sched.cut:
            sched.cut = False
            self.detach_(state)

    def _write(self, periods: list[int], state: StreamState) -> None:
        """Write the levels of `periods`, whose chunks all end here, from the recorded chunk losses, then start
        their next chunks.

        With the exact signal one backward serves them all, that of the largest period's chunk loss: a smaller
        period's chunk is the tail of the larger one, and the larger chunk's losses before that tail were computed
        before the tail's fast weights made any product, so they add nothing to its gradient (at context 512 with
        periods 64 and 256 this saves the 64-token backward of the write at 256). The residual signal writes each
        period from its own chunk's final residual streams."""
        sched = state.schedule
        with write_region():
            if self.signal == "residual":
                for C in periods:
                    write_levels(self._levels_with_period(C, state), sched.acc.get(C), sched.finals.get(C, []))
            else:
                levels = [level for C in periods for level in self._levels_with_period(C, state)]
                write_levels(levels, sched.acc.get(max(periods)))
        for C in periods:
            self._end_chunk(C, state)

    @staticmethod
    def _end_chunk(C: int, state: StreamState) -> None:
        """Drop the period-C chunk's loss and final residual streams: the next chunk starts empty."""
        state.schedule.acc[C] = None
        state.schedule.finals.pop(C, None)

    def _levels_with_period(self, C: int, state: StreamState) -> list[Level]:
        """(MLP, config, state) of every level of period C, in the order of `_keys(C)`."""
        return [(*self.levels[b][i], state.layers[b].cms[i]) for b, i in self._keys(C)]

    # ---- replays ---------------------------------------------------------------------------------------------

    def _snapshot(self, state: StreamState, start: int) -> StreamState:
        """The stream state at position `start`, a chunk start, cut from the graph (new containers, shared tensors).
        `state.pos` still holds the position of the current call's first token."""
        layers = [LayerState(detach_tree(ls.core), [None if st is None else level_memory(st) for st in ls.cms])
                  for ls in state.layers]
        pending = None if state.pending is None else state.pending.detach()
        return StreamState(torch.full_like(state.pos, start), layers, pending)

    def _replay_write(self, step: Step, C: int, replay: ChunkRecord, state: StreamState) -> list[int]:
        """Write the period-C levels of `state` by running their chunk again, in one call with a graph, from the
        chunk's start state (smaller periods are written inside the replay as they were in the stream), together
        with the smaller periods whose chunks end here too. Same writes as differentiating the recorded pieces,
        since pieces with state carried equal one call. Returns the periods written."""
        snap = replay.start
        saved_levels = self.restore_levels([ls.cms for ls in snap.layers])
        local = StreamState(snap.pos, [LayerState(ls.core, cms) for ls, cms in zip(snap.layers, saved_levels)],
                            snap.pending)
        ids = torch.cat(replay.ids, dim=1)  # [B, C]
        start = int(snap.pos[0]) if snap.pos.numel() else 0
        with torch.enable_grad():
            for s, e in cuts(ids.shape[1], start, self.periods):
                if start + s in replay.inner:  # the stream made the smaller periods' writes due here: take its result
                    self._set_levels(local, replay.inner[start + s])
                self._learn_segment(step, ids[:, s:e], start + s, local, keep_graph=True)
        periods = local.schedule.due  # C and every smaller period that divides the chunk's end
        self._write(periods, local)
        for layer, local_layer, block in zip(state.layers, local.layers, self.levels):
            for i, (_, lvl) in enumerate(block):
                if lvl.period in periods:
                    layer.cms[i] = local_layer.cms[i]
        return periods

    def _levels_at(self, state: StreamState, periods: list[int]) -> SavedLevels:
        """The (Δ, optimizer memory) of the levels of `periods`, cut from the graph, keyed (block, level)."""
        return SavedLevels(periods, {(b, i): level_memory(layer.cms[i])
                                     for b, (block, layer) in enumerate(zip(self.levels, state.layers))
                                     for i, (_, lvl) in enumerate(block) if lvl.period in periods})

    def _set_levels(self, state: StreamState, saved: SavedLevels) -> None:
        """Put levels saved by `_levels_at` into `state` as the writes due now, which are then no longer due."""
        for (b, i), st in saved.levels.items():
            state.layers[b].cms[i] = detach_level_state(st)  # own containers
        for C in saved.periods:
            self._end_chunk(C, state)
            state.schedule.replay.pop(C, None)
        state.schedule.due = [C for C in state.schedule.due if C not in saved.periods]


def _keep(store: list, index: int, grad: torch.Tensor) -> None:
    store[index] = grad


class WindowEnd:
    """A window's end whose CMS gradients come from the outer backward (`CMSSchedule.defer_detach`): hooks on the
    outputs of the products that the due and in-progress levels recorded keep ∂L/∂y as the outer backward passes;
    `finish(scale)` then makes the due writes and carries the other chunks' gradients, exactly as `detach` would
    with ∂acc/∂y = scale·∂L/∂y (scale: the number of losses the outer loss averages, over any loss scaling)."""

    def __init__(self, schedule: CMSSchedule | None = None, state: StreamState | None = None, due: list[int] = (),
                 keys: list[tuple[int, int]] = (), ready: StreamState | None = None) -> None:
        self.schedule, self.state, self.due, self.keys, self.ready = schedule, state, list(due), list(keys), ready
        self.captured: list[list[torch.Tensor | None]] = []
        self.handles = []
        for b, i in self.keys:
            targets = state.layers[b].cms[i].fast.grad_targets()
            store = [None] * len(targets)
            self.captured.append(store)
            self.handles += [y.register_hook(partial(_keep, store, n)) for n, y in enumerate(targets)]

    def finish(self, scale: float) -> StreamState:
        """The state cut from the graph, with the window's writes made (call after the outer backward)."""
        if self.ready is not None:
            return self.ready
        for handle in self.handles:
            handle.remove()
        state, schedule = self.state, self.schedule
        grads = {}
        for (b, i), store in zip(self.keys, self.captured):
            gy = [None if g is None else g * scale for g in store]
            grads[(b, i)] = state.layers[b].cms[i].fast.grads(gy)
        schedule._write_from(state, self.due, grads)
        self.ready, self.state, self.captured = schedule._cut(state, grads), None, []
        return self.ready
