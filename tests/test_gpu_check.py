"""scripts/gpu_check.sh: its --dry-run runs the CPU parts (kernel benchmark and throughput at tiny sizes) and
writes one results file naming the device, date and commit, with every part's status; bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)


def test_dry_run_writes_every_part(tmp_path) -> None:
    proc = _gpu_check(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["dry_run"] and results["command"] == "bash scripts/gpu_check.sh --dry-run"
    assert len(results["commit"]) == 40 and results["date"] and results["device"].startswith("cpu")
    parts = results["parts"]
    assert parts["gpu_tests"] == {"name": "gpu_tests", "status": "not_run",
                                  "reason": "dry run: the gpu-marked tests need CUDA"}
    bench = parts["kernel_bench"]
    assert bench["status"] == "passed" and bench["result"]["rows"] and bench["seconds"] <= bench["timeout_s"]
    rows = {r["model"]: r for r in parts["throughput"]["result"]["rows"]}
    assert parts["throughput"]["status"] == "passed" and set(rows) == {"hope", "transformer"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["timed_steps"] >= 1 and row["mfu"] is None
        assert row["peak_source"] == "no bf16 peak for device type 'cpu'"


def test_bad_input_is_refused(tmp_path, capsys) -> None:
    proc = _gpu_check(tmp_path, "--fast")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: unknown argument '--fast'; accepted: --dry-run"
    if not _cuda():
        proc = _gpu_check(tmp_path)
        assert proc.returncode == 1 and "no CUDA device visible" in proc.stderr and "--dry-run" in proc.stderr
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import throughput
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    with pytest.raises(SystemExit):
        throughput.parse_args(["--out", "x.json", "--batch", "0"])
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
