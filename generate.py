"""Sample text from a trained checkpoint.

    python generate.py logs/transformer_small/checkpoints/last.ckpt --prompt "ROMEO:" --tokens 300

Top-p, end tokens and padded batches: `generate` of the Hugging Face model (docs/huggingface.md).
"""

from __future__ import annotations

import argparse

from hope.training.inference import build_tokenizer_from_config, generate_text, load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .ckpt written by train.py")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = all tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        if args.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = no top-k filter), got {args.top_k}")
        top_k = args.top_k or None
        module, cfg = load_checkpoint(args.checkpoint)
        tokenizer = build_tokenizer_from_config(cfg).tokenizer
        print(generate_text(module, tokenizer, args.prompt, args.tokens, args.temperature, top_k, args.seed))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
