"""`memory_rule(name, **hparams)`: the names CMS levels (and the outer optimizers) select gradient memories by.

Every rule returns a direction d and the caller applies θ ← θ − lr·d (CMS: θ_ℓ ← θ_ℓ − η_ℓ·d, docs/design.md §5).

| name | rule | equations (arXiv:2512.24695) | layout |
|---|---|---|---|
| "sgd" | `SGDRule` | 8–9 | element-wise |
| "momentum" | `MomentumRule` | 10–13, 33–34 | element-wise |
| "adam" | `AdamRule` | 100–105 | element-wise |
| "preconditioned_momentum" | `PreconditionedMomentumRule` | 46–47 | element-wise |
| "delta_momentum" | `DeltaMomentumRule` | 48–49 | rows of the last two dims |
| "deep_momentum" | `DeepMomentumRule` | 50 | rows of the last two dims |
| "muon" | `MuonRule` | 42–44, 52 | matrix (last two dims), ndim >= 2 |
| "m3" | `M3Rule` | Algorithm 1, 75 | matrix (last two dims), ndim >= 2 |
"""

from __future__ import annotations

from typing import Any

from hope.optim.base import MemoryRule
from hope.optim.delta import DeepMomentumRule, DeltaMomentumRule
from hope.optim.elementwise import AdamRule, MomentumRule, PreconditionedMomentumRule, SGDRule
from hope.optim.orthogonal import M3Rule, MuonRule

RULES: dict[str, type] = {
    "sgd": SGDRule,
    "momentum": MomentumRule,
    "adam": AdamRule,
    "preconditioned_momentum": PreconditionedMomentumRule,
    "delta_momentum": DeltaMomentumRule,
    "deep_momentum": DeepMomentumRule,
    "muon": MuonRule,
    "m3": M3Rule,
}


def memory_rule(name: str, **hparams: Any) -> MemoryRule:
    """Build the gradient memory called `name` with its hyper-parameters (see the table in this module's docstring).

    These are the names CMS levels select by (`CMSLevel.optimizer`). The returned rule is immutable and pure:
    `state = rule.init_state(param)`, `state, d = rule.update(state, grad)`, then θ ← θ − lr·d. Per-sample CMS
    states `[B, *shape]` work for every rule: element-wise rules see independent coordinates, the others treat
    leading dims as batch. Unknown names raise `ValueError`; unknown or invalid hyper-parameters raise
    `TypeError` / `ValueError` naming them.
    """
    if name not in RULES:
        raise ValueError(f"unknown memory rule {name!r}; choose one of {sorted(RULES)}")
    cls = RULES[name]
    fields = set(cls.__dataclass_fields__) - {"elementwise"}
    unknown = sorted(set(hparams) - fields)
    if unknown:
        raise TypeError(f"memory rule {name!r} got unknown hyper-parameters {unknown}; it accepts {sorted(fields)}")
    return cls(**hparams)
