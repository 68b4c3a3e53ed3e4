"""The memory-optimizer interface shared by every rule in `hope.optim` (docs/design.md §6).

Legend: B batch (leading dims of a batched state), R rows, K row width (last dim), H hidden width of a deep memory.

An optimizer is a memory over gradients (arXiv:2512.24695 §4.2). A *rule* is the pure part of it, per parameter
tensor:

    state = rule.init_state(param)                 # fresh memory, same device/dtype as param
    state, direction = rule.update(state, grad)    # write grad into the memory, read the direction
    param ← param − lr · direction                 # the sign convention of every rule in this package

`update` never mutates its inputs and returns a new state dict of tensors, so the same rule serves the outer
`torch.optim.Optimizer` (one state per parameter) and the CMS levels (one state per sample, `[B, *shape]`).
Element-wise rules accept any shape. Matrix rules treat the last two dims as the matrix and every leading dim as a
batch dim; row rules (delta and deep momentum) do the same and read a 1-D tensor `[K]` as one row `[1, K]`, so a
batch of vectors must be given as `[B, 1, K]`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

State = dict[str, torch.Tensor]


@runtime_checkable
class MemoryRule(Protocol):
    """A gradient memory: `init_state(param) -> state` and the pure `update(state, grad) -> (state, direction)`.

    `elementwise` is True when every coordinate is independent (any shape works, batched or not); False for rules
    that mix coordinates inside the last two dims (`[..., R, K]`, leading dims are batch).
    """

    elementwise: bool

    def init_state(self, param: torch.Tensor) -> State: ...

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]: ...


def check_retention(name: str, value: float) -> None:
    """A retention / momentum factor must lie in [0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {name}={value!r}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """A step size, epsilon or count must be > 0 (or >= 0 when `allow_zero`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {name}={value!r}")


def check_int(name: str, value: int, minimum: int) -> None:
    """An iteration count or width must be an int >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")


def check_grad(state: State, key: str, grad: torch.Tensor) -> None:
    """The gradient must be a floating tensor of the shape the state was initialised for."""
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
        raise TypeError(f"grad must be a floating-point tensor, got {type(grad).__name__} {getattr(grad, 'dtype', '')}")
    if state[key].shape != grad.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match the state's {key} {tuple(state[key].shape)}")


def check_matrix(name: str, param: torch.Tensor) -> None:
    """Matrix-only rules need at least two dims: the last two are the matrix, the others batch."""
    if param.ndim < 2:
        raise ValueError(
            f"{name} is a matrix rule and needs a tensor with ndim >= 2 ([..., rows, cols]), got shape "
            f"{tuple(param.shape)}; give 1-D parameters to an element-wise rule (see hope.optim.build_optimizer)"
        )


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View a row-rule tensor as `[..., R, K]`: a 1-D `[K]` becomes one row `[1, K]`."""
    if x.ndim == 0:
        raise ValueError(f"row rules need a tensor with ndim >= 1, got a scalar of shape {tuple(x.shape)}")
    return x.unsqueeze(0) if x.ndim == 1 else x
