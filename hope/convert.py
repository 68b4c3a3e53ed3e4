"""Hope-Attention from a pretrained Transformer++: each MLP becomes the initial weights of a CMS level.

    python -m hope.convert logs/transformer_small/checkpoints/last.ckpt hope_attention.ckpt --periods 64
    python -m hope.convert path/to/llama hope_attention.ckpt --periods 512   # a transformers LlamaForCausalLM folder

The paper's ad-hoc level stacking (arXiv:2512.24695 §7.3, docs/design.md §11): the levels of a CMS start from a
pretrained model's MLPs, θ_0^{(ℓ)} = θ_MLP, and from then on are written in context with eq. 71. Here the i-th
MLP of every block becomes a CMS level of period `periods[i]`, and `extra` levels may be appended after them.
Before the first write (and at any time with η = 0) the converted model computes the source's function:
the in-context writes are the only difference. Appended levels start with zero output (`extra_init="zero"`,
W_down = 0, W_gate and W_up copied) so that this still holds; `"copy"` copies the whole MLP into every appended
level, as the paper's stacking reads, which changes the function (each copy adds its output to the residual).

Sources: a `train.py` checkpoint of a Transformer++ (`core: attention`, every CMS level of period None), or a
Hugging Face `LlamaForCausalLM` (a folder with `config.json` and safetensors/bin weights, or a state dict and
its `LlamaConfig`: `from_llama`). The Llama mapping is exact: RoPE on the halves of each head (the same
convention as `hope.layers.attention`), RMSNorm with a gain, SwiGLU (W_gate = gate_projᵀ, W_up = up_projᵀ,
W_down = down_projᵀ), tied or untied head. Grouped-query attention is expanded to one key/value head per query
head (each key/value projection row block repeated `n_heads / n_kv_heads` times, what `repeat_kv` does at run
time), which keeps the function and enlarges W_k, W_v. Refused, with the reason: biases, activations other than
SiLU, RoPE scaling (`rope_type` other than "default"), a head width other than hidden/heads.

Legend: D model width, F hidden width, H heads, G key/value heads, K head width, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hope.config import CMSLevel, HopeConfig
from hope.models.lm import HopeLM

EXTRA_INITS = ("zero", "copy")
FORMAT = "hope.convert/1"


def describe(config: HopeConfig) -> str:
    """The architecture a config builds, in words (for errors): Transformer++, Hope-Attention, Titans or HOPE."""
    names = {("attention", False): "Transformer++", ("attention", True): "Hope-Attention",
             ("titans", False): "Titans", ("titans", True): "Titans with CMS levels",
             ("self_modifying", False): "HOPE core with plain FFNs", ("self_modifying", True): "HOPE"}
    return names[(config.core, bool(config.fast_periods))]


def to_hope_attention(
    source: HopeLM,
    periods: Sequence[int] = (64,),
    extra: Sequence[int | None] = (),
    extra_init: str = "zero",
    lr: float = 1e-3,
    optimizer: str = "momentum",
    decay: float = 0.0,
) -> HopeLM:
    """Hope-Attention whose i-th CMS level per block starts from the source's i-th MLP (period `periods[i]`),
    followed by levels of period `extra` (`extra_init`: "zero" output or a "copy" of the last MLP).

    All other weights (embedding, attention, norms, head) are copied; the result has the source's dtype and
    device, and its levels write with `lr`, `optimizer` and `decay` (`hope.CMSLevel`). Raises `ValueError` for
    a source that is not a Transformer++ (another core, or CMS levels that already write in context), a
    number of periods other than the source's MLPs per block, or a bad `extra_init`.
    """
    cfg = source.config
    if cfg.core != "attention" or cfg.fast_periods:
        raise ValueError(f"hope.convert turns a Transformer++ (core 'attention', every CMS level of period None) "
                         f"into Hope-Attention; this model is {describe(cfg)} (core {cfg.core!r}, CMS periods "
                         f"{cfg.fast_periods})")
    periods = list(periods)
    if len(periods) != len(cfg.cms):
        raise ValueError(f"periods {periods} give {len(periods)} levels for the source's {len(cfg.cms)} MLP(s) per "
                         f"block: give one period per MLP (further levels go in `extra`)")
    if any(p is None for p in periods):
        raise ValueError(f"periods {periods}: every converted MLP needs a finite period (an int >= 2), or it stays "
                         "a plain MLP")
    if extra_init not in EXTRA_INITS:
        raise ValueError(f"extra_init must be one of {EXTRA_INITS}, got {extra_init!r}")
    hidden = [lvl.hidden or cfg.ffn_hidden for lvl in cfg.cms]
    levels = [CMSLevel(period=p, hidden=h, lr=lr, optimizer=optimizer, decay=decay) for p, h in zip(periods, hidden)]
    levels += [CMSLevel(period=p, hidden=hidden[-1], lr=lr, optimizer=optimizer, decay=decay) for p in extra]
    target = HopeLM(HopeConfig(**{**cfg.to_dict(), "cms": levels}))
    ref = source.embed.weight
    target.to(device=ref.device, dtype=ref.dtype)
    state = dict(source.state_dict())
    n_src = len(cfg.cms)
    for b in range(cfg.n_layers):
        for k in range(n_src, len(levels)):  # appended levels: from the block's last MLP
            last = f"blocks.{b}.cms.{n_src - 1}"
            state[f"blocks.{b}.cms_norms.{k}.weight"] = state[f"blocks.{b}.cms_norms.{n_src - 1}.weight"]
            for w in ("w_gate", "w_up", "w_down"):
                state[f"blocks.{b}.cms.{k}.{w}"] = state[f"{last}.{w}"]
            if extra_init == "zero":
                state[f"blocks.{b}.cms.{k}.w_down"] = torch.zeros_like(state[f"{last}.w_down"])
    target.load_state_dict(state)
    return target.train(source.training)


def llama_config(hf_config: Any) -> HopeConfig:
    """The Transformer++ `HopeConfig` of a `transformers` `LlamaConfig`, or `ValueError` saying which of its
    settings has no exact counterpart here."""
    get = _getter(hf_config)
    model_type = get("model_type")
    if model_type != "llama":
        raise ValueError(f"hope.convert reads Llama checkpoints (model_type 'llama'), got model_type {model_type!r}")
    d, heads = get("hidden_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    rope = get("rope_parameters") or {"rope_type": (get("rope_scaling") or {}).get("rope_type", "default"),
                                      "rope_theta": get("rope_theta", 10000.0)}
    problems = {
        "hidden_act": (get("hidden_act"), "silu"),
        "attention_bias": (bool(get("attention_bias", False)), False),
        "mlp_bias": (bool(get("mlp_bias", False)), False),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "head_dim": (get("head_dim") or d // heads, d // heads),
        "num_attention_heads % num_key_value_heads": (heads % kv_heads, 0),
    }
    bad = {k: v for k, (v, want) in problems.items() if v != want}
    if bad:
        raise ValueError(f"this Llama config has no exact Transformer++ counterpart: {bad} (supported: SiLU, no "
                         "biases, default RoPE, head_dim = hidden_size / num_attention_heads, heads a multiple of "
                         "key/value heads)")
    return HopeConfig(vocab_size=get("vocab_size"), d_model=d, n_layers=get("num_hidden_layers"), n_heads=heads,
                      core="attention", cms=[CMSLevel(hidden=get("intermediate_size"))],
                      rope_theta=float(rope["rope_theta"]), norm_eps=get("rms_norm_eps"),
                      tie_embeddings=bool(get("tie_word_embeddings", False)))


def _getter(hf_config: Any):
    """`get(key, default)` on a config object or a dict (config.json as read)."""
    return hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)


def from_llama(state_dict: Mapping[str, torch.Tensor], hf_config: Any) -> HopeLM:
    """A Transformer++ `HopeLM` computing what `LlamaForCausalLM(hf_config)` with `state_dict` computes, in the
    state dict's dtype. Raises `ValueError` naming a missing tensor or a shape that does not fit the config."""
    cfg = llama_config(hf_config)
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    H, K = cfg.n_heads, cfg.head_dim
    rep = H // (_getter(hf_config)("num_key_value_heads") or H)  # query heads per key/value head

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"Llama state dict has no {name!r} (keys start {sorted(sd)[:4]})")
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"Llama tensor {name!r} has shape {tuple(sd[name].shape)}, the config implies {shape}")
        return sd[name]

    D, F, V = cfg.d_model, cfg.ffn_hidden if cfg.cms[0].hidden is None else cfg.cms[0].hidden, cfg.vocab_size
    out = {"embed.weight": take("embed_tokens.weight", (V, D)), "norm.weight": take("norm.weight", (D,))}
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blocks.{i}."
        q = take(p + "self_attn.q_proj.weight", (H * K, D))
        k, v = (take(p + f"self_attn.{n}_proj.weight", (H // rep * K, D)) for n in ("k", "v"))
        k, v = (t.view(H // rep, 1, K, D).expand(-1, rep, -1, -1).reshape(H * K, D) for t in (k, v))  # [H·K, D]
        out[b + "core.qkv.weight"] = torch.cat([q, k, v])  # rows: q heads, k heads, v heads
        out[b + "core.out.weight"] = take(p + "self_attn.o_proj.weight", (D, H * K))
        out[b + "core_norm.weight"] = take(p + "input_layernorm.weight", (D,))
        out[b + "cms_norms.0.weight"] = take(p + "post_attention_layernorm.weight", (D,))
        out[b + "cms.0.w_gate"] = take(p + "mlp.gate_proj.weight", (F, D)).T  # [D, F]
        out[b + "cms.0.w_up"] = take(p + "mlp.up_proj.weight", (F, D)).T
        out[b + "cms.0.w_down"] = take(p + "mlp.down_proj.weight", (D, F)).T  # [F, D]
    head = state_dict.get("lm_head.weight")
    if cfg.tie_embeddings or head is None:
        if not cfg.tie_embeddings:
            raise ValueError("Llama state dict has no 'lm_head.weight' and tie_word_embeddings is false")
    else:
        out["head.weight"] = head
    model = HopeLM(cfg).to(out["embed.weight"].dtype)
    if cfg.tie_embeddings:
        out["head.weight"] = out["embed.weight"]
    model.load_state_dict({k: v.contiguous() for k, v in out.items()})
    return model


def load_source(path: str | Path) -> tuple[HopeLM, dict[str, Any], dict[str, Any]]:
    """The model at `path`, the run config and the `LMModule` hyper-parameters to record with its conversion: a
    `train.py` checkpoint (its `hydra_config` and `hyper_parameters`), or a Hugging Face Llama folder
    (config.json and model*.safetensors or pytorch_model*.bin; the data config names the folder as the
    tokenizer, the hyper-parameters are `LMModule`'s defaults)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{str(path)!r} is a folder without config.json: not a Hugging Face model folder")
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(path)
        state = _hf_weights(path)
        return from_llama(state, hf_config), {"data": {"tokenizer": f"hf:{path}"}}, {}
    from hope.training.inference import load_checkpoint

    module, hydra_config = load_checkpoint(path)
    return module.model, dict(hydra_config), dict(module.hparams)


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder (safetensors preferred, else PyTorch .bin shards)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{str(folder)!r} has no *.safetensors or pytorch_model*.bin weights")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def save(model: HopeLM, path: str | Path, run_config: Mapping[str, Any], provenance: Mapping[str, Any],
         hyper_parameters: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a checkpoint that `hope.training.inference.load_checkpoint` (evaluate.py, generate.py)
    and the benchmarks read: the `LMModule` state dict and hyper-parameters (`hyper_parameters`, e.g. the
    source's optimizer settings, with the model's full config in place of its preset), `run_config` as the run's
    config with its model node replaced, and `provenance` (source, periods, ...) under "converted_from"."""
    hp = {**dict(hyper_parameters or {}), "config": model.config.to_dict(), "preset": None,
          "vocab_size": model.config.vocab_size}
    hydra = {**dict(run_config), "model": {"_target_": "hope.training.LMModule", **hp}}
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp,
            "hydra_config": hydra, "converted_from": dict(provenance), "format": FORMAT}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@torch.no_grad()
def check_same_function(source: HopeLM, converted: HopeLM, tokens: int, seed: int = 0) -> float:
    """Largest |logit difference| between `source` and `converted` on `tokens` random ids (1 row), relative to
    the largest |logit|; a converted model's first chunk (before any write) should give round-off only."""
    ids = torch.randint(0, source.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(source.embed.weight.device)
    a, b = source.eval()(ids).logits, converted.eval()(ids).logits
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def parse_periods(text: str) -> list[int | None]:
    """"64,256,none" → [64, 256, None]."""
    out: list[int | None] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.lower() == "none":
            out.append(None)
        elif item.isdigit():
            out.append(int(item))
        else:
            raise ValueError(f"a period is an int >= 2 or 'none', got {item!r} in {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m hope.convert", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="a train.py checkpoint of a Transformer++, or a Hugging Face Llama folder")
    p.add_argument("out", help="the Hope-Attention checkpoint to write")
    p.add_argument("--periods", default="64", help="period of the level each source MLP becomes, one per MLP")
    p.add_argument("--extra", default="", help="periods of levels appended after them (ints or 'none')")
    p.add_argument("--extra-init", choices=EXTRA_INITS, default="zero",
                   help="appended levels: zero output (the function is kept) or a copy of the MLP (§7.3 literally)")
    p.add_argument("--lr", type=float, default=1e-3, help="inner learning rate of every level")
    p.add_argument("--optimizer", default="momentum", help="inner optimizer of every level (hope.optim rule)")
    p.add_argument("--decay", type=float, default=0.0, help="retention decay of every level's writes")
    args = p.parse_args(argv)
    source, run_config, hparams = load_source(args.src)
    periods, extra = parse_periods(args.periods), parse_periods(args.extra)
    converted = to_hope_attention(source, periods, extra, args.extra_init, args.lr, args.optimizer, args.decay)
    first_chunk = min(p for p in converted.config.fast_periods)
    err = check_same_function(source, converted, first_chunk)
    tol = 1e-5 if source.embed.weight.dtype == torch.float32 else 1e-3
    if args.extra_init == "zero" and err > tol:
        raise RuntimeError(f"the converted model differs from the source before any write (max relative logit "
                           f"error {err:.2e} > {tol:.0e}); nothing written")
    provenance = {"source": str(args.src), "periods": periods, "extra": extra, "extra_init": args.extra_init,
                  "lr": args.lr, "optimizer": args.optimizer, "decay": args.decay,
                  "first_chunk_relative_logit_error": err}
    out = save(converted, args.out, run_config, provenance, hparams)
    n = sum(t.numel() for t in {id(t): t for t in converted.parameters()}.values())
    print(f"{describe(source.config)} {args.src} -> Hope-Attention {out}: {n:,} parameters, CMS periods "
          f"{[lvl.period for lvl in converted.config.cms]} per block; first {first_chunk} tokens: max relative "
          f"logit difference {err:.1e}")
    print(json.dumps(provenance))
    return out


if __name__ == "__main__":
    main()
