"""Training throughput of HOPE against Transformer++ at one size: tokens/s and model FLOPs utilisation (MFU).

    python scripts/throughput.py --out tp.json                       # hope_base's shape: base, T=2048, B=16, bf16
    python scripts/throughput.py --tiny --out tp.json                # CPU smoke run (seconds)

Each model trains on random tokens (the data path is not timed) with AdamW: forward, loss, backward, step, as
`LMModule.training_step` does without Lightning. `--warmup` steps are not timed; then steps are timed until
`--steps` or `--seconds`, whichever comes first, with the device synchronised at both ends. A batch that runs out
of GPU memory is halved (at most twice) and the result says so.

MFU = model FLOPs per token × tokens/s ÷ the device's dense bf16 peak. Model FLOPs per token follow the usual
convention (PaLM, appendix B): 6·N for the N parameters used in matrix products (all but the input embedding,
unless tied to the head) plus 12·L·D·T for the attention scores of L attention layers. The inner-loop memory
updates of the self-modifying and Titans cores and the CMS writes are not counted, so HOPE's MFU understates the
work its GPU does; compare tokens/s for speed. Peaks (dense bf16): H100 SXM and H200 989 TFLOP/s, H100 PCIe 756,
A100 312; another device gets no MFU, with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from hope import HopeLM, preset

PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The dense bf16 peak of the device and its source, or None with the reason."""
    if device.type != "cuda":
        return None, f"no bf16 peak for device type {device.type!r}"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, f"{key} dense bf16"
    return None, f"no bf16 peak known for {name!r} (known: {[k for k, _ in PEAK_BF16]})"


def flops_per_token(model: HopeLM, seq_len: int) -> float:
    """6·N (matrix-product parameters) + 12·L·D·T (attention scores of the L attention layers)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    if not cfg.tie_embeddings:
        n -= model.embed.weight.numel()
    attention_layers = cfg.n_layers if cfg.core == "attention" else 0
    return 6.0 * n + 12.0 * attention_layers * cfg.d_model * seq_len


def _steps(model: HopeLM, opt: torch.optim.Optimizer, ids: torch.Tensor, n: int, dtype: torch.dtype) -> None:
    for _ in range(n):
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids[:, :-1]).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, size: str, vocab: int, seq_len: int, batch: int, cli: argparse.Namespace) -> dict:
    """One model's throughput (see the module docstring)."""
    device = torch.device(cli.device)
    dtype = getattr(torch, cli.dtype)
    torch.manual_seed(0)
    model = HopeLM(preset(name, size, vocab_size=vocab)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    halved = 0
    while True:
        ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)  # [B, T+1]
        try:
            _steps(model, opt, ids, cli.warmup, dtype)
            break
        except torch.cuda.OutOfMemoryError:
            if halved == 2 or batch == 1:
                raise
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch, halved = batch // 2, halved + 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start, steps = time.perf_counter(), 0
    while steps < cli.steps and time.perf_counter() - start < cli.seconds:
        _steps(model, opt, ids, 1, dtype)
        steps += 1
        _sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = steps * batch * seq_len / seconds
    fpt = flops_per_token(model, seq_len)
    peak, peak_source = peak_flops(device)
    return {
        "model": name, "size": size, "params": sum(p.numel() for p in model.parameters()),
        "batch": batch, "batch_halved": halved, "seq_len": seq_len, "dtype": cli.dtype, "timed_steps": steps,
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens_per_s, 1), "model_flops_per_token": fpt,
        "mfu": None if peak is None else round(fpt * tokens_per_s / peak, 4), "peak_flops": peak,
        "peak_source": peak_source,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--models", nargs="+", default=["hope", "transformer"])
    parser.add_argument("--size", default="base")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="timing budget per model")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    cli = parser.parse_args(argv)
    cli.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cli.tiny:
        cli.size, cli.vocab, cli.seq_len, cli.batch, cli.warmup, cli.steps = "tiny", 256, 32, 2, 1, 1
    cli.dtype = cli.dtype or ("bfloat16" if cli.device == "cuda" else "float32")
    for name in ("seq_len", "batch", "warmup", "steps", "vocab"):
        if getattr(cli, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cli, name)}")
    return cli


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)
    rows = [measure(name, cli.size, cli.vocab, cli.seq_len, cli.batch, cli) for name in cli.models]
    result = {"device": torch.cuda.get_device_name() if cli.device == "cuda" else "cpu", "torch": torch.__version__,
              "rows": rows}
    by = {r["model"]: r for r in rows}
    if "hope" in by and "transformer" in by:
        result["hope_over_transformer_tokens_per_s"] = round(by["hope"]["tokens_per_s"] /
                                                             by["transformer"]["tokens_per_s"], 4)
    with open(cli.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['model']:>12} {r['size']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu} "
              f"(B={r['batch']}, T={r['seq_len']}, {r['timed_steps']} steps)")
    assert all(math.isfinite(r["tokens_per_s"]) for r in rows)
    return result


if __name__ == "__main__":
    main()
