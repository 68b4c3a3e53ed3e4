"""Faults survived: real `train.py` processes are killed (SIGKILL at chosen and random moments, SIGTERM), meet a
truncated checkpoint, a failing checkpoint write or a non-finite loss, and are resumed with `ckpt_path=last`. Every
value each attempt logged must equal, bit for bit, what an uninterrupted run logged at that step, and together the
attempts must have logged every value the uninterrupted run did.

Faults are injected from inside the process by `Fault`, a callback added through a Hydra override
(`+callbacks.fault._target_=test_faults.Fault`), at exact points of the loop; random kills come from outside.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from experiments.reliability.kill_resume import logged  # per attempt: {(step, metric): value}

ROOT = Path(__file__).resolve().parents[1]

# 8 steps of a tiny model; checkpoints every 2 steps, validation every 4 (step 4 has both: a kill during its
# validation must not lose it); every metric flushed to CSV at once, so a killed attempt keeps what it logged.
RUN = ["model.size=tiny", "data.seq_len=32", "data.batch_size=2", "data.max_val_tokens=256", "trainer.max_steps=8",
       "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "++trainer.limit_test_batches=1",
       "callbacks.model_checkpoint.every_n_train_steps=2", "logger=csv", "+logger.csv.flush_logs_every_n_steps=1",
       "trainer.log_every_n_steps=1", "model.warmup_steps=2", "~callbacks.progress_bar",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
       f"paths.data_cache={ROOT}/.cache/data"]
TRANSFORMER = ["experiment=transformer_small", *RUN]
HOPE_STREAM = ["experiment=hope_stream_small", *RUN,
               "+model.config.cms=[{period:8,hidden:32},{period:32,hidden:32},{period:256,hidden:32}]"]



class Fault(L.Callback):
    """Injects one fault when the run reaches global step `step` (the optimizer steps done so far).

    kind: "kill_in_step" (SIGKILL after the backward, before the optimizer step), "kill_in_validation" (SIGKILL
    after the first validation batch), "kill_in_write" (SIGKILL once 4 KiB of the next checkpoint file are written),
    "kill_before_rename" (SIGKILL when the next checkpoint is written and fsynced but not yet renamed into place),
    "sigterm" (SIGTERM at the start of the step's batch: Lightning's graceful path), "nan_weight" (a weight set to NaN
    before the step's forward).
    """

    KINDS = ("kill_in_step", "kill_in_validation", "kill_in_write", "kill_before_rename", "sigterm", "nan_weight")

    def __init__(self, kind: str, step: int) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"Fault kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.step = kind, step

    def _due(self, trainer, kind: str) -> bool:
        return self.kind == kind and trainer.global_step == self.step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._due(trainer, "sigterm"):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due(trainer, "nan_weight"):
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._due(trainer, "kill_in_step"):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._due(trainer, "kill_in_validation"):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._due(trainer, "kill_in_write"):
            real_fdopen = os.fdopen

            def fdopen(fd, *args, **kwargs):
                return _KillAfter(real_fdopen(fd, *args, **kwargs), 4096)

            os.fdopen = fdopen  # the process dies in this write: nothing else will use it
        if self._due(trainer, "kill_before_rename"):
            os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)


class _KillAfter:
    """A file whose `write` SIGKILLs the process once `limit` bytes have reached the file."""

    def __init__(self, f, limit: int) -> None:
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written >= self.limit:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def fault(kind: str, step: int) -> list[str]:
    return ["+callbacks.fault._target_=test_faults.Fault", f"+callbacks.fault.kind={kind}",
            f"+callbacks.fault.step={step}"]


def start(root: Path, name: str, overrides: list[str], fsize: int | None = None) -> subprocess.Popen:
    """`python train.py <overrides> run_name=<name>` with PROJECT_ROOT=root (its folder: root/logs/<name>);
    `fsize` caps the size of any file it writes (RLIMIT_FSIZE: a write past it fails with EFBIG)."""
    # PYTHONPATH: `Fault` is imported as `test_faults.Fault` (a `tests` package elsewhere may shadow this folder)
    env = {**os.environ, "PROJECT_ROOT": str(root), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def limit() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides, f"run_name={name}"], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def train(root: Path, name: str, overrides: list[str], **kwargs) -> tuple[int, str]:
    return finish(start(root, name, overrides, **kwargs))


def assert_same_log(reference: Path, interrupted: Path) -> int:
    """Every value logged by any attempt of `interrupted` equals the reference's; together they log all of it.
    Returns the number of values compared."""
    (ref,) = logged(reference)
    seen = set()
    for n, values in enumerate(logged(interrupted)):
        for key, value in values.items():
            assert key in ref, f"attempt {n} logged {key}, which the uninterrupted run did not"
            assert value == ref[key], f"attempt {n}, step {key[0]}, {key[1]}: {value} != {ref[key]} (uninterrupted)"
        seen |= values.keys()
    assert seen == set(ref), f"never logged after the faults: {sorted(set(ref) - seen)}"
    return len(ref)


def assert_same_weights(reference: Path, interrupted: Path) -> None:
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"]
    for name, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run the faulted ones are compared with."""
    root = tmp_path_factory.mktemp("reference")
    code, log = train(root, "ref", TRANSFORMER)
    assert code == 0, log[-3000:]
    return root / "logs" / "ref"


def last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_every_fault_then_resume_is_exact(tmp_path, reference):
    """One run through every fault, each attempt resumed with ckpt_path=last from where the previous one left:
    SIGKILL during a step, while a checkpoint's bytes are written, after they are written but before the rename,
    and during the validation of a step that has a checkpoint; a truncated last.ckpt; SIGTERM; a non-finite loss;
    a checkpoint write that fails (file-size limit). Together the attempts log exactly the uninterrupted run."""
    run_dir = tmp_path / "logs" / "run"
    resume = [*TRANSFORMER, "ckpt_path=last"]

    code, log = train(tmp_path, "run", [*TRANSFORMER, *fault("kill_in_step", 3)])
    assert code == -signal.SIGKILL and last_step(run_dir) == 2, log[-3000:]

    code, log = train(tmp_path, "run", [*resume, *fault("kill_in_write", 4)])
    assert code == -signal.SIGKILL and last_step(run_dir) == 2, log[-3000:]
    (stray,) = run_dir.glob("checkpoints/.step000004.ckpt.*.tmp")  # what the kill left: part of a file
    assert 4096 <= stray.stat().st_size < (run_dir / "checkpoints" / "last.ckpt").stat().st_size

    code, log = train(tmp_path, "run", [*resume, *fault("kill_before_rename", 4)])
    assert code == -signal.SIGKILL and last_step(run_dir) == 2, log[-3000:]
    assert f"removed {stray}" in log

    code, log = train(tmp_path, "run", [*resume, *fault("kill_in_validation", 4)])
    assert code == -signal.SIGKILL and last_step(run_dir) == 4, log[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated: resume takes step000004.ckpt

    code, log = train(tmp_path, "run", [*resume, *fault("sigterm", 5)])
    assert "is unreadable" in log and "step000004.ckpt (step 4)" in log, log[-3000:]
    assert code == 128 + signal.SIGTERM and "SIGTERM: wrote" in log and last_step(run_dir) == 6, log[-3000:]

    code, log = train(tmp_path, "run", [*resume, *fault("nan_weight", 6)])
    assert code == 1 and "non-finite training loss nan at step 6" in log, log[-3000:]
    assert f"Last good checkpoint: {last}" in log and last_step(run_dir) == 6

    code, log = train(tmp_path, "run", resume, fsize=1 << 20)  # any file past 1 MiB: the step-8 checkpoint
    assert code == 1 and "could not write checkpoint" in log and "File too large" in log, log[-3000:]
    assert "Traceback" not in log and last_step(run_dir) == 6

    code, log = train(tmp_path, "run", resume)
    assert code == 0, log[-3000:]
    assert_same_log(reference, run_dir)
    assert_same_weights(reference, run_dir)


def test_kill_in_the_final_validation_then_resume(tmp_path, reference):
    """SIGKILL during the validation at max_steps, after the last checkpoint: the resumed run has no step left to
    take, validates the final weights and tests them, logged at the uninterrupted run's steps."""
    run_dir = tmp_path / "logs" / "run"
    code, log = train(tmp_path, "run", [*TRANSFORMER, *fault("kill_in_validation", 8)])
    assert code == -signal.SIGKILL and last_step(run_dir) == 8, log[-3000:]
    code, log = train(tmp_path, "run", [*TRANSFORMER, "ckpt_path=last"])
    assert code == 0, log[-3000:]
    assert_same_log(reference, run_dir)
    assert_same_weights(reference, run_dir)


def test_stream_state_survives_a_kill(tmp_path):
    """HOPE trained on streams (`experiment=hope_stream_small`: the CMS state carried from batch to batch, and a
    period-256 level's gradient carried across windows): SIGKILL mid-step after the step-4 checkpoint, whose
    validation is run again on resume; the resumed run logs exactly what the uninterrupted one does."""
    code, log = train(tmp_path, "ref", HOPE_STREAM)
    assert code == 0, log[-3000:]
    code, log = train(tmp_path, "run", [*HOPE_STREAM, *fault("kill_in_step", 5)])
    assert code == -signal.SIGKILL, log[-3000:]
    assert "stream_state" in torch.load(tmp_path / "logs/run/checkpoints/last.ckpt", weights_only=False)
    code, log = train(tmp_path, "run", [*HOPE_STREAM, "ckpt_path=last"])
    assert code == 0, log[-3000:]
    assert_same_log(tmp_path / "logs" / "ref", tmp_path / "logs" / "run")
    assert_same_weights(tmp_path / "logs" / "ref", tmp_path / "logs" / "run")


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, reference):
    """SIGKILL from outside at random moments (seeded; the seed is in the failure message) until the run
    completes, each attempt resumed with ckpt_path=last once a checkpoint exists."""
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    run_dir = tmp_path / "logs" / "run"
    kills = 0
    for attempt in range(6):
        resume = ["ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").exists() else []
        own_log = run_dir / "csv" / f"version_{len(list(run_dir.glob('csv/version_*')))}" / "metrics.csv"
        proc = start(tmp_path, "run", [*TRANSFORMER, *resume])
        if attempt < 3:  # kill only once this attempt has begun to train: its first metrics are on disk
            began = time.monotonic()
            while not own_log.exists() and proc.poll() is None:
                time.sleep(0.05)
                assert time.monotonic() - began < 300, f"seed {seed}: no metrics after 300 s"
            time.sleep(rng.uniform(0.0, 3.0))
            proc.send_signal(signal.SIGKILL)
        code, log = finish(proc)
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"seed {seed}, attempt {attempt}: {log[-3000:]}"
        kills += 1
    assert code == 0, f"seed {seed}: did not complete"
    try:
        assert_same_log(reference, run_dir)
        assert_same_weights(reference, run_dir)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, {kills} kills: {e}") from e


@pytest.mark.slow
def test_two_process_ddp_survives_sigkill(tmp_path):
    """The same on two CPU processes (DDP, gloo): both ranks SIGKILLed mid-step, then resumed; exact."""
    ddp = [*TRANSFORMER, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    code, log = train(tmp_path, "ref", ddp)
    assert code == 0, log[-3000:]
    run_dir = tmp_path / "logs" / "run"
    code, log = train(tmp_path, "run", [*ddp, *fault("kill_in_step", 3)])
    assert code == -signal.SIGKILL and last_step(run_dir) == 2, log[-3000:]
    code, log = train(tmp_path, "run", [*ddp, "ckpt_path=last"])
    assert code == 0, log[-3000:]
    assert_same_log(tmp_path / "logs" / "ref", run_dir)
    assert_same_weights(tmp_path / "logs" / "ref", run_dir)


def test_checkpoint_files_mode_and_remote_paths(tmp_path):
    """Local checkpoint files get the mode a plain open gives (not mkstemp's 0o600); an fsspec URL (here the
    in-memory file system) is written and read back, and `ckpt_path=last` falls back there too."""
    from lightning.fabric.utilities.cloud_io import get_filesystem

    from hope.training.checkpoint import AtomicCheckpointIO, resolve_ckpt_path

    io, ckpt = AtomicCheckpointIO(), {"state_dict": {"w": torch.ones(2)}, "global_step": 3}
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask
    url = f"memory://{tmp_path.name}/checkpoints"
    io.save_checkpoint(ckpt, f"{url}/step000003.ckpt")
    io.save_checkpoint({**ckpt, "global_step": 4}, f"{url}/last.ckpt")
    assert resolve_ckpt_path("last", url)[1]["global_step"] == 4
    get_filesystem(url).pipe(f"{url}/last.ckpt", b"truncated")
    path, loaded = resolve_ckpt_path("last", url)
    assert path.endswith("/checkpoints/step000003.ckpt") and torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_fresh_start_into_a_used_run_folder_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hope.training.run import check_fresh_start

    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds checkpoints.*ckpt_path=last.*run_name"):
        check_fresh_start(str(tmp_path), [ModelCheckpoint(dirpath=tmp_path)])
    check_fresh_start(str(tmp_path), [])  # no checkpoints written: nothing to protect
    check_fresh_start(str(tmp_path / "new"), [ModelCheckpoint(dirpath=tmp_path / "new")])


def test_kill_resume_benchmark_tiny(tmp_path):
    """`python -m experiments.reliability.kill_resume --tiny`: the random-moment kills and the comparison it reports."""
    from experiments.reliability import kill_resume

    out = kill_resume.run(["--tiny", "--presets", "transformer_small", "--steps", "8", "--every", "2", "--kills", "1",
                           "--threads", "1", "--out", str(tmp_path)])
    (res,) = out["presets"]
    assert res["exact"] and res["compared"] > 50 and len(res["kills"]) == 1 and res["attempts"] == 2
    assert (tmp_path / "kill_resume_tiny.md").read_text().count("| transformer_small | 8 |") == 1
    with pytest.raises(SystemExit, match="need steps >= every >= 1 and kills >= 0, got steps=2 every=4"):
        kill_resume.run(["--steps", "2", "--every", "4"])
