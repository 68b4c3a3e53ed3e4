"""Lightning callbacks of the training job: the progress bar, the step of the last validation, and the batch sizes
Lightning's `ThroughputMonitor` counts (`configs/callbacks/default.yaml`)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, with the epoch count left out when training is bounded by steps.

    Lightning writes "Epoch 0/{max_epochs - 1}", which reads "Epoch 0/-2" for `max_epochs=-1` (no epoch limit, the
    run stops at `trainer.max_steps`). Here the bar then says "Epoch 0 · step limit 1000" instead.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            text += f" · step limit {trainer.max_steps}"
        # the same padding as Lightning's, so that the bar does not jump when a validation bar appears
        return text.ljust(len(self.validation_description))


class ValidationStep(Callback):
    """Remembers the global step of the last validation that ran during `fit` (None before the first), so that
    the job can tell whether the final weights were validated."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def batch_rows(batch: dict) -> int:
    """Sequences in a batch (`ThroughputMonitor`'s samples)."""
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict) -> int:
    """Input tokens in a batch (`ThroughputMonitor`'s items: its `items_per_sec` is tokens/s)."""
    return int(batch["input_ids"].numel())
