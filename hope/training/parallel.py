"""Sharding a `HopeLM` with FSDP: which modules become their own units (`configs/trainer/fsdp.yaml`).

FSDP gathers a unit's parameters only while that unit runs its forward and backward. Without in-context CMS writes
(Transformer++, Titans, any CMS whose levels all have period None) each `HopeBlock` is one unit, the usual
per-block wrap. With them (HOPE, Hope-Attention) the whole model is one unit: the parameters, gradients and
optimizer state are sharded between steps, and gathered whole for the forward and backward. Two reasons:

- `CMSSchedule` reads the levels' meta-learned θ_0 outside the block's forward, to build the per-sample fast
  weights θ_0 − Δ at the start of a stream and after each write (`hope.cms`); under a block unit it reads the
  local shard (a per-block `ModuleWrapPolicy({HopeBlock})` fails with "mat1 and mat2 shapes cannot be multiplied
  (… and 2x0)").
- The writes' inner `torch.autograd.grad` runs backward through the later blocks inside the forward. With only
  the cores as units (the CMS levels in the root), FSDP (torch 2.13, `FullyShardedDataParallel`) gives the right
  gradients on the first step and wrong ones from the second on (two CPU ranks against one process: step-3 loss
  3.4315 instead of 3.4800, core weights off by up to 77% relative), so this policy does not make them units.

`tests/test_fsdp.py` trains HOPE with its in-forward CMS writes, and Transformer++ per block, on two CPU processes
(gloo) under this policy and compares losses and weights with one process.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy

from hope.models.lm import HopeBlock


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules `HopeWrapPolicy` makes FSDP units besides the root: every block, or none when a block makes
    in-context CMS writes (see the module docstring)."""
    blocks = [m for m in model.modules() if isinstance(m, HopeBlock)]
    if any(level.period is not None for block in blocks for level in block.levels):
        return []
    return blocks


class HopeWrapPolicy(CustomPolicy):
    """FSDP auto-wrap policy: one unit per block, or the whole model with in-context CMS writes (module docstring).

    For `FSDPStrategy(auto_wrap_policy=HopeWrapPolicy())` or `FullyShardedDataParallel(auto_wrap_policy=…)`.
    """

    def __init__(self) -> None:
        super().__init__(self._not_called)

    @staticmethod
    def _not_called(module: nn.Module) -> bool:
        raise RuntimeError("HopeWrapPolicy overrides torch's CustomPolicy._run_policy (tested with torch 2.13), "
                           "which this torch no longer calls")

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        if not any(isinstance(m, HopeBlock) for m in root_module.modules()):
            raise ValueError(f"HopeWrapPolicy shards the HopeBlocks of a HopeLM, got a {type(root_module).__name__} "
                             "without any")
        return {m: copy.copy(root_kwargs) for m in fsdp_units(root_module) if m not in ignored_modules}
