"""Train a language model: `python train.py experiment=hope_small` (see configs/ and the README).

Examples:
    python train.py experiment=transformer_small
    python train.py experiment=hope_small trainer.max_steps=2000 model.lr=2e-3
    python train.py experiment=hope_small ckpt_path=last          # resume exactly where the last run stopped
    python train.py -m experiment=transformer_small model.lr=1e-3,3e-3   # grid sweep
    python train.py -m hparams_search=optuna experiment=transformer_small
"""

from __future__ import annotations

import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from hope.training.checkpoint import CheckpointWriteError
from hope.training.module import NonFiniteLossError


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hope.training.run import run

    try:
        metrics = run(cfg)
    except (NonFiniteLossError, FileNotFoundError, ValueError, CheckpointWriteError) as e:
        raise SystemExit(f"error: {e}") from None
    except SIGTERMException:  # Lightning's graceful stop; CheckpointOnStop wrote last.ckpt
        print("stopped by SIGTERM; resume with ckpt_path=last", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    metric = cfg.get("optimized_metric")
    if metric and metric not in metrics and HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweeper needs it
        raise SystemExit(f"error: optimized_metric={metric!r} was not measured by this run; it measured "
                         f"{', '.join(sorted(metrics))}")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
