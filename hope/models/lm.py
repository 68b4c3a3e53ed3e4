"""`HopeLM`: the language model shared by HOPE and its baselines (DESIGN.md §2, §8).

Legend: B batch, T time, D model width, V vocabulary.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from hope.config import HopeConfig
from hope.layers import cms
from hope.layers.attention import first_position
from hope.layers.mlp import SwiGLU, residual_std
from hope.layers.norm import RMSNorm

_CORES = {
    "attention": "hope.layers.attention:CausalSelfAttention",
    "self_modifying": "hope.layers.self_modifying:SelfModifyingCore",
    "titans": "hope.layers.titans:TitansCore",
}


def build_core(config: HopeConfig) -> nn.Module:
    module, cls = _CORES[config.core].split(":")
    return getattr(importlib.import_module(module), cls)(config)


@dataclass
class LMOutput:
    """`logits` `[B, T, V]` and the `state` to pass to the next call to continue the same streams."""

    logits: torch.Tensor
    state: dict[str, Any]


class HopeBlock(nn.Module):
    """One block: a sequence core, then the CMS chain, each behind a pre-norm residual.

    ```
    x ──► RMSNorm ─► Core ──(+)──► h ──► RMSNorm ─► MLP_1 ──(+)──► … ──► RMSNorm ─► MLP_L ──(+)──► out
      └──────────────────────┘ ▲   └──────────────────────┘ ▲                └──────────────┘ ▲
          state["core"] ◄──────┘        state["cms"][0]["fast"]     (FastWeights θ_0 − Δ, per sample; a level
          (KV cache / fast memories)                                 with period None uses its parameters)
    ```
    """

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.core_norm = RMSNorm(config.d_model, config.norm_eps)
        self.core = build_core(config)
        self.levels = list(config.cms)
        out_std = residual_std(config.init_std, config.n_layers)
        self.cms_norms = nn.ModuleList(RMSNorm(config.d_model, config.norm_eps) for _ in self.levels)
        self.cms = nn.ModuleList(
            SwiGLU(config.d_model, lvl.hidden or config.ffn_hidden, config.init_std, out_std) for lvl in self.levels
        )

    def forward(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        y, state["core"] = self.core(self.core_norm(x), state["core"])
        h = x + y  # [B, T, D]
        for i, (norm, mlp) in enumerate(zip(self.cms_norms, self.cms)):
            fast = None if state["cms"][i] is None else state["cms"][i]["fast"]
            h = h + mlp(norm(h), fast)
        return h


class HopeLM(nn.Module):
    """Language model: `model(input_ids, state=None) -> LMOutput(logits, state)`.

    Passing a stream in pieces with the state carried gives what one call gives; the state holds, per sample,
    the core's memory (KV cache or fast memories) and the CMS fast weights, and can be saved with
    `export_state` and restored with `import_state`.

    With CMS levels of finite period the stream is processed segment by segment, cut at every multiple of a
    period, because a level's weights for one chunk depend on the whole network's loss on the previous chunk.
    Inner gradients need autograd, so such a model computes them even under `torch.no_grad()`. There, pieces
    shorter than the smallest period (token-by-token generation) run without recording a graph; a chunk seen that
    way is replayed in one call from its start state when it is written, which costs far less than differentiating
    hundreds of one-token graphs (`_replay_write`).
    """

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(HopeBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.periods = config.fast_periods

    def init_weights(self) -> None:
        """embed, head: N(0, init_std²); each module's own `init_weights` for the rest (RMSNorm gains: ones)."""
        nn.init.normal_(self.embed.weight, std=self.config.init_std)
        nn.init.normal_(self.head.weight, std=self.config.init_std)

    def forward(self, input_ids: torch.Tensor, state: dict[str, Any] | None = None) -> LMOutput:
        self._check_ids(input_ids)
        B, T = input_ids.shape
        state = self.init_state(B, input_ids.device) if state is None else state
        start = first_position(state["pos"])
        if self.config.max_seq_len is not None and start + T > self.config.max_seq_len:
            raise ValueError(
                f"stream length {start + T} (position {start} + {T} new tokens) exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if not self.periods:
            logits = self._forward_segment(input_ids, state)
        else:
            grad_enabled = torch.is_grad_enabled()
            record = grad_enabled or T >= self.periods[0]
            with torch.enable_grad():
                logits = torch.cat([self._learn_segment(input_ids[:, s:e], start + s, state, grad_enabled, record)
                                    for s, e in self._segments(start, T)], dim=1)
            if not grad_enabled:
                logits = logits.detach()
        state["pos"] = state["pos"] + T
        return LMOutput(logits, state)

    def _forward_segment(self, ids: torch.Tensor, state: dict[str, Any],
                         finals: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits `[B, T, V]` of one piece; the final residual stream h_L `[B, T, D]` is appended to `finals`."""
        x = self.embed(ids)  # [B, T, D]
        for block, layer_state in zip(self.blocks, state["layers"]):
            x = block(x, layer_state)
        if finals is not None:
            finals.append(x)
        return self.head(self.norm(x))  # [B, T, V]

    def _segments(self, start: int, T: int) -> list[tuple[int, int]]:
        """Cut [0, T) wherever start + t is a multiple of a CMS period."""
        cuts = {0, T}
        for C in self.periods:
            cuts.update(range(-start % C, T, C))
        cuts = sorted(c for c in cuts if 0 <= c <= T)
        return list(zip(cuts[:-1], cuts[1:]))

    def _learn_segment(self, ids: torch.Tensor, start: int, state: dict[str, Any], keep_graph: bool,
                       record: bool = True) -> torch.Tensor:
        """Forward one segment and add its next-token losses to each period's chunk loss.

        A chunk that ends with this segment is written lazily, when the next segment (or `detach_state`) needs
        the new weights: the write at the end of a training sequence, whose result nobody reads, costs nothing.
        Every chunk also keeps its start state and token ids, so that a chunk not wholly recorded (`record` False:
        no graph, no chunk loss) can be replayed when it is written; it also keeps the levels written at its inner
        boundaries (other periods' writes), which its replay takes instead of making those writes again.
        """
        self._write_due(state)
        replays = state.setdefault("replay", {})
        written_here = [C for C in self.periods if start % C == 0]  # the periods whose chunks start here
        for C in self.periods:
            if C in written_here:
                replays[C] = {"state": self._snapshot(state, start), "ids": [], "recorded": True, "inner": {}}
            elif written_here and C in replays and not keep_graph:
                # a chunk that may be replayed keeps the levels written at its inner boundaries: its replay takes
                # them instead of writing them again, and could not redo a write whose chunk began before its own
                if not (record and replays[C]["recorded"]) or any(c > start % C for c in written_here):
                    replays[C]["inner"][start] = self._levels_at(state, written_here)
        finals = [] if record and self.config.cms_signal == "residual" else None
        with torch.set_grad_enabled(record):
            logits = self._forward_segment(ids, state, finals)
        for C in self.periods:
            replay = replays.get(C)
            if replay is not None:
                replay["ids"].append(ids)
                replay["recorded"] = replay["recorded"] and record
        if record:
            ce, positions = cms.prediction_losses(logits, ids, start, state.get("pending"))
            for C in self.periods:
                loss = cms.chunk_loss(ce, positions, C)
                state["acc"][C] = loss if state["acc"].get(C) is None else state["acc"][C] + loss
                if finals is not None:
                    state.setdefault("finals", {}).setdefault(C, []).extend(finals)
        state["pending"] = logits[:, -1] if record else logits[:, -1].detach()
        end = start + ids.shape[1]
        state["due"] = [C for C in self.periods if end % C == 0]
        if not keep_graph and record and end % math.lcm(*self.periods) == 0:
            # every chunk loss is spent with the writes now due: the graph is cut right after them (so inference
            # memory stays bounded), and they too wait until the weights are needed, so an evaluation that drops
            # its state never pays for the last writes
            state["cut"] = True
        return logits

    def _write_due(self, state: dict[str, Any]) -> None:
        """Make the writes due at the current position, largest period first: a replayed chunk also writes the
        smaller periods that end with it (`_replay_write`), and the recorded ones share one backward (`_write`)."""
        written, recorded = set(), []
        for C in sorted(state.get("due", []), reverse=True):
            replay = state.get("replay", {}).pop(C, None)
            if C in written:
                continue
            if replay is not None and not replay["recorded"]:
                written.update(self._replay_write(C, replay, state))
            else:
                recorded.append(C)
        for C in written:
            self._end_chunk(C, state)
        if recorded:
            self._write(recorded, state)
        state["due"] = []
        if state.pop("cut", False):
            self._detach_(state)

    def _write(self, periods: list[int], state: dict[str, Any]) -> None:
        """Write the levels of `periods`, whose chunks all end here, from the recorded chunk losses, then start
        their next chunks.

        With the exact signal one backward serves them all, that of the largest period's chunk loss: a smaller
        period's chunk is the tail of the larger one, and the larger chunk's losses before that tail were computed
        before the tail's fast weights made any product, so they add nothing to its gradient (at context 512 with
        periods 64 and 256 this saves the 64-token backward of the write at 256). The residual signal writes each
        period from its own chunk's final residual streams."""
        if self.config.cms_signal == "residual":
            for C in periods:
                finals = state.get("finals", {}).get(C, [])
                cms.write_levels(self._levels_with_period(C, state), state["acc"].get(C), finals)
        else:
            levels = [level for C in periods for level in self._levels_with_period(C, state)]
            cms.write_levels(levels, state["acc"].get(max(periods)))
        for C in periods:
            self._end_chunk(C, state)

    @staticmethod
    def _end_chunk(C: int, state: dict[str, Any]) -> None:
        """Drop the period-C chunk's loss and final residual streams: the next chunk starts empty."""
        state["acc"][C] = None
        state.get("finals", {}).pop(C, None)

    def _snapshot(self, state: dict[str, Any], start: int) -> dict[str, Any]:
        """The stream state at position `start`, a chunk start, cut from the graph (new containers, shared tensors).
        `state["pos"]` still holds the position of the current call's first token."""
        layers = [{"core": _detach_tree(ls["core"]),
                   "cms": [None if st is None else _level_memory(st) for st in ls["cms"]]} for ls in state["layers"]]
        pending = state.get("pending")
        pos = torch.full_like(state["pos"], start)
        return {"pos": pos, "layers": layers, "pending": None if pending is None else pending.detach()}

    def _replay_write(self, C: int, replay: dict[str, Any], state: dict[str, Any]) -> list[int]:
        """Write the period-C levels of `state` by running their chunk again, in one call with a graph, from the
        chunk's start state (smaller periods are written inside the replay as they were in the stream), together
        with the smaller periods whose chunks end here too. Same writes as differentiating the recorded pieces,
        since pieces with state carried equal one call. Returns the periods written."""
        snap = replay["state"]
        local = self.import_state(snap)
        ids = torch.cat(replay["ids"], dim=1)  # [B, C]
        start = first_position(snap["pos"])
        inner = replay.get("inner", {})
        with torch.enable_grad():
            for s, e in self._segments(start, ids.shape[1]):
                if start + s in inner:  # the stream made the smaller periods' writes due here: take its result
                    self._set_levels(local, inner[start + s])
                self._learn_segment(ids[:, s:e], start + s, local, keep_graph=True)
        periods = local["due"]  # C and every smaller period that divides the chunk's end
        self._write(periods, local)
        for layer_state, local_layer, block in zip(state["layers"], local["layers"], self.blocks):
            for i, lvl in enumerate(block.levels):
                if lvl.period in periods:
                    layer_state["cms"][i] = local_layer["cms"][i]
        return periods

    def _levels_at(self, state: dict[str, Any], periods: list[int]) -> dict[str, Any]:
        """The (Δ, optimizer memory) of the levels of `periods`, cut from the graph, keyed (block, level)."""
        return {"periods": periods, "levels": {
            (b, i): _level_memory(layer_state["cms"][i])
            for b, (block, layer_state) in enumerate(zip(self.blocks, state["layers"]))
            for i, lvl in enumerate(block.levels) if lvl.period in periods}}

    def _set_levels(self, state: dict[str, Any], saved: dict[str, Any]) -> None:
        """Put levels saved by `_levels_at` into `state` as the writes due now, which are then no longer due."""
        for (b, i), st in saved["levels"].items():
            state["layers"][b]["cms"][i] = cms.detach_level_state(st, self.blocks[b].cms[i])  # own containers
        for C in saved["periods"]:
            self._end_chunk(C, state)
            state.get("replay", {}).pop(C, None)
        state["due"] = [C for C in state.get("due", []) if C not in saved["periods"]]

    def _levels_with_period(self, C: int, state: dict[str, Any]):
        return [
            (block.cms[i], lvl, layer_state["cms"][i])
            for block, layer_state in zip(self.blocks, state["layers"])
            for i, lvl in enumerate(block.levels)
            if lvl.period == C
        ]

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> dict[str, Any]:
        """Empty streams: position 0, empty core memories, CMS fast weights equal to their meta-learned θ_0."""
        device = device or self.embed.weight.device
        layers = []
        for block in self.blocks:
            fast = [
                cms.init_level_state(mlp, lvl, batch_size) if lvl.period is not None else None
                for mlp, lvl in zip(block.cms, block.levels)
            ]
            layers.append({"core": None, "cms": fast})
        return {
            "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
            "layers": layers,
            "acc": {},
            "finals": {},
            "pending": None,
            "due": [],
            "replay": {},
        }

    def _detach_(self, state: dict[str, Any]) -> None:
        for block, layer_state in zip(self.blocks, state["layers"]):
            layer_state["core"] = _detach_tree(layer_state["core"])
            layer_state["cms"] = [
                None if st is None else cms.detach_level_state(st, mlp)
                for st, mlp in zip(layer_state["cms"], block.cms)
            ]
        if state.get("pending") is not None:
            state["pending"] = state["pending"].detach()

    def detach_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of `state` cut from the autograd graph (to carry streams across optimizer steps).

        Chunk losses not yet written (the stream stopped inside a CMS chunk) are dropped, with a warning: export
        at a multiple of every CMS period for a continuation identical to one uninterrupted stream.
        """
        with torch.enable_grad():
            self._write_due(state)  # finished chunks are written (what the next call would do first)
        partial = any(v is not None for v in state.get("acc", {}).values())
        if partial or any(r["ids"] for r in state.get("replay", {}).values()):
            warnings.warn(
                f"state detached at position {int(state['pos'][0])}, inside a CMS chunk of periods {self.periods}: "
                "the partial chunk's inner loss is dropped",
                stacklevel=2,
            )
        out = {"pos": state["pos"].clone(), "layers": [dict(ls) for ls in state["layers"]], "acc": {},
               "finals": {}, "pending": state.get("pending"), "due": [], "replay": {}}
        self._detach_(out)
        return out

    def export_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the model learned from a context, as plain tensors (fast weights Δ, memories, caches)."""
        out = self.detach_state(state)
        for layer_state in out["layers"]:
            layer_state["cms"] = [None if st is None else {k: st[k] for k in ("delta", "opt")} for st in
                                  layer_state["cms"]]
        return _detach_tree(out)

    def import_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Inverse of `export_state`: a state to pass as `model(ids, state=...)`."""
        if len(saved.get("layers", [])) != len(self.blocks):
            raise ValueError(f"saved state has {len(saved.get('layers', []))} layers, model has {len(self.blocks)}")
        state = {"pos": saved["pos"], "acc": {}, "finals": {}, "pending": saved.get("pending"), "due": [],
                 "replay": {}, "layers": []}
        for block, ls in zip(self.blocks, saved["layers"]):
            fast = [None if st is None else {**st, "fast": cms.materialize(mlp, st["delta"])}
                    for st, mlp in zip(ls["cms"], block.cms)]
            state["layers"].append({"core": ls["core"], "cms": fast})
        return state

    def compile_cores(self, **compile_kwargs: Any) -> HopeLM:
        """Compile every block's self-modifying core in place with `torch.compile(**compile_kwargs)`; returns
        `self`. Other cores stay eager (see `compile_model`).

        Parameters, state-dict keys and results are unchanged (to fp32 round-off); the segment loop and the CMS
        writes stay eager, so this works for every write signal and call pattern. An exact CMS write
        differentiates its chunk with `retain_graph=True` before the outer backward reuses the graph, which
        AOTAutograd's donated buffers refuse, so this turns them off process-wide
        (`torch._functorch.config.donated_buffer = False`: a compiled backward keeps its saved tensors instead of
        reusing their memory). On the 2-core CPU the self-modifying core's forward + backward at B=8, T=512 is
        about 2× faster compiled; the first call of each new input shape pays the compilation (about a minute
        for `preset("hope", "small")` at context 512).
        """
        if self.config.core == "self_modifying":
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
            for block in self.blocks:
                block.core.compile(**compile_kwargs)
        return self

    @torch.compiler.disable  # reads values (min, max): eager even inside a compiled model
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"input_ids out of range [0, {self.config.vocab_size}): min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}"
            )

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` after `prompt` `[B, T]`, one token per call with the state carried
        (constant memory per token for recurrent cores). `temperature=0` is greedy. Returns `[B, T + N]`."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        out = self(prompt, state)
        tokens = [prompt]
        logits, state = out.logits[:, -1], out.state
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)  # [B, 1]
            tokens.append(nxt)
            out = self(nxt, state)
            logits, state = out.logits[:, -1], out.state
        return torch.cat(tokens, dim=1)


def compile_model(model: HopeLM, **compile_kwargs: Any) -> HopeLM:
    """Compile `model` in place the way that is fastest and still matches it (state-dict keys unchanged);
    returns it. What `compile: true` of the trainer and `throughput --compile` do.

    - an attention model without in-context CMS writes (Transformer++): the whole model (`nn.Module.compile`);
    - otherwise the self-modifying cores only (`HopeLM.compile_cores`): the segment loop and the writes stay
      eager. Attention cores there stay eager too (SDPA is one fused kernel already, and compiled on its own in
      torch 2.13 the attention core fails: AOTAutograd rebuilds its value cache, an alias of the qkv projection,
      with a corrupt shape), and so do Titans cores (in torch 2.13 Inductor fails on some of their graphs and
      disagrees with eager on others by ~1e-3).
    """
    if model.config.core == "attention" and not model.periods:
        model.compile(**compile_kwargs)
    else:
        model.compile_cores(**compile_kwargs)
    return model


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from `logits` `[B, V]` (greedy when temperature is 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def _level_memory(st: dict[str, Any]) -> dict[str, Any]:
    """A fast level's Δ and optimizer memory, cut from the graph, in new containers (what a snapshot keeps)."""
    return {k: _detach_tree(st[k]) for k in ("delta", "opt")}


def _detach_tree(tree: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)
