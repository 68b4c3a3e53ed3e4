"""`build_optimizer(name, params, lr, weight_decay, **kwargs)`: the outer optimizer of the trainer, by name."""

from __future__ import annotations

from typing import Any

import torch

from hope.optim.base import check_positive
from hope.optim.optimizers import (
    M3,
    AdamMemory,
    DeepMomentum,
    DeltaMomentum,
    Momentum,
    Muon,
    Params,
    PreconditionedMomentum,
)

DEFAULT_OPTIMIZER = "adamw"

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "momentum": Momentum,
    "adam_memory": AdamMemory,
    "preconditioned_momentum": PreconditionedMomentum,
    "delta_momentum": DeltaMomentum,
    "deep_momentum": DeepMomentum,
    "muon": Muon,
    "m3": M3,
}


def build_optimizer(
    name: str, params: Params, lr: float, weight_decay: float = 0.0, **kwargs: Any
) -> torch.optim.Optimizer:
    """The optimizer called `name` over `params` (tensors or param-group dicts), e.g. for the trainer.

    | name | optimizer | weight decay |
    |---|---|---|
    | "adamw" (default) | `torch.optim.AdamW` | decoupled |
    | "adam" | `torch.optim.Adam` | torch's: added to the gradient (L2) |
    | "sgd" | `torch.optim.SGD` (pass `momentum=` for heavy ball) | torch's: added to the gradient (L2) |
    | "momentum", "adam_memory", "preconditioned_momentum" | `hope.optim.Momentum`, … | decoupled |
    | "delta_momentum", "deep_momentum", "muon", "m3" | `hope.optim.DeltaMomentum`, … | decoupled |

    "muon" and "m3" are matrix-only: a parameter with ndim < 2, or any parameter of a group with `"matrix": False`
    (embeddings, LM heads), is updated by an AdamW fallback (`adam_betas`, `adam_eps`, lr · `fallback_lr_scale`).
    `kwargs` are the optimizer's own hyper-parameters (e.g. `betas`, `beta`, `frequency`); a group's own entries
    (its `lr`, `weight_decay`, …) override them. Raises `ValueError` for an unknown name or a negative lr /
    weight_decay, `TypeError` for a keyword the optimizer does not take.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    check_positive("lr", lr, allow_zero=True)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    cls = OPTIMIZERS[name]
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
    except TypeError as err:
        raise TypeError(f"optimizer {name!r} rejected keyword arguments {sorted(kwargs)}: {err}") from err
