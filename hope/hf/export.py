"""Convert a checkpoint written by train.py into a Hugging Face model directory (config.json, model.safetensors,
the tokenizer), loadable with `AutoModelForCausalLM.from_pretrained` after `import hope.hf`.

    python -m hope.hf.export logs/hope_small/checkpoints/last.ckpt out/hope_small_hf
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from hope.hf.configuration import HopeHFConfig
from hope.hf.modeling import HopeForCausalLM
from hope.hf.tokenizer import hf_tokenizer
from hope.training.inference import build_tokenizer_from_config, load_checkpoint


def from_checkpoint(path: str | Path) -> tuple[HopeForCausalLM, PreTrainedTokenizerBase]:
    """The trained model of a train.py checkpoint as `HopeForCausalLM` (eval mode) and its tokenizer."""
    module, cfg = load_checkpoint(path)
    hope_config = module.model_config
    tokenizer = hf_tokenizer(build_tokenizer_from_config(cfg).tokenizer, hope_config.max_seq_len)
    if len(tokenizer) != hope_config.vocab_size:
        raise ValueError(f"checkpoint {str(path)!r}: its tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {hope_config.vocab_size}")
    config = HopeHFConfig.from_hope(hope_config, pad_token_id=tokenizer.pad_token_id)
    model = HopeForCausalLM(config)
    model.model.load_state_dict(module.model.state_dict())
    return model.eval(), tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .ckpt written by train.py")
    p.add_argument("out_dir", help="directory to write (created; existing files of the same names are replaced)")
    args = p.parse_args()
    try:
        model, tokenizer = from_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}: {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)"
          f" and its tokenizer")


if __name__ == "__main__":
    main()
