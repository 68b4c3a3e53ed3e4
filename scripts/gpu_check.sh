#!/usr/bin/env bash
# The GPU checks of the Triton kernels in one command, sized to fit about 10 minutes on one H100/H200:
#   1. the `gpu`-marked kernel tests (bf16, large shapes) against the PyTorch oracle;
#   2. the kernel benchmark at the issue's target shape (B=4, T=4096, H=8, K=V=128, bf16, fwd and fwd+bwd),
#      with flash-linear-attention's gated delta rule when it is importable;
#   3. a T sweep (1K–16K) at B=1, H=8, K=V=128.
# Everything it prints and writes goes to $OUT (default: ./gpu_check_out): logs, nvidia-smi, bench JSON + PNG.
#
#   bash scripts/gpu_check.sh
#
# The machine needs PyTorch with CUDA, Triton, einops, numpy, matplotlib and pytest (+ pytest-timeout). Missing
# packages (flash-linear-attention, say) can be installed from wheels in .whl/, made on a machine with pip:
#   pip download --no-deps --only-binary=:all: -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$OUT/versions.txt"
status=0
timeout 240 "$PY" -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" \
  || status=1
timeout 240 "$PY" experiments/bench_kernel/bench.py --batch 4 --T 4096 --heads 8 --widths 128 --out "$OUT" \
  2>&1 | tee "$OUT/bench_target.log" || status=1
timeout 180 "$PY" experiments/bench_kernel/bench.py --batch 1 --T 1024 4096 16384 --heads 8 --widths 128 \
  --oracle-max-t 1024 --out "$OUT/sweep" 2>&1 | tee "$OUT/bench_sweep.log" || status=1
exit $status
