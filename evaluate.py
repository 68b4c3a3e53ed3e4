"""Evaluate a trained model: perplexity and bits per byte on a split or a text file, or lm-evaluation-harness tasks.

    python evaluate.py logs/transformer_small/checkpoints/last.ckpt --split test
    python evaluate.py logs/transformer_small/checkpoints/last.ckpt --file notes.txt --seq-len 512
    python evaluate.py out/hope_hf --tasks piqa,hellaswag --device cuda --output results/  # docs/huggingface.md

With --tasks, MODEL is a train.py checkpoint, a directory written by `python -m hope.hf.export` or a Hub name, and
the tasks run through the harness's own `simple_evaluate` (needs the `eval` extra).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="MODEL", help="a .ckpt written by train.py (with --tasks also a Hugging "
                   "Face directory or Hub name)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", choices=["train", "val", "test"], default="test")
    src.add_argument("--file", help="a UTF-8 .txt or .jsonl file to evaluate instead of a split")
    src.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks, e.g. piqa,hellaswag")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    lm = p.add_argument_group("lm-evaluation-harness (with --tasks)")
    lm.add_argument("--include-path", help="a directory of extra task YAMLs (e.g. tests/data/lm_eval)")
    lm.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    lm.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    lm.add_argument("--max-length", type=int, default=None, help="longest context in tokens, longer ones are cut "
                    "from the left (default: the model's max_seq_len, else the harness's 2048)")
    lm.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--output", help="directory for lm_eval.json (results, command, commit, date, machine, seed)")
    args = p.parse_args()
    try:
        if args.tasks is not None:
            run_harness(args)
        else:
            run_perplexity(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def run_perplexity(args: argparse.Namespace) -> None:
    from hope.training.inference import build_tokenizer_from_config, evaluate_tokens, load_checkpoint

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
    print(json.dumps({"checkpoint": args.checkpoint, "source": args.file or args.split, **result}, indent=2))


def run_harness(args: argparse.Namespace) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks needs at least one task name, got {args.tasks!r}")
    for name, value in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot)):
        if value is not None and value < (1 if name == "--limit" else 0):
            raise ValueError(f"{name} must be >= {1 if name == '--limit' else 0}, got {value}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {args.max_length}")
    from lm_eval.utils import make_table

    from hope.hf.harness import check_model_path, evaluate_tasks, load_harness_model, task_manager

    check_model_path(args.checkpoint)
    manager = task_manager(tasks, args.include_path)  # a misspelt task fails before the model loads
    model = load_harness_model(args.checkpoint, args.device, args.batch_size, args.max_length)
    results = evaluate_tasks(model, tasks, manager, args.num_fewshot, args.limit, args.seed)
    print(make_table(results))
    if args.output:
        from experiments.common.results import write_result

        path = write_result("lm_eval", {"model": args.checkpoint, "tasks": tasks, "seed": args.seed,
                                        "num_fewshot": args.num_fewshot, "limit": args.limit,
                                        "results": results["results"], "versions": results.get("versions"),
                                        "n-shot": results.get("n-shot")}, args.output)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
