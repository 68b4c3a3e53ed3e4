"""Perplexity and bits per byte of a trained checkpoint on a split of its training data or on a text file.

    python evaluate.py logs/transformer_small/checkpoints/last.ckpt --split test
    python evaluate.py logs/transformer_small/checkpoints/last.ckpt --file notes.txt --seq-len 512
"""

from __future__ import annotations

import argparse
import json

from hope.training.inference import build_tokenizer_from_config, evaluate_tokens, load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .ckpt written by train.py")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=["train", "val", "test"], default="test")
    src.add_argument("--file", help="a UTF-8 .txt or .jsonl file to evaluate instead of a split")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    try:
        module, cfg = load_checkpoint(args.checkpoint)
        dm = build_tokenizer_from_config(cfg)
        seq_len = args.seq_len or int(cfg["data"]["seq_len"])
        if args.file:
            from hope.data.corpora import load_text_files
            from hope.data.datamodule import encode_documents

            tokens = encode_documents(dm.tokenizer, load_text_files([args.file], cfg["data"].get("text_field", "text")))
        else:
            tokens = dm.stream(args.split)
        result = evaluate_tokens(module, tokens, dm.token_bytes, seq_len, args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"checkpoint": args.checkpoint, "source": args.file or args.split, **result}, indent=2))


if __name__ == "__main__":
    main()
