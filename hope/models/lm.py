"""`HopeLM`: the language model shared by HOPE and its baselines (docs/design.md §2, §8).

Legend: B batch, T time, D model width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hope.cms import CMSSchedule
from hope.cms.level import detach_tree
from hope.cms.schedule import WindowEnd
from hope.config import HopeConfig
from hope.layers.attention import CausalSelfAttention, first_position
from hope.layers.mlp import SwiGLU, residual_std
from hope.layers.norm import RMSNorm
from hope.layers.self_modifying import SelfModifyingCore
from hope.layers.titans import TitansCore
from hope.state import STATE_VERSION, LayerState, LevelState, StreamState

CORES: dict[str, type[nn.Module]] = {
    "attention": CausalSelfAttention,
    "self_modifying": SelfModifyingCore,
    "titans": TitansCore,
}


@dataclass
class LMOutput:
    """`logits` `[B, T, V]` and the `state` to pass to the next call to continue the same streams."""

    logits: torch.Tensor
    state: StreamState


class HopeBlock(nn.Module):
    """One block: a sequence core, then the CMS chain, each behind a pre-norm residual.

    ```
    x ──► RMSNorm ─► Core ──(+)──► h ──► RMSNorm ─► MLP_1 ──(+)──► … ──► RMSNorm ─► MLP_L ──(+)──► out
      └──────────────────────┘ ▲   └──────────────────────┘ ▲                └──────────────┘ ▲
            state.core ◄───────┘          state.cms[0].fast        (FastWeights θ_0 − Δ, per sample; a level
          (KV cache / fast memories)                                 with period None uses its parameters)
    ```
    """

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.core_norm = RMSNorm(config.d_model, config.norm_eps)
        self.core = CORES[config.core](config)
        self.levels = list(config.cms)
        out_std = residual_std(config.init_std, config.n_layers)
        self.cms_norms = nn.ModuleList(RMSNorm(config.d_model, config.norm_eps) for _ in self.levels)
        self.cms = nn.ModuleList(
            SwiGLU(config.d_model, lvl.hidden or config.ffn_hidden, config.init_std, out_std,
                   learn_write_scale=config.cms_learn_lr and lvl.period is not None,
                   second_order_writes=config.cms_second_order and lvl.period is not None)
            for lvl in self.levels
        )

    def forward(self, x: torch.Tensor, state: LayerState) -> torch.Tensor:
        y, state.core = self.core(self.core_norm(x), state.core)
        h = x + y  # [B, T, D]
        for norm, mlp, level in zip(self.cms_norms, self.cms, state.cms):
            h = h + mlp(norm(h), None if level is None else level.fast)
        return h


class HopeLM(nn.Module):
    """Language model: `model(input_ids, state=None) -> LMOutput(logits, state)`.

    Passing a stream in pieces with the state carried gives what one call gives; the state (`StreamState`) holds,
    per sample, each core's memory (KV cache or fast memories) and the CMS fast weights, and can be saved with
    `export_state` and restored with `import_state`. With CMS levels of finite period, `CMSSchedule` runs the
    stream segment by segment and makes the in-context writes (`hope.cms.schedule`).
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
        self.cms_schedule = CMSSchedule([list(zip(b.cms, b.levels)) for b in self.blocks], config.cms_signal,
                                        config.carry_core)

    @property
    def periods(self) -> list[int]:
        """The distinct finite CMS periods, ascending (empty: no in-context writes)."""
        return self.cms_schedule.periods

    def init_weights(self) -> None:
        """embed, head: N(0, init_std²); each module's own `init_weights` for the rest (RMSNorm gains: ones)."""
        nn.init.normal_(self.embed.weight, std=self.config.init_std)
        nn.init.normal_(self.head.weight, std=self.config.init_std)

    def forward(self, input_ids: torch.Tensor, state: StreamState | None = None) -> LMOutput:
        self._check_ids(input_ids)
        B, T = input_ids.shape
        state = self.init_state(B, input_ids.device) if state is None else state
        start = first_position(state.pos)
        if self.config.max_seq_len is not None and start + T > self.config.max_seq_len:
            raise ValueError(f"stream length {start + T} (position {start} + {T} new tokens) exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        if self.periods:
            logits = self.cms_schedule.run(self._step, input_ids, state, start)
        else:
            logits = self._step(input_ids, state)
        for block, layer in zip(self.blocks, state.layers):
            layer.core = block.core.bound(layer.core)  # e.g. the attention core's bounded KV cache (kv_cache)
        state.pos = state.pos + T
        return LMOutput(logits, state)

    def _step(self, ids: torch.Tensor, state: StreamState, finals: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits `[B, T, V]` of one piece; the final residual stream h_L `[B, T, D]` is appended to `finals`."""
        x = self.embed(ids)  # [B, T, D]
        for block, layer_state in zip(self.blocks, state.layers):
            x = block(x, layer_state)
        if finals is not None:
            finals.append(x)
        return self.head(self.norm(x))  # [B, T, V]

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> StreamState:
        """Empty streams: position 0, empty core memories, CMS fast weights equal to their meta-learned θ_0."""
        pos = torch.zeros(batch_size, dtype=torch.long, device=device or self.embed.weight.device)
        return StreamState(pos, [LayerState(None, cms) for cms in self.cms_schedule.init_levels(batch_size)])

    def detach_state(self, state: StreamState) -> StreamState:
        """A copy of `state` cut from the autograd graph (to carry streams across optimizer steps).

        A CMS chunk still in progress carries the gradient of its loss so far (`LevelState.grad`; truncated
        backpropagation through time, `hope.cms.schedule`): cut at a multiple of every CMS period for a
        continuation identical to one uninterrupted stream.
        """
        return self.cms_schedule.detach(self._step, state)

    def detach_after_backward(self, state: StreamState) -> WindowEnd:
        """`detach_state` for stream training, finished after the outer backward (`.finish(n_losses)`), which then
        also gives the gradients of the CMS writes due at the window's end (`CMSSchedule.defer_detach`)."""
        return self.cms_schedule.defer_detach(self._step, state)

    def export_state(self, state: StreamState) -> dict[str, Any]:
        """What the model learned from a context, as plain tensors in nested dicts (`torch.save`-able): the
        position, each core's state (`to_flat`), each fast level's Δ and optimizer memory."""
        out = self.detach_state(state)
        layers = [{"core": None if ls.core is None else ls.core.to_flat(),
                   "cms": [None if st is None else _saved_level(st) for st in ls.cms]}
                  for ls in out.layers]
        return detach_tree({"version": STATE_VERSION, "pos": out.pos, "pending": out.pending, "layers": layers})

    def import_state(self, saved: dict[str, Any]) -> StreamState:
        """Inverse of `export_state`: a state to pass as `model(ids, state=...)`."""
        version = saved.get("version", 1)
        if version != STATE_VERSION:
            raise ValueError(f"saved state has format version {version!r}; this hope reads version {STATE_VERSION}")
        if len(saved.get("layers", [])) != len(self.blocks):
            raise ValueError(f"saved state has {len(saved.get('layers', []))} layers, model has {len(self.blocks)}")
        saved_levels = [[None if st is None else LevelState(st["delta"], st["opt"], grad=st.get("grad"))
                         for st in ls["cms"]]
                        for ls in saved["layers"]]
        levels = self.cms_schedule.restore_levels(saved_levels)
        layers = [LayerState(None if ls["core"] is None else block.core.State.from_flat(ls["core"]), cms)
                  for block, ls, cms in zip(self.blocks, saved["layers"], levels)]
        return StreamState(saved["pos"], layers, saved.get("pending"))

    def compile_cores(self, **compile_kwargs: Any) -> HopeLM:
        """Compile every block's self-modifying core in place with `torch.compile(**compile_kwargs)`; returns
        `self`. Other cores stay eager (see `compile_model`).

        Parameters, state-dict keys and results are unchanged (to fp32 round-off); the segment loop and the CMS
        writes stay eager. An exact CMS write differentiates its chunk with `retain_graph=True` before the outer
        backward reuses the graph, which AOTAutograd's donated buffers refuse, so this turns them off process-wide
        (`torch._functorch.config.donated_buffer = False`). On the 2-core CPU the self-modifying core's forward +
        backward at B=8, T=512 is about 2× faster compiled; the first call of each new input shape pays the
        compilation (about a minute for `preset("hope", "small")` at context 512).
        """
        if self.config.cms_second_order:
            raise ValueError("compile: HopeConfig.cms_second_order=True differentiates the cores' backward again "
                             "(create_graph), which compiled graphs do not support; train it eager (compile: false)")
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
        if 0 in input_ids.shape:
            raise ValueError(f"input_ids must hold at least one token per row, [B ≥ 1, T ≥ 1], got shape "
                             f"{list(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids out of range [0, {self.config.vocab_size}): min {int(input_ids.min())}, "
                             f"max {int(input_ids.max())}")

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, state: StreamState | None = None) -> torch.Tensor:
        """Sample `max_new_tokens` after `prompt` `[B, T]`, one token per call with the state carried
        (constant memory per token for recurrent cores). `temperature=0` is greedy. Returns `[B, T + N]`."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None (no top-k filter), got {top_k!r}")
        out = self(prompt, state)
        tokens = [prompt]
        for _ in range(max_new_tokens):
            tokens.append(sample_next(out.logits[:, -1], temperature, top_k, generator))  # [B, 1]
            out = self(tokens[-1], out.state)
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


def _saved_level(st: LevelState) -> dict[str, Any]:
    """A fast level as saved: Δ, optimizer memory and, inside a chunk cut by a window, the carried gradient."""
    out = {"delta": st.delta, "opt": st.opt}
    return out if st.grad is None else {**out, "grad": st.grad}
