"""Use a trained checkpoint: sample text from it, or measure its perplexity / bits per byte on a split or a file.

    python generate.py logs/hope_small/checkpoints/last.ckpt --prompt "ROMEO:" --tokens 200
    python evaluate.py logs/hope_small/checkpoints/last.ckpt --split test
    python evaluate.py logs/hope_small/checkpoints/last.ckpt --file my_text.txt
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hope.training.checkpoint import check_compatible, load_checkpoint_file
from hope.training.module import LMModule


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[LMModule, dict[str, Any]]:
    """The trained `LMModule` (eval mode) and the resolved training config stored in the checkpoint."""
    ckpt = load_checkpoint_file(path, map_location)
    cfg = ckpt.get("hydra_config")
    if cfg is None:
        raise ValueError(f"checkpoint {str(path)!r} carries no training config ('hydra_config'); was it written by "
                         "train.py?")
    hp = dict(ckpt["hyper_parameters"])
    module = LMModule(**hp)
    check_compatible(ckpt, module, path)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), cfg


def build_tokenizer_from_config(cfg: dict[str, Any]):
    """The tokenizer the run trained with (a BPE one is read from the run's cache directory)."""
    from hope.data.datamodule import DataConfig, LMDataModule

    return LMDataModule(DataConfig(**cfg["data"]))


def generate_text(
    module: LMModule, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
    top_k: int | None = 50, seed: int = 0,
) -> str:
    """Continue `prompt` by `max_new_tokens` tokens (one token per model call, state carried)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty after tokenization; give at least one character")
    gen = torch.Generator().manual_seed(seed)
    out = module.model.generate(torch.tensor([ids]), max_new_tokens, temperature, top_k, generator=gen)
    return tokenizer.decode(out[0].tolist())


@torch.no_grad()
def evaluate_tokens(
    module: LMModule, tokens: torch.Tensor, token_bytes: torch.Tensor, seq_len: int, batch_size: int = 8
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over consecutive windows of `seq_len` + 1 tokens of `tokens` `[N]`."""
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    loss_sum, n_tok, n_bytes = 0.0, 0, 0
    for start in range(0, n_windows, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_windows))[:, None] * seq_len
        win = tokens[idx + torch.arange(seq_len + 1)].long()  # [b, T + 1]
        logits = module(win[:, :-1]).logits
        loss_sum += F.cross_entropy(logits.float().flatten(0, 1), win[:, 1:].flatten(), reduction="sum").item()
        n_tok += win[:, 1:].numel()
        n_bytes += int(token_bytes[win[:, 1:]].sum())
    loss = loss_sum / n_tok
    return {"loss": loss, "ppl": math.exp(loss), "bpb": loss_sum / (math.log(2) * n_bytes), "tokens": float(n_tok)}
