"""Outer updates at several frequencies: each group of parameters steps every `period` outer steps.

Nested Learning orders a model's components by update frequency (arXiv:2512.24695 §3, the "levels"): a level of
period C updates once per C steps with what it accumulated over them. The CMS levels do this inside the context
(their fast weights write every C tokens); `MultiFrequency` does it for the outer loop, so that the meta-learned
initial weights of a slow level move once per `period` optimizer steps instead of every step (the knob the
domain-incremental benchmark measures against forgetting, `experiments/continual/README.md`).

Between its steps a slow parameter's gradient is summed; when the group is due, the wrapped optimizer sees the
mean of the `period` gradients and steps that group only. Optimizers built on `torch.optim.Optimizer` skip a
parameter whose `.grad` is None (no step, no weight decay, no change of its moments), which is how the groups that
are not due are held still. With `period` 1 for every group the wrapped optimizer runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


class MultiFrequency:
    """Wrap `optimizer` so that the parameters in `periods` (parameter → period ≥ 1) step every `period` calls of
    `step`, with the mean of the gradients since their last step; every other parameter steps every call.

    Call `zero_grad`, `backward`, (clip), `step` as with any optimizer. `state_dict` holds the wrapped optimizer's
    state, the step count and the gradient sums, so a resumed run continues exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, periods: Mapping[nn.Parameter, int]) -> None:
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for p, period in periods.items():
            if not isinstance(period, int) or isinstance(period, bool) or period < 1:
                raise ValueError(f"MultiFrequency: a period must be an int >= 1, got {period!r}")
            if id(p) not in known:
                raise ValueError(f"MultiFrequency: a parameter of shape {list(p.shape)} is not in the optimizer")
        self.optimizer = optimizer
        self.periods = {p: k for p, k in periods.items() if k > 1}
        self.sums: dict[nn.Parameter, Tensor] = {}
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """Add the slow parameters' gradients to their sums; step every parameter that is due, and no other."""
        self.steps += 1
        for p, period in self.periods.items():
            if p.grad is None:
                continue
            total = self.sums[p] = self.sums[p] + p.grad if p in self.sums else p.grad.clone()
            if self.steps % period == 0:
                p.grad = total / period
                del self.sums[p]
            else:
                p.grad = None  # summed; the optimizer skips it this step
        self.optimizer.step()

    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "sums": {index[id(p)]: s for p, s in self.sums.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.sums = {params[int(i)]: s.clone() for i, s in state["sums"].items()}


def cms_level_periods(model: nn.Module, periods: Iterable[int]) -> dict[nn.Parameter, int]:
    """{parameter: period} for the outer parameters of every block's CMS level ℓ (`blocks.*.cms.ℓ.*`) with the
    ℓ-th of `periods`; one period per level of the model's CMS."""
    periods = list(periods)
    n_levels = len(model.config.cms)
    if len(periods) != n_levels:
        raise ValueError(f"one outer period per CMS level: the model has {n_levels}, got {periods}")
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "cms":
            out[p] = periods[int(parts[3])]
    return out
