"""Typed model configuration: `HopeConfig`, `CMSLevel` and the named presets.

Model code sees these dataclasses only, never Hydra; `train.py` turns a config node into them. Every field is
validated in `__post_init__`, and errors print the offending value.

One size dial (`depth`): width = 64·depth, heads = depth (head width 64), as in the presets below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hope._checks import check as _check

CORES = ("attention", "self_modifying", "titans")
CMS_SIGNALS = ("backprop", "residual")


@dataclass
class CMSLevel:
    """One level of the Continuum Memory System (docs/design.md §5): a SwiGLU MLP whose weights change in context.

    Attributes:
        period: tokens between two in-context writes of this level's weights (C_ℓ). `None` never writes in
            context: the level is a plain FFN whose weights only the outer optimizer changes.
        hidden: SwiGLU hidden width; `None` takes `HopeConfig.ffn_hidden`.
        lr: inner learning rate η_ℓ applied to the level's optimizer direction at each write.
        optimizer: Opt_ℓ, a rule name of `hope.optim.memory_rule` ("momentum", "sgd", "adam", "muon", …).
        optimizer_kwargs: extra hyper-parameters for that rule (e.g. `{"beta": 0.9}`).
        decay: retention of the level's writes: each write first shrinks Δ by (1 − decay), so the fast weights
            θ_0 − Δ relax toward θ_0 and ‖Δ‖ ≤ lr·max‖d‖/decay over any stream (d: the optimizer's direction).
            0 keeps every write forever (the paper's eq. 71).
    """

    period: int | None = None
    hidden: int | None = None
    lr: float = 1e-3
    optimizer: str = "momentum"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    decay: float = 0.0

    def __post_init__(self) -> None:
        if self.period is not None:
            _check(
                isinstance(self.period, int) and self.period >= 2,
                f"CMSLevel.period must be an int >= 2 or None (a write sums the period-1 predictions inside a "
                f"chunk, so period 1 would never learn), got {self.period!r}",
            )
        if self.hidden is not None:
            ok = isinstance(self.hidden, int) and self.hidden > 0
            _check(ok, f"CMSLevel.hidden must be > 0, got {self.hidden!r}")
        _check(self.lr >= 0, f"CMSLevel.lr must be >= 0, got {self.lr!r}")
        ok = isinstance(self.decay, (int, float)) and not isinstance(self.decay, bool) and 0 <= self.decay < 1
        _check(ok, f"CMSLevel.decay must be a number in [0, 1), got {self.decay!r}")
        self.optimizer_kwargs = dict(self.optimizer_kwargs or {})


@dataclass
class HopeConfig:
    """Configuration of `hope.HopeLM` (docs/design.md §2).

    Attributes:
        vocab_size: number of token ids (256 for the byte tokenizer).
        d_model: residual-stream width D.
        n_layers: number of blocks.
        n_heads: heads of the sequence core; `head_dim = d_model // n_heads`.
        core: sequence mixer: "attention" (Transformer++ / Hope-Attention), "self_modifying" (HOPE),
            "titans" (Titans LMM baseline).
        cms: the CMS levels after the core in every block, fastest first. `[CMSLevel()]` (one level, period
            None) is a plain SwiGLU FFN, which makes the Transformer++ baseline the same block.
        ffn_hidden: default SwiGLU hidden width; `None` = 8/3·d_model rounded up to a multiple of 64.
        rope_theta: RoPE base of the attention core.
        max_seq_len: longest context the model accepts in one stream (None = unbounded; recurrent cores).
        kv_cache: attention core only: the number of most recent tokens whose keys and values are kept in the
            state between calls (Transformer-XL's memory of the previous segment when it equals the window
            length); None keeps every token. Ignored by the "self_modifying" and "titans" cores, whose state
            is already of fixed size.
        norm_eps: RMSNorm epsilon.
        init_std: standard deviation of the normal init of embeddings and projections.
        tie_embeddings: share the input embedding and the LM head.
        persist: stream training: the trainer carries each batch row's whole state (core memories, KV cache, CMS
            fast weights) from one batch to the next, cut from the graph between them (truncated backpropagation
            through time). Meant for `data.stream=true`, where each batch row is one continuing stream.
        carry_core: with the state cut between windows (`HopeLM.detach_state`, stream training), keep the sequence
            core's state (memories, KV cache); False resets it at every cut, so that only the CMS levels carry
            the stream.
        cms_signal: the error signal of an in-context CMS write (docs/design.md §5). "backprop" (default): the exact
            gradient of the chunk's next-token losses w.r.t. the level's weights, a backward through every layer
            above the level. "residual": the gradient w.r.t. the final residual stream δ = ∂ℓ/∂h_L (one backward
            through the final norm and head) stands in for ∂ℓ/∂(level output), as if the layers above passed the
            level's output on unchanged along the residual path; exact for the last level of the last block,
            an approximation below it, and much cheaper (no backward through the cores above).
        cms_learn_lr: learn each fast level's inner learning rate: the level's fast weights become θ_0 − s_ℓ·Δ with
            s_ℓ = exp(ρ_ℓ), ρ_ℓ a scalar parameter initialised to 0, so the effective rate is s_ℓ·η_ℓ. The outer
            optimizer trains ρ_ℓ from the first-order gradient ∂L/∂ρ_ℓ = −s_ℓ·⟨∂L/∂W, Δ⟩ (the writes Δ held
            constant, as the first-order CMS holds them for θ_0; docs/design.md §5). False keeps η_ℓ fixed.
        cms_second_order: in training mode, the outer gradient also flows through the CMS writes (each write's
            gradient is taken with `create_graph=True`, and the fast weights θ_0 − Δ keep Δ in the graph): the exact
            gradient of the sequence's loss w.r.t. θ_0 and every parameter above, at the cost of a backward
            through each write's backward. False (default): first-order, the writes are constants of the outer
            gradient. Needs cms_signal="backprop" and persist=False; evaluation (`model.eval()`) is first-order
            either way, with the same values.
        memory: `hope.memory.config.MemoryConfig` (or a dict of its fields) for the "self_modifying" and
            "titans" cores; ignored by "attention".
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    core: str = "self_modifying"
    cms: list[CMSLevel] = field(default_factory=lambda: [CMSLevel()])
    ffn_hidden: int | None = None
    rope_theta: float = 10000.0
    max_seq_len: int | None = None
    kv_cache: int | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    persist: bool = False
    carry_core: bool = True
    cms_signal: str = "backprop"
    cms_learn_lr: bool = False
    cms_second_order: bool = False
    memory: Any = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"HopeConfig.{name} must be a positive int, got {value!r}")
        _check(
            self.d_model % self.n_heads == 0,
            f"HopeConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}",
        )
        _check(self.core in CORES, f"HopeConfig.core must be one of {CORES}, got {self.core!r}")
        _check(self.cms_signal in CMS_SIGNALS,
               f"HopeConfig.cms_signal must be one of {CMS_SIGNALS}, got {self.cms_signal!r}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * -(-(8 * self.d_model) // (3 * 64))
        _check(self.ffn_hidden > 0, f"HopeConfig.ffn_hidden must be > 0, got {self.ffn_hidden!r}")
        _check(len(self.cms) > 0, "HopeConfig.cms needs at least one level (use [CMSLevel()] for a plain FFN)")
        self.cms = [lvl if isinstance(lvl, CMSLevel) else CMSLevel(**dict(lvl)) for lvl in self.cms]
        for flag in ("cms_learn_lr", "cms_second_order"):  # switches of the in-context writes
            value = getattr(self, flag)
            _check(isinstance(value, bool), f"HopeConfig.{flag} must be a bool, got {value!r}")
            _check(not value or bool(self.fast_periods),
                   f"HopeConfig.{flag}=True needs a CMS level with a finite period (one that writes in context), "
                   f"got periods {[lvl.period for lvl in self.cms]}")
        if self.cms_second_order:
            _check(self.cms_signal == "backprop", "HopeConfig.cms_second_order=True needs cms_signal='backprop', "
                   f"got {self.cms_signal!r}")
            _check(not self.persist, "HopeConfig.cms_second_order=True is for training with the state reset per "
                   "sequence (persist=False); stream training cuts the writes from the graph at every window")
        if self.max_seq_len is not None:
            _check(self.max_seq_len > 0, f"HopeConfig.max_seq_len must be > 0 or None, got {self.max_seq_len!r}")
        if self.kv_cache is not None:
            _check(isinstance(self.kv_cache, int) and not isinstance(self.kv_cache, bool) and self.kv_cache >= 1,
                   f"HopeConfig.kv_cache must be an int >= 1 or None, got {self.kv_cache!r}")
        _check(self.norm_eps > 0, f"HopeConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        _check(self.init_std > 0, f"HopeConfig.init_std must be > 0, got {self.init_std!r}")
        if self.core != "attention" or self.memory is not None:
            from hope.memory.config import MemoryConfig

            if self.memory is None:
                self.memory = MemoryConfig()
            elif not isinstance(self.memory, MemoryConfig):
                self.memory = MemoryConfig(**dict(self.memory))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def fast_periods(self) -> list[int]:
        """The distinct finite CMS periods, ascending."""
        return sorted({lvl.period for lvl in self.cms if lvl.period is not None})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["cms"] = [asdict(lvl) for lvl in self.cms]
        if self.memory is not None and not isinstance(self.memory, dict):
            out["memory"] = asdict(self.memory)
        return out


SIZES = {"tiny": 2, "small": 4, "base": 12}

# The MemoryConfig fields that turn the "hope" core into the paper's literal one (preset "hope_paper"; each is a
# switch of its own, docs/design.md §4.1).
HOPE_PAPER_MEMORY: dict[str, Any] = {
    "proj_width": "full", "proj_depth": "deep", "gate_depth": "deep", "mem_depth": "deep", "adaptive_q": True,
    "momentum": True, "self_target_mem": True, "negative_eigenvalues": True,
}

# Per-preset shape of the block. Hidden widths are chosen so that every small preset stays within 5% of the
# Transformer++ parameter count (tests/test_model.py checks it).
_PRESETS: dict[str, dict[str, Any]] = {
    "transformer": {"core": "attention", "cms": [{"period": None}]},
    "hope_attention": {
        "core": "attention",
        "cms": [{"period": 64, "hidden_frac": 1 / 3}, {"period": 256, "hidden_frac": 1 / 3},
                {"period": None, "hidden_frac": 1 / 3}],
    },
    # Titans: a narrower FFN, because the LMM core has more parameters than attention
    "titans": {"core": "titans", "cms": [{"period": None, "hidden_frac": 0.807}]},
    "hope": {
        "core": "self_modifying",
        "cms": [{"period": 64, "hidden_frac": 1 / 3}, {"period": 256, "hidden_frac": 1 / 3},
                {"period": None, "hidden_frac": 1 / 3}],
    },
    # HOPE as arXiv:2512.24695 §§7–8 writes it (docs/design.md §4.1): full-width memories over x̃_t, all six
    # 2-layer MLPs, momentum, self-generated targets for every memory (M_mem included), η bounds that reach
    # eigenvalue −1. One departure stays: targets read v/‖v‖ (with the raw v the memories overflow within 1K tokens).
    # The deep memories cost parameters, so the CMS levels are narrower (0.31 of the FFN width each instead of 1/3:
    # −0.8% against Transformer++ at the small size).
    "hope_paper": {
        "core": "self_modifying",
        "cms": [{"period": 64, "hidden_frac": 0.31}, {"period": 256, "hidden_frac": 0.31},
                {"period": None, "hidden_frac": 0.31}],
        "memory": HOPE_PAPER_MEMORY,
    },
    # Stream training (experiment=hope_stream_small, experiments/continual/README.md "Long streams"): each batch
    # row is one continuing stream and the whole state is carried between windows. The CMS spans the stream:
    # periods of 64, 512 and 4,096 tokens, each write first shrinking Δ by 1/16 (memories of about 1K, 8K and 64K
    # tokens, bounded); the core's memories are carried too and retain toward their initial state (docs/design.md
    # §3: retaining toward zero they collapse or blow up over a long stream). Same parameters as "hope".
    "hope_stream": {
        "core": "self_modifying",
        "cms": [{"period": 64, "hidden_frac": 1 / 3, "decay": 1 / 16},
                {"period": 512, "hidden_frac": 1 / 3, "decay": 1 / 16},
                {"period": 4096, "hidden_frac": 1 / 3, "decay": 1 / 16}],
        "memory": {"retain_toward": "init"},
        "config": {"persist": True, "carry_core": True},
    },
    # Transformer++ on the same streams with a Transformer-XL memory: the keys and values of the previous
    # 512-token window stay in the state (set `kv_cache` to the window length). Same parameters as "transformer".
    "transformer_stream": {
        "core": "attention",
        "cms": [{"period": None}],
        "config": {"persist": True, "kv_cache": 512},
    },
}


def preset(name: str, size: str | int = "small", **overrides: Any) -> HopeConfig:
    """A named architecture at a named size: `preset("hope", "small", vocab_size=256)`.

    Names: "transformer" (Transformer++), "hope_attention" (attention core + CMS), "titans" (Titans LMM core +
    FFN), "hope" (self-modifying core + CMS), "hope_paper" (the paper's literal HOPE, docs/design.md §4.1);
    "hope_stream" and "transformer_stream" are "hope" and "transformer" configured for stream training (the state
    carried from window to window: `experiment=hope_stream_small`, `transformer_stream_small`).
    Size: "tiny" | "small" | "base" or a depth; width = 64·depth, heads = depth. `overrides` replace any
    `HopeConfig` field; a `memory` override given as a dict changes only the `MemoryConfig` fields it names.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)} or an int depth")
        depth = SIZES[size]
    else:
        depth = int(size)
    d_model = 64 * depth
    base = HopeConfig(core="attention", d_model=d_model, n_heads=depth, n_layers=depth)
    spec = _PRESETS[name]
    cms = []
    for lvl in spec["cms"]:
        frac = lvl.get("hidden_frac")
        hidden = None if frac is None else 8 * max(1, round(base.ffn_hidden * frac / 8))
        cms.append(CMSLevel(period=lvl["period"], hidden=hidden, decay=lvl.get("decay", 0.0)))
    kwargs: dict[str, Any] = {"d_model": d_model, "n_heads": depth, "n_layers": depth, "core": spec["core"], "cms": cms,
                              **spec.get("config", {})}
    memory = overrides.pop("memory", None)
    if memory is None or isinstance(memory, Mapping):  # a dict of MemoryConfig fields refines the preset's
        memory = {**spec.get("memory", {}), **(memory or {})} or None
    kwargs["memory"] = memory
    kwargs.update(overrides)
    return HopeConfig(**kwargs)
