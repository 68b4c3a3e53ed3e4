"""Runs of the Hydra trainer (`python train.py`, `hope.training.run.run`) from inside a benchmark.

Dimensions: none (configs only).

`compose_train(overrides)` is the config `python train.py <overrides>` would run, Hydra's own node included (as
`hope.training.run` needs); `place_run` puts its outputs in one run directory, shares the token cache between all
runs and adds the benchmark's callbacks. `QUIET_OVERRIDES` turn off what a benchmark run does not need: checkpoints,
the progress bar and the model summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
QUIET_OVERRIDES = ("~callbacks.model_checkpoint", "~callbacks.progress_bar", "+trainer.enable_checkpointing=false",
                   "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")


def compose_train(overrides: Sequence[str]):
    """The config of `python train.py <overrides>` (`configs/train.yaml`), with Hydra's own node."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def place_run(cfg, run_dir: Path, **callbacks: dict[str, Any]):
    """`cfg` with its outputs in `run_dir`, the token cache shared by every run (`<repo>/.cache/data`) and the
    `callbacks` added by name (`{"_target_": ..., ...}` nodes); set as the current Hydra config. Returns `cfg`."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.root_dir = str(run_dir)
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.data_cache = str(ROOT / ".cache" / "data")
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        for name, node in callbacks.items():
            cfg.callbacks[name] = node
    HydraConfig().set_config(cfg)
    return cfg
