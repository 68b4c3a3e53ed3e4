"""Optimizers as associative memories over gradients (docs/design.md §6; arXiv:2512.24695 §4, App. B, Algorithm 1).

Two entry points share one set of pure rules (`update(state, grad) -> (state, direction)`, then θ ← θ − lr·d):

- `memory_rule(name, **hparams)`: the rule object CMS levels select by name ("sgd", "momentum", "adam",
  "preconditioned_momentum", "delta_momentum", "deep_momentum", "muon", "m3"), batched over per-sample states.
- `build_optimizer(name, params, lr, weight_decay, **kwargs)`: a `torch.optim.Optimizer` for the outer loop
  ("adamw" default, "adam", "sgd", "momentum", "adam_memory", "preconditioned_momentum", "delta_momentum",
  "deep_momentum", "muon", "m3").

`MultiFrequency(optimizer, periods)` wraps any outer optimizer so that chosen parameters (e.g. the slow CMS levels',
`cms_level_periods`) step once per `period` steps with their mean gradient.
"""

from hope.optim.base import MemoryRule, State
from hope.optim.build import DEFAULT_OPTIMIZER, OPTIMIZERS, build_optimizer
from hope.optim.delta import DeepMomentumRule, DeltaMomentumRule, deep_memory_grads, deep_memory_loss
from hope.optim.elementwise import AdamRule, MomentumRule, PreconditionedMomentumRule, SGDRule
from hope.optim.multi_frequency import MultiFrequency, cms_level_periods
from hope.optim.optimizers import (
    M3,
    AdamMemory,
    DeepMomentum,
    DeltaMomentum,
    MemoryOptimizer,
    Momentum,
    Muon,
    PreconditionedMomentum,
)
from hope.optim.orthogonal import M3Rule, MuonRule, newton_schulz
from hope.optim.registry import RULES, memory_rule

__all__ = [
    "cms_level_periods",
    "DEFAULT_OPTIMIZER",
    "M3",
    "OPTIMIZERS",
    "RULES",
    "AdamMemory",
    "AdamRule",
    "DeepMomentum",
    "DeepMomentumRule",
    "DeltaMomentum",
    "DeltaMomentumRule",
    "M3Rule",
    "MultiFrequency",
    "MemoryOptimizer",
    "MemoryRule",
    "Momentum",
    "MomentumRule",
    "Muon",
    "MuonRule",
    "PreconditionedMomentum",
    "PreconditionedMomentumRule",
    "SGDRule",
    "State",
    "build_optimizer",
    "deep_memory_grads",
    "deep_memory_loss",
    "memory_rule",
    "newton_schulz",
]
