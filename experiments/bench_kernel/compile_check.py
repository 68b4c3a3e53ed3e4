"""Compile every Triton kernel of ``hope/memory/kernels/`` for NVIDIA GPUs without a GPU; report registers, spills.

    python experiments/bench_kernel/compile_check.py            # sm_90, a few representative shapes
    python experiments/bench_kernel/compile_check.py --full     # sm_80 and sm_90, all widths, dtypes, chunks

The host functions (``chunk_fwd``, ``chunk_bwd``, ``recurrent_fwd``) are run on CPU tensors with every kernel
launch intercepted, so each kernel is compiled with exactly the arguments, block sizes and ``num_warps`` that a
real run would use. Each launch goes through Triton's full pipeline (TTIR → TTGIR → LLVM → PTX) and the PTX
through ptxas to a cubin, whose registers and stack (spill) bytes per thread are read back with the cuobjdump
shipped with Triton; shared memory comes from Triton's metadata and is checked against the per-block limit.
This catches compile errors the interpreter cannot see (it runs the kernels as NumPy), register spills and
shared-memory overflows; it measures no speed.
Dimensions: B batch, T time, H heads, K key width, V value width, C chunk.
"""

import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("unset TRITON_INTERPRET: this script compiles the kernels instead of interpreting them")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hope.memory.kernels.chunk_bwd import chunk_bwd  # noqa: E402
from hope.memory.kernels.chunk_fwd import chunk_fwd  # noqa: E402
from hope.memory.kernels.common import Inputs, plan_tiles  # noqa: E402
from hope.memory.kernels.recurrent import recurrent_fwd  # noqa: E402

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100)
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def capture_launches(run) -> list[tuple[triton.JITFunction, dict, dict]]:
    """Call ``run()`` with JITFunction.run replaced by a recorder: (kernel, arguments by name, launch options)."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        named.update({key: value for key, value in kwargs.items() if key not in LAUNCH_OPTIONS})
        options = {key: value for key, value in kwargs.items() if key in LAUNCH_OPTIONS}
        launches.append((self, named, options))

    original = triton.JITFunction.run
    triton.JITFunction.run = record
    try:
        run()
    finally:
        triton.JITFunction.run = original
    return launches


def signature(kernel: triton.JITFunction, named: dict) -> tuple[dict, dict]:
    """Triton signature and constexprs of one launch (None pointers become constexpr None, as at run time)."""
    types, constants = {}, {}
    for param in kernel.params:
        value = named[param.name]
        if param.is_constexpr or value is None:
            types[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            types[param.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return types, constants


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack and local (spill) bytes per thread, static shared bytes: ``cuobjdump -res-usage``."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        log = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return {key: int(re.search(rf"{key}:(\d+)", log).group(1)) for key in ("REG", "STACK", "LOCAL", "SHARED")}


def host_calls(B: int, T: int, H: int, K: int, V: int, chunk_size: int, dtype: torch.dtype):
    """The launches of one forward, one backward and one recurrent call on empty CPU tensors of this shape."""
    q, k = torch.empty(B, T, H, K, dtype=dtype), torch.empty(B, T, H, K, dtype=dtype)
    v, do = torch.empty(B, T, H, V, dtype=dtype), torch.empty(B, T, H, V, dtype=dtype)
    eta, alpha, beta = (torch.empty(B, T, H, dtype=dtype) for _ in range(3))
    h0, dht = torch.empty(B, H, K, V), torch.empty(B, H, K, V)
    tiling, x = plan_tiles(T, chunk_size), Inputs(q, k, v, eta, alpha, beta, h0)
    return capture_launches(
        lambda: (chunk_fwd(x, tiling, True), chunk_bwd(x, tiling, do, dht), recurrent_fwd(x, chunk_size, True))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="all widths, dtypes, chunk sizes and sm_80 too")
    parser.add_argument("--widths", type=int, nargs="+", help="K = V values (default: 64 128 256)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], help="default: bfloat16")
    parser.add_argument("--chunks", type=int, nargs="+", help="chunk sizes (default: 64 200)")
    parser.add_argument("--out", help="also write the table as JSON to this file")
    cli = parser.parse_args()
    archs = [("cuda", 90, "sm_90"), ("cuda", 80, "sm_80")] if cli.full else [("cuda", 90, "sm_90")]
    widths = [(w, w) for w in cli.widths] if cli.widths else [(64, 64), (128, 128), (256, 256)]
    widths += [(100, 36)] if cli.full else []
    dtypes = [getattr(torch, d) for d in cli.dtypes] if cli.dtypes else [torch.bfloat16]
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if cli.full else dtypes
    chunks = cli.chunks or ([16, 64, 200] if cli.full else [64, 200])
    seen, rows, failures = set(), [], 0
    print(f"{'kernel':22s} {'arch':6s} {'dtype':9s} {'K':>4s} {'V':>4s} {'C':>4s} warps stages regs stack  smem")
    for (backend, cc, arch), (K, V), dtype, chunk_size in itertools.product(archs, widths, dtypes, chunks):
        for kernel, named, options in host_calls(1, 512, 2, K, V, chunk_size, dtype):
            types, constants = signature(kernel, named)
            key = (kernel.__name__, arch, tuple(sorted(types.items())), str(sorted(constants.items())), str(options))
            if key in seen:
                continue
            seen.add(key)
            row = dict(kernel=kernel.__name__, arch=arch, dtype=str(dtype)[6:], K=K, V=V, C=chunk_size,
                       num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3))  # fmt: skip
            text = " ".join(f"{row[c]:{w}}" for c, w in (("kernel", 22), ("arch", 6), ("dtype", 9), ("K", 4), ("V", 4),
                                                         ("C", 4), ("num_warps", 5), ("num_stages", 6)))  # fmt: skip
            try:
                compiled = triton.compile(ASTSource(kernel, types, constants), target=GPUTarget(backend, cc, 32),
                                          options=dict(options))  # fmt: skip
                usage = resource_usage(compiled.asm["cubin"])
            except Exception as error:  # report every failing kernel, not just the first
                failures += 1
                print(f"{text} FAILED: {str(error).splitlines()[-1][:200]}")
                continue
            row.update(regs=usage["REG"], stack=usage["STACK"], shared=compiled.metadata.shared)
            over = row["shared"] > SHARED_LIMIT[cc]
            failures += over
            print(f"{text} {row['regs']:4d} {row['stack']:5d} {row['shared']:6d}" + (" OVER LIMIT" if over else ""),
                  flush=True)  # fmt: skip
            rows.append(row)
    if cli.out:
        with open(cli.out, "w") as f:
            meta = dict(
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                triton=triton.__version__,
                machine="no GPU: compiled only",
                command=" ".join(sys.argv),
            )
            json.dump(dict(meta=meta, rows=rows), f, indent=1)  # fmt: skip
    if failures:
        raise SystemExit(f"{failures} kernel compilations failed or exceed shared memory")


if __name__ == "__main__":
    main()
