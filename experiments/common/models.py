"""Build the compared models by name at a matched parameter budget, and say clearly which ones are not built yet.

Dimensions: B batch, T time.

All four models come from `hope.preset` at the same size dial, whose widths are chosen so that the presets stay
within a few percent of the Transformer++ parameter count; `build_models` records the counts so every result file
shows the budget actually compared.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

MODEL_NAMES = ("transformer", "titans", "hope_attention", "hope")
BUDGET_TOLERANCE = 0.05  # presets are sized to stay within 5% of Transformer++
LABELS = {"transformer": "Transformer++", "titans": "Titans", "hope_attention": "Hope-Attention", "hope": "HOPE"}


class ModelUnavailable(RuntimeError):
    """The preset exists in the plan but its core is not implemented in this checkout yet."""


@dataclass
class BuiltModel:
    name: str
    model: nn.Module
    params: int


def count_params(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor (tied embedding and head) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def build_model(
    name: str, size: str | int = "tiny", seed: int = 0, device: str | torch.device = "cpu",
    preset_name: str | None = None, **overrides: Any
) -> BuiltModel:
    """`HopeLM(preset(preset_name or name, size, **overrides))` initialised from `seed`, smoke-tested on two tokens.
    `preset_name` builds a configuration of the model `name` under another preset (e.g. "hope_stream" for "hope").

    Raises `ValueError` for an unknown name and `ModelUnavailable` (with the import error) when the preset's core
    or CMS levels are not available yet, so a benchmark can skip that model and say why.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    from hope import HopeLM, preset

    torch.manual_seed(seed)
    try:
        model = HopeLM(preset(preset_name or name, size, **overrides))
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))  # cores and CMS levels import lazily: fail here, not mid-run
    except (ImportError, NotImplementedError) as err:
        raise ModelUnavailable(f"model {name!r} is not available in this checkout yet: {err}") from err
    return BuiltModel(name, model.to(device), count_params(model))


def build_models(
    names: list[str] | tuple[str, ...], size: str | int = "tiny", seed: int = 0, device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[list[BuiltModel], dict[str, str]]:
    """Build every available model in `names`; return them and a {name: reason} map of those skipped."""
    built, skipped = [], {}
    for name in names:
        try:
            built.append(build_model(name, size, seed, device, **overrides))
        except ModelUnavailable as err:
            skipped[name] = str(err)
            print(f"[skip] {err}")
    if not built:
        raise ModelUnavailable(f"none of the models {list(names)} is available: {skipped}")
    ref = built[0]
    for b in built[1:]:
        if abs(b.params / ref.params - 1) > BUDGET_TOLERANCE:  # say so rather than compare unequal budgets silently
            print(f"[budget] {b.name} has {b.params:,} parameters, {b.params / ref.params - 1:+.1%} vs {ref.name} "
                  f"({ref.params:,}); the presets aim at ±{BUDGET_TOLERANCE:.0%}")
    return built, skipped


def available_models(names: list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The names in `names` whose presets build in this checkout, and a {name: reason} map of the others."""
    built, skipped = build_models(names, "tiny")
    return [b.name for b in built], skipped


def load_checkpoints(specs: Sequence[str]) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """Models trained by `train.py`, from `NAME=PATH` specs: {NAME: (model, the run's config)}, in spec order.

    Raises `ValueError` for a spec without `=` or a repeated NAME, `FileNotFoundError` for a missing file.
    """
    from hope.training.inference import load_checkpoint

    out: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--ckpt takes NAME=PATH, got {spec!r}")
        if name in out:
            raise ValueError(f"--ckpt names must differ, {name!r} is given twice")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--ckpt {name}: no checkpoint at {path!r}")
        module, cfg = load_checkpoint(path)
        out[name] = (module.model, cfg)
    return out


def fork_state(model: nn.Module, state: Any) -> Any:
    """An independent copy of a stream state, so a probe leaves the stream untouched.

    HopeLM's CMS fast weights are functions of the parameters (not graph leaves), so they are copied through
    `export_state` (plain tensors) and rebuilt by `import_state`; other models' states are cloned tensor by tensor.
    """
    if state is None:
        return None
    if hasattr(model, "export_state") and hasattr(model, "import_state"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a partial CMS chunk at the fork point is dropped; docs align to it
            return model.import_state(copy.deepcopy(model.export_state(state)))
    return tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, state)
