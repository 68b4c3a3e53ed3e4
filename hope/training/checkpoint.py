"""Checkpoints that lose nothing: atomic writes and clear errors on unreadable or mismatched files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target directory, fsyncs, then `os.replace`s it: a crash mid-write
    leaves the previous checkpoint intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None):
        return load_checkpoint_file(path, map_location)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load` with errors that name the file and say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} is unreadable (truncated or not a torch file): {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} is not a hope/Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


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
