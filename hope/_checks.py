"""Validation helpers written once: `check(cond, msg)` for the typed configs, `check_tensor` for tensor inputs."""

from __future__ import annotations

import torch


def check(cond: bool, msg: str) -> None:
    """Raise `ValueError(msg)` unless `cond` (messages name the offending value)."""
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, x: object, device: object) -> None:
    """`TypeError` unless `x` is a tensor, `ValueError` unless it is on q's `device` (the input checks of
    `hope.memory.ops` and of the Triton kernels both start with these)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; put every input on one device")
