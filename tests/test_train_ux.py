"""What a user of train.py sees: the final metrics (table and metrics.json), Lightning's monitors, the progress bar,
and one-line errors for bad input (unknown config keys, empty input, a missing result file)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_training import ROOT, make_cfg

from hope import HopeLM, preset
from hope.training.callbacks import ProgressBar
from hope.training.module import warmup_cosine
from hope.training.run import run

SMALL = ["model.size=tiny", "data.seq_len=32", "data.batch_size=2", "data.max_val_tokens=256",
         "trainer.limit_val_batches=2", "+trainer.limit_test_batches=1", "trainer.enable_model_summary=false"]


def test_final_metrics_table_json_and_monitors(tmp_path, capsys):
    """3 steps with validation every 2: the job validates the final weights once more, prints val and test in one
    table, writes them to metrics.json in the run's folder, and the CSV log holds Lightning's monitors. The progress
    bar callback stays in the config while `trainer.enable_progress_bar=false` turns it off."""
    cfg = make_cfg(tmp_path, [*SMALL, "logger=csv", "trainer.max_steps=3", "trainer.val_check_interval=2",
                              "trainer.log_every_n_steps=1", "callbacks.throughput.window_size=2",
                              "trainer.enable_progress_bar=false"])
    metrics = run(cfg)
    doc = json.loads((Path(cfg.trainer.default_root_dir) / "metrics.json").read_text())
    assert doc["steps"] == {"val": 3, "test": 3}
    assert doc["seed"] == cfg.seed and doc["meta"]["date"] and doc["meta"]["machine"]["cpu_count"]
    for key in ("val/bpb", "val/loss", "test/bpb", "test/loss"):
        assert doc["metrics"][key] == pytest.approx(metrics[key])
    table = capsys.readouterr().out
    lines = [line.split() for line in table.splitlines()]
    header = next(row for row in lines if row[:2] == ["split", "step"])
    rows = {row[0]: row for row in lines if row and row[0] in ("val", "test") and len(row) == len(header)}
    for split in ("val", "test"):
        assert rows[split][1] == "3"
        assert float(rows[split][header.index("bpb")]) == pytest.approx(metrics[f"{split}/bpb"], abs=1e-4)
    logged = {k for path in tmp_path.rglob("metrics.csv") for row in csv.DictReader(open(path)) for k, v in row.items()
              if v}
    assert {"train/lr/decay", "train/lr/no_decay", "train/grad_norm", "train/device/items_per_sec"} <= logged


def test_progress_bar_without_an_epoch_limit():
    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=1000)
    assert bar._get_train_description(0).strip() == "Epoch 0 · step limit 1000"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"  # an epoch limit: Lightning's own text


def test_warmup_cosine_is_torchs_schedule_then_flat():
    """The reason written beside `warmup_cosine`: equal to torch's SequentialLR(LinearLR, CosineAnnealingLR) up to
    the end of the schedule, and flat after it where torch's rises again."""
    w, total, floor = 10, 100, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / w, 1.0, w - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - w, floor)], [w])
    theirs = []
    for _ in range(121):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [warmup_cosine(s, w, total, floor) for s in range(121)]
    assert max(abs(a - b) for a, b in zip(ours[: total + 1], theirs)) < 1e-12
    assert ours[120] == pytest.approx(floor) and theirs[120] > 2 * floor


@pytest.mark.parametrize("override, expected", [
    ("+model.config.bogus=1", "model.config.bogus: HopeConfig has no argument 'bogus'; it accepts vocab_size"),
    ("+model.config.memory.bogus=1", "model.config.memory.bogus: MemoryConfig has no argument 'bogus'"),
    ("+model.config.cms=[{period:8,bogus:1}]", "model.config.cms[0].bogus: CMSLevel has no argument 'bogus'"),
    ("+model.bogus=1", "model.bogus: hope.training.LMModule has no argument 'bogus'; it accepts config, preset"),
    ("+trainer.bogus=1", "trainer.bogus: lightning.Trainer has no argument 'bogus'"),
    ("+model.config.d_model=-1", "model: HopeConfig.d_model must be a positive int, got -1"),  # its own check
    ("data=hf_stream", "data.hf_name must be set for data.source='hf_stream' (it has no default): add data.hf_name="),
])
def test_unknown_or_bad_config_values_are_named(tmp_path, override, expected):
    cfg = make_cfg(tmp_path, [*SMALL, "logger=none", override])
    with pytest.raises(ValueError) as info:
        run(cfg)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_cli_unknown_key_is_one_line(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "+model.config.bogus=1", "logger=none",
                           f"hydra.run.dir={tmp_path}/out"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: model.config.bogus: HopeConfig has no argument 'bogus'; it accepts ")


@pytest.mark.parametrize("name", ["transformer", "titans", "hope_attention", "hope"])
def test_empty_input_is_refused(name):
    model = HopeLM(preset(name, "tiny"))
    with pytest.raises(ValueError, match=r"at least one token per row, \[B ≥ 1, T ≥ 1\], got shape \[2, 0\]"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_harness_command_line(tmp_path, capsys):
    from experiments.memory_tasks import harness

    with pytest.raises(SystemExit) as info:
        harness.main(["--help"])
    assert info.value.code == 0 and "result file" in capsys.readouterr().out
    formal = ROOT / "experiments/memory_tasks/results/formal_languages.json"  # a result file, but not of a sweep
    for path, expected in [(tmp_path / "missing.json", "no result file at"), (formal, "not a sweep result file")]:
        with pytest.raises(SystemExit) as info:
            harness.main([str(path)])
        assert info.value.code == 2 and expected in capsys.readouterr().err
