"""Checkpoints that lose nothing: crash-consistent writes, clear errors on unreadable or mismatched files, and
the choice of the checkpoint a run resumes from.

Local paths are written by `AtomicCheckpointIO` (below); any other fsspec URL (`s3://…`, `gs://…`, `memory://…`)
goes through Lightning's own `TorchCheckpointIO` unchanged, and is read back through fsspec.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"
_STRAY_TMP = re.compile(r"^\..+\.ckpt\..+\.tmp$")  # what `_write_local` leaves behind when killed mid-write


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the files already there are intact."""


def is_local(path: str | Path) -> bool:
    """True for a plain path, False for an fsspec URL (`s3://…`, `memory://…`, `file://…`)."""
    return "://" not in str(path)


def _write_local(checkpoint: dict[str, Any], path: Path) -> None:
    """Write `checkpoint` to `path` so that a crash at any moment leaves either the old file or the new one.

    Why not Lightning's own local write (fsspec's `LocalFileSystem` transaction, Lightning 2.6 / fsspec 2026.9):
    it writes into a temporary file in the system temp directory and `shutil.move`s it over the target. When the
    temp directory is on another file system the move is a copy into the target, which a kill leaves truncated;
    nothing is fsynced, so a node that reboots can be left with an empty file behind a completed rename; a killed
    process leaves a checkpoint-sized file in /tmp; and the whole checkpoint is held in memory twice. Here the
    temporary file is a sibling of the target (same file system, so `os.replace` is atomic), fsynced before the
    rename, the directory fsynced after it, and given the mode a plain `open` would give (0o666 & ~umask; `mkstemp`
    alone makes it 0o600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            out = _WholeWrites(f)
            try:
                torch.save(checkpoint, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None  # torch's "unexpected pos" for a write the system refused
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a reboot
    finally:
        os.close(dir_fd)


class _WholeWrites:
    """A binary file whose `write` writes every byte or raises the OSError that stopped it.

    torch's zip writer checks the count each `write` returns; a write cut short by a full disk or a file-size limit
    returns a short count first, and torch reports it as an opaque `RuntimeError` ("unexpected pos"). Writing the
    rest at once makes the system's own error (ENOSPC, EFBIG, ...) the one raised."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None  # the first failed write's; torch may wrap it, or write again after it

    def write(self, data) -> int:
        if self.error is not None:
            raise self.error
        view, done = memoryview(data).cast("B"), 0
        try:
            while done < len(view):
                n = self._f.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, f"write returned {n!r} with {len(view) - done} bytes left")
                done += n
        except OSError as e:
            self.error = e
            raise
        return done

    def flush(self) -> None:
        self._f.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with crash-consistent local writes (`_write_local`) and a clear error when a
    write fails: `CheckpointWriteError` names the file and the reason, and says that nothing was replaced.

    `preloaded`: (path, content) of the checkpoint the run resumes from, already read on the CPU by
    `resolve_ckpt_path` to check it; Lightning's one load of that path gets it instead of reading the file again."""

    def __init__(self, preloaded: tuple[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._preloaded = preloaded

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        try:
            if is_local(path) and storage_options is None:
                _write_local(checkpoint, Path(path))
            else:
                super().save_checkpoint(checkpoint, path, storage_options)
        except OSError as e:
            reason = e.strerror or str(e)
            raise CheckpointWriteError(
                e.errno, f"could not write checkpoint {str(path)!r}: {reason}; nothing was replaced, the checkpoints "
                f"already in {os.path.dirname(str(path))!r} are intact"
            ) from e

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None):
        if self._preloaded is not None and str(path) == self._preloaded[0]:
            ckpt, self._preloaded = self._preloaded[1], None  # handed over once: Lightning edits it while restoring
            return ckpt
        # Lightning's own `TorchCheckpointIO` loads onto the CPU when no map_location is given (a checkpoint written
        # on a GPU then opens on a machine without one); so does this one
        return load_checkpoint_file(path, "cpu" if map_location is None else map_location)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load` of a local path or an fsspec URL, with errors that name the file and say what is wrong."""
    fs = get_filesystem(path)
    if not fs.isfile(str(path)):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with fs.open(str(path), "rb") as f:
            ckpt = torch.load(f, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} is unreadable (truncated or not a torch file): {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} is not a hope/Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def _join(directory: str, name: str) -> str:
    return str(Path(directory) / name) if is_local(directory) else f"{directory.rstrip('/')}/{name}"


def remove_stray_temporaries(ckpt_dir: str) -> list[str]:
    """Delete the temporary files a process killed mid-write left in a local `ckpt_dir`; returns their paths."""
    if not is_local(ckpt_dir) or not Path(ckpt_dir).is_dir():
        return []
    stray = [p for p in Path(ckpt_dir).iterdir() if _STRAY_TMP.match(p.name)]
    for p in stray:
        p.unlink(missing_ok=True)
        log.warning("removed %s, a checkpoint write that was interrupted (the previous checkpoints are intact)", p)
    return [str(p) for p in stray]


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """The `*.ckpt` files of `ckpt_dir` (local or fsspec URL), newest first by modification time."""
    if is_local(ckpt_dir):
        files = [str(p) for p in Path(ckpt_dir).glob("*.ckpt") if p.is_file()]
        return sorted(files, key=os.path.getmtime, reverse=True)
    fs = get_filesystem(ckpt_dir)
    if not fs.isdir(ckpt_dir):
        return []
    files = [fs.unstrip_protocol(p) for p in fs.glob(_join(ckpt_dir, "*.ckpt"))]
    return sorted(files, key=fs.modified, reverse=True)


def resolve_ckpt_path(ckpt_path: str | None, ckpt_dir: str) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint a run resumes from, and its content: `None` → a fresh start, `(None, None)`; a path → that
    file, which must be readable; "last" → `<ckpt_dir>/last.ckpt`, or, when that file is unreadable (truncated,
    corrupt), the newest readable `*.ckpt` of `ckpt_dir`, with a warning that says which one was taken instead."""
    if ckpt_path is None:
        return None, None
    if str(ckpt_path) != "last":
        return str(ckpt_path), load_checkpoint_file(ckpt_path)  # raises with the file's name if missing/unreadable
    remove_stray_temporaries(ckpt_dir)
    last = _join(ckpt_dir, "last.ckpt")
    if not get_filesystem(last).isfile(last):
        raise FileNotFoundError(f"ckpt_path='last': no checkpoint at {last!r} (nothing to resume in this run folder)")
    try:
        return last, load_checkpoint_file(last)
    except ValueError as e:
        problem = str(e)
    for candidate in list_checkpoints(ckpt_dir):
        if os.path.basename(candidate) == "last.ckpt":
            continue
        try:
            ckpt = load_checkpoint_file(candidate)
        except ValueError:
            log.warning("skipping %s: unreadable too", candidate)
            continue
        log.warning("%s; resuming from the newest readable checkpoint instead: %s (step %d)", problem, candidate,
                    ckpt["global_step"])
        return candidate, ckpt
    raise ValueError(f"{problem}, and {ckpt_dir!r} holds no other readable checkpoint to resume from")


def _saved_on_train_batch_end(loop: dict[str, Any]) -> bool:
    """Whether Lightning's loop state `loop` (checkpoint["loops"]["fit_loop"]) was saved in `on_train_batch_end`:
    the batch processed, not yet counted as completed."""
    done = loop["epoch_loop.batch_progress"]["total"]
    return done["ready"] == done["started"] == done["processed"] == done["completed"] + 1


def rerun_pending_validation(checkpoint: dict[str, Any], val_check_interval: Any, limit_val_batches: Any,
                             max_steps: int = -1) -> bool:
    """Make Lightning run the validation that a checkpoint was written before; True if there was one.

    Every checkpoint is written at the end of a training batch (`ModelCheckpoint.on_train_batch_end`), before the
    validation due at that step. Lightning 2.6 resumes from such a checkpoint by skipping that validation
    (`_TrainingEpochLoop.advance` → `val_loop.increment_progress_to_evaluation_end`): a run killed during a
    validation would never log it. Here the checkpoint's validation progress is set to "interrupted before its
    first batch", which Lightning's restart runs in full ("restarted mid evaluation"), and the logging step is set
    one back, since that restart counts the step twice (`reset` and `on_advance_end`). Edits `checkpoint` in
    place, before Lightning restores its loops from it; only for a validation every `val_check_interval` batches.

    A checkpoint at `max_steps` leaves the resumed fit nothing to do, so Lightning runs no validation there; the
    final validation of `hope.training.run.run` (the weights' last validation is not at their step) does it. The
    logging step is left where the uninterrupted run logs that validation: one back if it was due at this step
    (Lightning logs it inside the step), else at the step.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or not _saved_on_train_batch_end(loop):
        return False
    batches = loop["epoch_loop.batch_progress"]["total"]["ready"]
    due = limit_val_batches != 0 and isinstance(val_check_interval, int) and batches % val_check_interval == 0
    if 0 < max_steps <= checkpoint.get("global_step", 0):
        if not due:
            loop["epoch_loop.state_dict"]["_batches_that_stepped"] += 1
        return False
    if not due:
        return False
    val = loop["epoch_loop.val_loop.batch_progress"]
    done = val["total"]["completed"]
    val["total"].update(ready=done + 1, started=done + 1, processed=done, completed=done)
    val["current"].update(ready=1, started=1, processed=0, completed=0)
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    return True


class CheckpointOnStop(Callback):
    """Write `<ModelCheckpoint.dirpath>/last.ckpt` when a run stops between two periodic checkpoints: at its last
    step (`trainer.max_steps`), and on SIGTERM (a scheduler's pre-emption notice); `ckpt_path=last` then resumes
    from there.

    The last step's checkpoint is written in `on_train_batch_end`, where `ModelCheckpoint` writes its own. SIGTERM
    takes Lightning's graceful path: its handler sets `trainer.received_sigterm`, the loop raises `SIGTERMException`
    at the end of the current training batch or after the current validation batch, and this callback writes the
    checkpoint in `on_exception`, with the loop state rewritten to what it is in `on_train_batch_end` (the batch
    done, its validation not yet run), so that every checkpoint resumes through the same path,
    `rerun_pending_validation` included. In a multi-process run the exception is raised on all ranks at once only
    between training batches (Lightning broadcasts the flag there); a SIGTERM that stops one rank during
    validation writes nothing and says so, and the run resumes from its last periodic checkpoint.
    """

    @staticmethod
    def _last_path(trainer) -> str | None:
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None or trainer.fast_dev_run:  # Lightning writes none there
            return None
        return _join(str(callback.dirpath), "last.ckpt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # ModelCheckpoint's interval has no public accessor in Lightning 2.6; without it the last step is saved twice
        path, every = self._last_path(trainer), getattr(trainer.checkpoint_callback, "_every_n_train_steps", 0)
        if path and trainer.global_step == trainer.max_steps and not (every and trainer.global_step % every == 0):
            trainer.save_checkpoint(path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        path = self._last_path(trainer)
        if not isinstance(exception, SIGTERMException) or path is None:
            return
        if trainer.validating and trainer.world_size > 1:
            log.warning("SIGTERM during validation of a %d-process run: no checkpoint written; resume from the last "
                        "periodic one", trainer.world_size)
            return
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: wrote %s at step %d; resume with ckpt_path=last", path, trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not trainer.received_sigterm or "loops" not in checkpoint:
            return
        loop = checkpoint["loops"]["fit_loop"]
        train, val = loop["epoch_loop.batch_progress"], loop["epoch_loop.val_loop.batch_progress"]
        if not _saved_on_train_batch_end(loop):
            for progress in (train["total"], train["current"]):
                progress["completed"] = progress["processed"] - 1
            if not trainer.validating:  # Lightning counted the logging step at the end of the batch
                loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
        # the validation of this step, finished or interrupted, is run again on resume
        ran = val["current"]["completed"] if trainer.validating else 0
        for key in ("ready", "started", "processed", "completed"):
            val["total"][key] -= ran
            val["current"][key] = 0


def check_compatible(ckpt: dict[str, Any], module: torch.nn.Module, path: str | Path) -> None:
    """Raise a ValueError naming the first parameter whose name or shape differs between `ckpt` and `module`."""
    own = module.state_dict()
    theirs = ckpt["state_dict"]
    missing = sorted(set(own) - set(theirs))
    extra = sorted(set(theirs) - set(own))
    if missing or extra:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match this model: missing {missing[:3]}, unexpected {extra[:3]} "
            f"(was it trained with another model config? its config: {ckpt.get('hyper_parameters', {}).get('config')})"
        )
    for name, t in own.items():
        if tuple(theirs[name].shape) != tuple(t.shape):
            raise ValueError(
                f"checkpoint {str(path)!r} does not match this model: {name} has shape "
                f"{tuple(theirs[name].shape)} in the file and {tuple(t.shape)} in the model"
            )
