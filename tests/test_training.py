"""The trainer: every experiment config composes, instantiates and runs; resume is exact; bad input is explained."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from hope.training.run import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def make_cfg(tmp_path: Path, overrides: list[str]):
    """Compose `configs/train.yaml` as `python train.py <overrides>` would, with outputs under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.data_cache = str(ROOT / ".cache" / "data")  # share the token-stream cache between tests
        cfg.hydra.runtime.output_dir = str(tmp_path / "out")
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


TINY = ["logger=none", "data.seq_len=32", "data.batch_size=2", "data.max_val_tokens=256",
        "trainer.limit_val_batches=2", "~callbacks.progress_bar", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(tmp_path, experiment):
    from hydra.utils import instantiate

    cfg = make_cfg(tmp_path, [f"experiment={experiment}", "+model.config.n_layers=1"])
    assert cfg.run_name == experiment
    assert cfg.model._target_ == "hope.training.LMModule"
    module = instantiate(cfg.model, vocab_size=256)
    assert module.model_config.n_layers == 1
    if not torch.cuda.is_available() and cfg.trainer.get("accelerator") == "gpu":  # e.g. hope_base: check on CPU
        cfg.trainer.accelerator, cfg.trainer.precision = "cpu", "32-true"
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_hope_fast_small_sets_its_two_speed_choices(tmp_path):
    from hydra.utils import instantiate

    cfg = make_cfg(tmp_path, ["experiment=hope_fast_small", "+model.config.n_layers=1"])
    config = instantiate(cfg.model, vocab_size=256).model_config
    assert config.cms_signal == "residual" and config.memory.proj_chunk_size == 32
    assert any(lvl.period is not None for lvl in config.cms)  # still HOPE: fast CMS levels write in context


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.endswith("_small")])
def test_fast_dev_run(tmp_path, experiment):
    cfg = make_cfg(tmp_path, [f"experiment={experiment}", "debug=fast_dev_run", *TINY, "model.size=tiny"])
    metrics = run(cfg)
    assert torch.isfinite(torch.tensor(metrics["test/loss"]))
    assert 0 < metrics["test/bpb"] < 20


def losses_by_step(log_dir: Path) -> dict[int, float]:
    out = {}
    for path in log_dir.rglob("metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


STREAM = ["experiment=hope_stream_small", "+model.config.cms=[{period:8,hidden:32,decay:0.0625},"
          "{period:32,hidden:32,decay:0.0625},{period:256,hidden:32,decay:0.0625}]"]


def assert_resume_is_exact(tmp_path: Path, common: list[str]) -> dict:
    """Runs 8 steps straight (in tmp_path/a) and 4 + 4 resumed from the step-4 checkpoint (in tmp_path/b, the same
    run folder), asserts the same loss at every step and returns the resumed run's last checkpoint."""
    run(make_cfg(tmp_path / "a", [*common, "trainer.max_steps=8"]))
    run(make_cfg(tmp_path / "b", [*common, "trainer.max_steps=4"]))
    run(make_cfg(tmp_path / "b", [*common, "trainer.max_steps=8", "ckpt_path=last"]))  # same run folder
    a = losses_by_step(tmp_path / "a" / "out")
    b = losses_by_step(tmp_path / "b" / "out")
    assert sorted(a) == sorted(b) and len(a) == 8
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    return torch.load(tmp_path / "b" / "out" / "checkpoints" / "last.ckpt", weights_only=False)


@pytest.mark.parametrize("mode", ["reset", "stream"])
def test_resume_is_exact(tmp_path, mode, monkeypatch):
    """Resume from the step-4 checkpoint equals the uninterrupted run. In stream mode the carried state travels in
    the checkpoint, and step 4 (128 tokens per row) is inside a period-256 chunk, whose carried gradient too. The
    resumed run reads its checkpoint file once (checked, then handed to Lightning)."""
    from hope.training import checkpoint as ckpt_module

    reads, real_load = [], ckpt_module.load_checkpoint_file
    monkeypatch.setattr(ckpt_module, "load_checkpoint_file", lambda path, *a: reads.append(path) or real_load(path, *a))
    common = [*(STREAM if mode == "stream" else []), *TINY, "logger=csv", "model.size=tiny",
              "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
              "callbacks.model_checkpoint.every_n_train_steps=4", "test=false", "model.warmup_steps=2",
              "model.lr_decay_steps=8"]
    ckpt = assert_resume_is_exact(tmp_path, common)
    assert len(reads) == 1 and reads[0].endswith("last.ckpt"), reads
    assert ckpt["hydra_config"]["trainer"]["max_steps"] == 8
    assert ckpt["global_step"] == 8
    assert ("stream_state" in ckpt) == (mode == "stream")


def test_checkpoint_write_is_atomic(tmp_path):
    from hope.training.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": Boom()}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temporary left behind


def test_checkpoint_load_maps_to_the_cpu_by_default(tmp_path, monkeypatch):
    """Without a map_location a checkpoint is read onto the CPU, as Lightning's own checkpoint IO reads it."""
    from hope.training import checkpoint

    io = checkpoint.AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "c.ckpt")
    seen = []
    real = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda f, map_location=None, **k: seen.append(map_location)
                        or real(f, map_location=map_location, **k))
    io.load_checkpoint(tmp_path / "c.ckpt")
    io.load_checkpoint(tmp_path / "c.ckpt", map_location="meta")
    assert seen == ["cpu", "meta"]


def test_nan_loss_stops_with_message(tmp_path):
    cfg = make_cfg(tmp_path, [*TINY, "model.size=tiny", "trainer.max_steps=3", "+model.config.init_std=1e38"])
    from hope.training.module import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* at step 0"):
        run(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_mismatched_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, [*TINY, "model.size=tiny", "trainer.max_steps=2",
                              "callbacks.model_checkpoint.every_n_train_steps=2", "test=false"])
    run(cfg)
    other = make_cfg(tmp_path, [*TINY, "model.size=small", "trainer.max_steps=4", "ckpt_path=last", "test=false"])
    with pytest.raises(ValueError, match="does not match this model"):
        run(other)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    cfg = make_cfg(tmp_path, [*TINY, "model.size=tiny", f"ckpt_path={bad}"])
    with pytest.raises(ValueError, match="unreadable"):
        run(cfg)
    cfg = make_cfg(tmp_path, [*TINY, "model.size=tiny", "ckpt_path=last"])
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        run(cfg)


def train_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(cwd), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={cwd}/out"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["experiment=nope"], "experiment/nope"),
        (["model.no_such_key=1"], "no_such_key"),
        (["data=text", "data.paths=[/nonexistent/x.txt]"], "/nonexistent/x.txt"),
        (["data.seq_len=100000000", "data.max_val_tokens=null"], "seq_len"),
    ],
)
def test_cli_bad_input_is_explained(tmp_path, args, expected):
    proc = train_cli(*args, "logger=none", cwd=tmp_path)
    assert proc.returncode != 0
    message = proc.stderr + proc.stdout
    assert expected in message
    assert "Traceback" not in message


@pytest.mark.parametrize("content, expected", [(b"", "empty"), (b"caf\xe9 au lait", "byte")])
def test_cli_bad_text_file(tmp_path, content, expected):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    proc = train_cli("data=text", f"data.paths=[{path}]", "logger=none", cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in (proc.stderr + proc.stdout) and "Traceback" not in proc.stderr


def test_ddp_two_processes_on_cpu(tmp_path):
    proc = train_cli("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model.size=tiny",
                     "trainer.max_steps=3", "trainer.val_check_interval=3", *TINY[1:], "logger=csv",
                     cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for path in tmp_path.rglob("metrics.csv") for row in csv.DictReader(open(path))]
    assert any(row.get("test/bpb") for row in rows), rows


def test_generate_and_evaluate_entry_points(tmp_path):
    cfg = make_cfg(tmp_path, [*TINY, "model.size=tiny", "trainer.max_steps=2", "test=false",
                              "callbacks.model_checkpoint.every_n_train_steps=2"])
    run(cfg)
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    text = tmp_path / "eval.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(ckpt), "--file", str(text)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = __import__("json").loads(proc.stdout)
    assert result["tokens"] == 10 * 32  # 351 bytes -> 10 windows of 32 + 1 and 0 < result["bpb"] < 20
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), str(ckpt), "--prompt", "To be", "--tokens", "12",
                           "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("To be") and len(proc.stdout.encode()) >= 5 + 12
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "missing.ckpt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "missing.ckpt" in proc.stderr and "Traceback" not in proc.stderr


def test_optuna_search_config_composes(tmp_path):
    cfg = make_cfg(tmp_path, ["hparams_search=optuna", "experiment=transformer_small"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric == "val/bpb"
    assert set(cfg.hydra.sweeper.params) == {"model.lr", "model.warmup_steps", "model.weight_decay"}


def test_grid_sweep_runs_each_job(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "debug=fast_dev_run", "model.size=tiny", "model.lr=1e-3,2e-3",
         *TINY, f"hydra.sweep.dir={tmp_path}/multirun"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "multirun" / "train").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]  # one folder per job: multirun/<run_name>/<job number>
    overrides = [(tmp_path / "multirun" / "train" / j / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert "model.lr=0.001" in overrides[0] and "model.lr=0.002" in overrides[1]
