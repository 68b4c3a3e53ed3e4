"""The training job behind `python train.py`: Hydra config in, fitted and tested model out.

data module + LMModule + callbacks + loggers -> `Trainer.fit` -> validate/test, with exact resume from
`ckpt_path` ("last" or a path) and the resolved config stored in every checkpoint. A run's folder
(`configs/hydra/default.yaml`: `logs/<run_name>/`) holds its config, log, metrics and `checkpoints/`;
`ckpt_path=last` resumes that folder's own `last.ckpt`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from hope.training.callbacks import ValidationStep
from hope.training.checkpoint import (
    AtomicCheckpointIO,
    CheckpointOnStop,
    check_compatible,
    list_checkpoints,
    resolve_ckpt_path,
)
from hope.training.checks import instantiate_checked
from hope.training.module import LMModule
from hope.training.report import metrics_table, write_metrics

log = logging.getLogger(__name__)


class ConfigInCheckpoint(Callback):
    """Stores the resolved Hydra config in each checkpoint (`checkpoint["hydra_config"]`)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["hydra_config"] = self.cfg


def build_datamodule(cfg: DictConfig):
    from hope.data.datamodule import DataConfig, LMDataModule

    missing = [f"data.{k}" for k in cfg.data if OmegaConf.is_missing(cfg.data, k)]
    if missing:
        raise ValueError(f"{', '.join(missing)} must be set for data.source={cfg.data.get('source')!r} (it has no "
                         f"default): add {missing[0]}=<value> to the command")
    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    dm = LMDataModule(data_cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_module(cfg: DictConfig, vocab_size: int, token_bytes: torch.Tensor) -> LMModule:
    """The module `cfg.model` names by its `_target_` (`hope.training.LMModule` in every `configs/model/*.yaml`),
    built with the tokenizer's `vocab_size` and given its `[V]` UTF-8 byte lengths (`token_bytes`) for bits per
    byte. Its arguments arrive as plain dicts and lists (`_convert_="all"`), as `OmegaConf.to_container` gives."""
    module = instantiate_checked(cfg.model, "model", vocab_size=vocab_size, _convert_="all")
    module.set_token_bytes(token_bytes)
    return module


def _instantiate_all(node: DictConfig | None, where: str) -> list[Any]:
    if not node:
        return []
    return [instantiate_checked(v, f"{where}.{k}") for k, v in node.items() if isinstance(v, DictConfig)
            and "_target_" in v]


def check_fresh_start(ckpt_dir: str, callbacks: list[Any]) -> None:
    """A fresh run (no `ckpt_path`) that writes checkpoints must not write them beside an earlier run's, where
    `ckpt_path=last` would later resume the wrong one: raise a ValueError that says how to resume or rename."""
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        return
    found = list_checkpoints(ckpt_dir)
    if found:
        raise ValueError(
            f"{ckpt_dir!r} already holds checkpoints of an earlier run ({Path(found[0]).name}, ...): resume it with "
            "ckpt_path=last, start another run with run_name=<new name>, or delete the folder"
        )


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate as `cfg` says; returns the final metrics (floats)."""
    L.seed_everything(cfg.seed, workers=True)
    # The train sampler resumes by itself (LMDataModule.set_resume_batch, called from LMModule.on_load_checkpoint);
    # Lightning cannot see that and warns that a mid-epoch resume may be unreliable.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.vocab_size, dm.token_bytes)
    n_params = sum(p.numel() for p in module.model.parameters())
    log.info("model: %s core, %.2fM parameters", module.model_config.core, n_params / 1e6)

    ckpt_path, ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.ckpt_dir)
    callbacks = _instantiate_all(cfg.get("callbacks"), "callbacks")
    if ckpt is not None:
        check_compatible(ckpt, module, ckpt_path)
    elif cfg.get("train", True):
        check_fresh_start(cfg.paths.ckpt_dir, callbacks)
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    validated = ValidationStep()
    callbacks += [ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)), CheckpointOnStop(), validated]
    loggers = _instantiate_all(cfg.get("logger"), "logger")
    if not loggers:  # logger=none: Lightning refuses a LearningRateMonitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    io = AtomicCheckpointIO(preloaded=(ckpt_path, ckpt) if ckpt is not None else None)  # read once, above
    trainer: L.Trainer = instantiate_checked(
        cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, plugins=[io],
        use_distributed_sampler=False,
    )
    for lg in loggers:
        lg.log_hyperparams({"n_params": n_params, **OmegaConf.to_container(cfg, resolve=True)})

    if cfg.get("train", True):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        if validated.step != trainer.global_step and trainer.limit_val_batches != 0:
            # the last validation (every trainer.val_check_interval steps) did not see the final weights
            trainer.validate(module, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    steps = {"val": validated.step if validated.step is not None and "val/loss" in metrics else None, "test": None}
    if cfg.get("test", True):
        # test metrics are logged at the step of the weights tested; a resume from a checkpoint at max_steps (a run
        # killed after its last step) has Lightning's logging step one back, or where its final validation left it
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        for result in trainer.test(module, datamodule=dm, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
        steps["test"] = trainer.global_step
    metrics["n_params"] = float(n_params)
    if trainer.is_global_zero:
        path = write_metrics(Path(trainer.default_root_dir) / "metrics.json", metrics, steps, cfg.seed,
                             OmegaConf.to_container(cfg, resolve=True))
        print(f"\nFinal metrics ({module.model_config.core} core, {n_params / 1e6:.2f}M parameters):\n"
              f"{metrics_table(metrics, steps)}\nwritten to {path}")
    return metrics
