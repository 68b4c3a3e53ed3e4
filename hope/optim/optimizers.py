"""`torch.optim.Optimizer`s built on the gradient memories of `hope.optim` (docs/design.md §6).

Legend: shapes are each parameter's own; R rows, K row width for matrix and row rules.

Every optimizer here applies, per parameter p with gradient g and state s (one memory per parameter):

    s, d = rule.update(s, g)                # the pure rule of `hope.optim.registry`
    p ← p · (1 − lr·weight_decay)           # decoupled weight decay (AdamW style), before the step
    p ← p − lr · d

Parameters with more than two dims are viewed as `[shape[0], -1]` by the rules that are not element-wise (a conv
filter bank is one matrix, as in Muon). `Muon` and `M3` are matrix-only: parameters with ndim < 2, and every
parameter of a group whose `"matrix"` entry is False (put embeddings and heads there), use an AdamW fallback
(`AdamRule` with `adam_betas`, `adam_eps`, learning rate `lr · fallback_lr_scale`, same decoupled decay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from hope.optim.base import MemoryRule, check_positive
from hope.optim.delta import DeepMomentumRule, DeltaMomentumRule
from hope.optim.elementwise import AdamRule, MomentumRule, PreconditionedMomentumRule
from hope.optim.orthogonal import M3Rule, MuonRule

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class MemoryOptimizer(torch.optim.Optimizer):
    """Base class: a `MemoryRule` per param group, decoupled weight decay, closures, `state_dict` round trips.

    Subclasses set `rule_cls` and `rule_keys` (the group entries passed to the rule). The optimizer state of a
    parameter is exactly the rule's state dict, so `state_dict()` / `load_state_dict()` resume bit for bit.
    """

    rule_cls: type
    rule_keys: tuple[str, ...] = ()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_positive("lr", group["lr"], allow_zero=True)
        check_positive("weight_decay", group["weight_decay"], allow_zero=True)
        self.make_rule(group)  # validates the group's rule hyper-parameters now, not at the first step

    def make_rule(self, group: dict[str, Any]) -> MemoryRule:
        return self.rule_cls(**{k: group[k] for k in self.rule_keys})

    def rule_for(self, group: dict[str, Any], p: torch.Tensor, rule: MemoryRule) -> tuple[MemoryRule, float]:
        """The rule and learning rate that update `p`: the group's `rule` (matrix optimizers may fall back)."""
        return rule, group["lr"]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns the closure's loss when one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rule = self.make_rule(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p, *self.rule_for(group, p, rule))
        return loss

    def _update(self, group: dict[str, Any], p: torch.Tensor, rule: MemoryRule, lr: float) -> None:
        if p.grad.is_sparse:
            raise ValueError(f"{type(self).__name__} does not support sparse gradients (shape {tuple(p.shape)})")
        shape = p.shape if rule.elementwise or p.ndim <= 2 else (p.shape[0], -1)
        state = self.state[p]
        if not state:
            state.update(rule.init_state(p.reshape(shape)))
        new_state, direction = rule.update(dict(state), p.grad.reshape(shape))
        state.clear()
        state.update(new_state)
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(direction.reshape(p.shape), alpha=-lr)


class MatrixMemoryOptimizer(MemoryOptimizer):
    """A matrix-only rule for parameters with ndim >= 2 in groups with `matrix=True`, AdamW for the rest."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault("matrix", True)
        super().add_param_group(param_group)
        check_positive("fallback_lr_scale", self.param_groups[-1]["fallback_lr_scale"])
        self.fallback_rule(self.param_groups[-1])

    def fallback_rule(self, group: dict[str, Any]) -> AdamRule:
        return AdamRule(betas=group["adam_betas"], eps=group["adam_eps"])

    def rule_for(self, group: dict[str, Any], p: torch.Tensor, rule: MemoryRule) -> tuple[MemoryRule, float]:
        if p.ndim >= 2 and group["matrix"]:
            return rule, group["lr"]
        return self.fallback_rule(group), group["lr"] * group["fallback_lr_scale"]


def _fallback_defaults(adam_betas: tuple[float, float], adam_eps: float, fallback_lr_scale: float) -> dict[str, Any]:
    return dict(adam_betas=tuple(adam_betas), adam_eps=adam_eps, fallback_lr_scale=fallback_lr_scale)


class Momentum(MemoryOptimizer):
    """SGD with momentum as a linear memory of gradients (eqs. 10–13, 33–34): m ← β m + g, p ← p − lr·m.

    Equals `torch.optim.SGD(lr, momentum=beta, nesterov=nesterov)` when weight_decay = 0 (here weight decay is
    decoupled, torch's SGD adds it to the gradient instead).
    """

    rule_cls, rule_keys = MomentumRule, ("beta", "nesterov")

    def __init__(
        self, params: Params, lr: float = 1e-2, beta: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, dict(lr=lr, beta=beta, nesterov=nesterov, weight_decay=weight_decay))


class AdamMemory(MemoryOptimizer):
    """Adam as the element-wise associative memory of eqs. 100–105 (see `AdamRule`).

    Equals `torch.optim.Adam` when weight_decay = 0 and `torch.optim.AdamW` otherwise (decoupled decay).
    """

    rule_cls, rule_keys = AdamRule, ("betas", "eps", "bias_correction")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        super().__init__(params, defaults)


class PreconditionedMomentum(MemoryOptimizer):
    """Momentum over preconditioned gradients, m ← β m + P g (eqs. 46–47, see `PreconditionedMomentumRule`).

    With `preconditioner="rms"` and weight_decay = 0 it equals `torch.optim.RMSprop(alpha=beta2, momentum=beta)`.
    """

    rule_cls, rule_keys = PreconditionedMomentumRule, ("beta", "beta2", "eps", "preconditioner")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        beta: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-8,
        preconditioner: str = "rms",
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, beta=beta, beta2=beta2, eps=eps, preconditioner=preconditioner)
        super().__init__(params, {**defaults, "weight_decay": weight_decay})


class DeltaMomentum(MemoryOptimizer):
    """Delta momentum, m ← m (β I − ζ' GᵀG) + P g, ζ' = ζ/(1 + ζ‖G‖²) (eqs. 48–49, see `DeltaMomentumRule`)."""

    rule_cls, rule_keys = DeltaMomentumRule, ("beta", "erase", "preconditioner", "beta2", "eps")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        beta: float = 0.9,
        erase: float = 1.0,
        preconditioner: str = "identity",
        beta2: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, beta=beta, erase=erase, preconditioner=preconditioner, beta2=beta2, eps=eps)
        super().__init__(params, {**defaults, "weight_decay": weight_decay})


class DeepMomentum(MemoryOptimizer):
    """Deep Momentum Gradient Descent (eq. 50): an MLP momentum memory trained by its own ℓ2 loss.

    See `DeepMomentumRule`; each parameter gets its own memory φ = (W1, W2) drawn from `seed`.
    """

    rule_cls, rule_keys = DeepMomentumRule, ("beta", "inner_lr", "hidden", "seed")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        beta: float = 0.9,
        inner_lr: float = 0.5,
        hidden: int = 16,
        seed: int = 0,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, beta=beta, inner_lr=inner_lr, hidden=hidden, seed=seed, weight_decay=weight_decay)
        super().__init__(params, defaults)


class Muon(MatrixMemoryOptimizer):
    """Muon (eq. 52 with σ = Newton–Schulz, see `MuonRule`) for matrices; AdamW for the rest (module docstring)."""

    rule_cls, rule_keys = MuonRule, ("beta", "nesterov", "ns_steps", "ns_coefficients", "scale")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        beta: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: str = "quintic",
        scale: str = "rms",
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        fallback_lr_scale: float = 1.0,
    ) -> None:
        defaults = dict(lr=lr, beta=beta, nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=ns_coefficients)
        defaults |= dict(scale=scale, weight_decay=weight_decay)
        super().__init__(params, defaults | _fallback_defaults(adam_betas, adam_eps, fallback_lr_scale))


class M3(MatrixMemoryOptimizer):
    """Multi-scale Momentum Muon (Algorithm 1, see `M3Rule`) for matrices; AdamW for the rest (module docstring)."""

    rule_cls, rule_keys = M3Rule, ("betas", "alpha", "frequency", "eps", "ns_steps", "ns_coefficients")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.95, 0.999, 0.9),
        alpha: float = 1.0,
        frequency: int = 10,
        eps: float = 1e-8,
        ns_steps: int = 5,
        ns_coefficients: str = "quintic",
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        fallback_lr_scale: float = 1.0,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, frequency=frequency, eps=eps, ns_steps=ns_steps)
        defaults |= dict(ns_coefficients=ns_coefficients, weight_decay=weight_decay)
        super().__init__(params, defaults | _fallback_defaults(adam_betas, adam_eps, fallback_lr_scale))
