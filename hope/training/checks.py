"""Config checks of the training job: a key that no constructor takes is named, with the keys it would take,
before anything is built (Hydra would otherwise report a `TypeError` from deep inside `instantiate`)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig

from hope.config import CMSLevel, HopeConfig
from hope.memory.config import MemoryConfig


def _unknown(keys: Any, accepted: list[str], where: str, owner: str) -> None:
    bad = [str(k) for k in keys if not str(k).startswith("_") and str(k) not in accepted]
    if bad:
        raise ValueError(f"{where}.{bad[0]}: {owner} has no argument {bad[0]!r}; it accepts {', '.join(accepted)}")


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_model_config(config: Any, where: str = "model.config") -> None:
    """Check the keys of a `HopeConfig` node, its `memory` (`MemoryConfig`) and each of its `cms` levels
    (`CMSLevel`); raise `ValueError` naming the first unknown key and the accepted ones."""
    if not isinstance(config, (dict, DictConfig)):
        return
    _unknown(config.keys(), _fields(HopeConfig), where, "HopeConfig")
    memory = config.get("memory")
    if isinstance(memory, (dict, DictConfig)):
        _unknown(memory.keys(), _fields(MemoryConfig), f"{where}.memory", "MemoryConfig")
    for i, level in enumerate(config.get("cms") or []):
        if isinstance(level, (dict, DictConfig)):
            _unknown(level.keys(), _fields(CMSLevel), f"{where}.cms[{i}]", "CMSLevel")


def instantiate_checked(node: DictConfig, where: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)` for the config node at `where` (e.g. "model"), with its keys
    checked against the target's signature first, and a `ValueError` of the constructor re-raised as itself (with
    `where` in front) instead of Hydra's multi-line `InstantiationException`."""
    target = get_object(node._target_)
    params = inspect.signature(target).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        _unknown(node.keys(), [n for n in params if n != "self"], where, node._target_)
    if where == "model" and "config" in node and not isinstance(node.config, ListConfig):
        check_model_config(node.config)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise ValueError(f"{where}: {e.__cause__}") from None
        raise
