#!/usr/bin/env bash
# The GPU checks in one command, sized to finish within 8 minutes on one H100/H200, every part under its own
# timeout, one results file:
#   1. gpu_tests   (110 s): every `gpu`-marked test (bf16, large shapes: the Triton kernels against the oracle);
#   2. kernel_bench (120 s): experiments/bench_kernel/bench.py at the target shape (B=4, T=4096, H=8, K=V=128, bf16,
#      fwd and fwd+bwd), with flash-linear-attention's gated delta rule when it is importable;
#   3. throughput  (200 s): scripts/throughput.py, hope_base's shape (depth 12, T=2048, B=16, bf16) for HOPE and
#      Transformer++: tokens/s and model FLOPs utilisation.
# Results: $OUT/results.json (default OUT=./gpu_check_out) with the device, date, commit, and each part's status
# (passed / failed / timed_out / not_run, with the reason), seconds and result; logs beside it.
#
#   bash scripts/gpu_check.sh             # on the GPU machine (venv: HOPE_TORCH=torch bash scripts/setup.sh)
#   bash scripts/gpu_check.sh --dry-run   # here, no CUDA needed: parts 2 and 3 at tiny sizes on CPU, part 1 not run
#
# Missing packages (flash-linear-attention, say) can be installed from wheels in .whl/, made on a machine with pip:
#   pip download --no-deps --only-binary=:all: -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; accepted: --dry-run" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/gpu_check_out}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT/parts"
rm -rf "$OUT"/parts/*.json "$OUT/results.json" "$OUT/bench" "$OUT/throughput.json"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)

if [ "$DRY" = 0 ]; then
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); use --dry-run for the CPU parts" >&2
    exit 1
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
fi

# part NAME TIMEOUT_S RESULT_FILE CMD...: runs CMD under the timeout, logs to $OUT/NAME.log, writes $OUT/parts/NAME.json
part() {
  local name=$1 limit=$2 result=$3; shift 3
  local t0 rc status
  t0=$(date +%s.%N)
  echo "== $name (timeout ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=passed ;; 124|137) status=timed_out ;; *) status=failed ;; esac
  tail -n 3 "$OUT/$name.log"
  "$PYTHON" - "$OUT/parts/$name.json" "$name" "$status" "$rc" "$t0" "$limit" "$result" "$*" <<'EOF'
import json, sys, time
path, name, status, rc, t0, limit, result, cmd = sys.argv[1:]
json.dump({"name": name, "status": status, "returncode": int(rc), "seconds": round(time.time() - float(t0), 1),
           "timeout_s": int(limit), "command": cmd, "result_file": result or None}, open(path, "w"))
EOF
}

# not_run NAME REASON: a part that was deliberately not run, with the reason
not_run() {
  "$PYTHON" -c "import json, sys; json.dump({'name': sys.argv[2], 'status': 'not_run', 'reason': sys.argv[3]}, open(sys.argv[1], 'w'))" \
    "$OUT/parts/$1.json" "$1" "$2"
  echo "== $1: not run ($2)"
}

if [ "$DRY" = 1 ]; then
  not_run gpu_tests "dry run: the gpu-marked tests need CUDA"
  part kernel_bench 120 "$OUT/bench" "$PYTHON" experiments/bench_kernel/bench.py --tiny --out "$OUT/bench"
  part throughput 200 "$OUT/throughput.json" "$PYTHON" scripts/throughput.py --tiny --out "$OUT/throughput.json"
else
  part gpu_tests 110 "" "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider
  part kernel_bench 120 "$OUT/bench" "$PYTHON" experiments/bench_kernel/bench.py --batch 4 --T 4096 --heads 8 \
    --widths 128 --out "$OUT/bench"
  part throughput 200 "$OUT/throughput.json" "$PYTHON" scripts/throughput.py --seconds 45 --out "$OUT/throughput.json"
fi

"$PYTHON" - "$OUT" "$DRY" "$START" <<'EOF'
import datetime, glob, json, os, platform, re, subprocess, sys, time

out, dry, start = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
import torch

def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as err:
        return f"unknown ({err.__class__.__name__})"

parts = {}
for name in ("gpu_tests", "kernel_bench", "throughput"):
    path = os.path.join(out, "parts", f"{name}.json")
    part = json.load(open(path)) if os.path.exists(path) else {"name": name, "status": "missing"}
    log = os.path.join(out, f"{name}.log")
    if name == "gpu_tests" and os.path.exists(log):
        lines = [l for l in open(log).read().splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", l)]
        part["summary"] = lines[-1] if lines else None
    result = part.get("result_file")
    if result and os.path.isdir(result):
        files = sorted(glob.glob(os.path.join(result, "*.json")))
        part["result"] = json.load(open(files[-1])) if files else None
    elif result and os.path.isfile(result):
        part["result"] = json.load(open(result))
    parts[name] = part
results = {
    "command": "bash scripts/gpu_check.sh" + (" --dry-run" if dry else ""),
    "dry_run": dry,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": git("rev-parse", "HEAD"),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
    "torch": torch.__version__,
    "total_seconds": round(time.time() - start, 1),
    "parts": parts,
}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1, default=str)
bad = [n for n, p in parts.items() if p["status"] not in ("passed", "not_run")]
print(f"wrote {os.path.join(out, 'results.json')}: " + ", ".join(f"{n} {p['status']}" for n, p in parts.items())
      + f"; {results['total_seconds']} s")
sys.exit(1 if bad else 0)
EOF
