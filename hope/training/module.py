"""`LMModule`: the LightningModule that trains any `HopeLM` (Transformer++, Titans, Hope-Attention, HOPE).

Logged metrics (train/ and val/ / test/): loss (nats per token), perplexity, bits per byte (the summed loss
over the UTF-8 bytes the targets stand for, so tokenizers compare), gradient norm. Learning rate and tokens/s come
from Lightning's `LearningRateMonitor` and `ThroughputMonitor` (`configs/callbacks/default.yaml`).
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from hope.config import HopeConfig
from hope.config import preset as make_preset
from hope.models.lm import HopeLM, compile_model
from hope.state import StreamState
from hope.training.checkpoint import rerun_pending_validation


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last checkpoint written before it is kept untouched."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to `min_ratio` at `total_steps`, then flat.

    Up to `total_steps` this is torch's `SequentialLR([LinearLR(1/w, 1, w - 1), CosineAnnealingLR(T - w, min)], [w])`
    (tests/test_train_ux.py checks it to 1e-12). It is kept as one `LambdaLR` because torch's cosine is periodic: past
    `total_steps` it climbs back towards the peak, and a run continued past `model.lr_decay_steps` must stay at the
    floor. A `LambdaLR`'s state is its step count alone, so a resumed run recomputes the same rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LMModule(L.LightningModule):
    """Next-token training of a `HopeLM` built from `config` (the fields of `hope.HopeConfig`).

    Args:
        config: `HopeConfig` fields (a dict; Hydra passes its node); with `preset`, overrides of the preset.
        preset, size: a named architecture and size of `hope.preset` ("transformer", "titans", "hope_attention",
            "hope"; "tiny" | "small" | "base" | depth); `None` builds `HopeConfig(**config)` directly.
        vocab_size: overrides `config["vocab_size"]` (the trainer passes the tokenizer's).
        optimizer: a name of `hope.optim.build_optimizer` ("adamw" default, "muon", "m3", …).
        lr, weight_decay, betas: optimizer hyper-parameters; 1-D parameters (norm gains) and embeddings get no
            weight decay.
        optimizer_kwargs: extra keyword arguments for the optimizer.
        warmup_steps, min_lr_ratio: warm-up + cosine schedule down to `min_lr_ratio·lr`.
        lr_decay_steps: length of the schedule; `None` = `trainer.max_steps`. Set it when a run is stopped early
            on purpose (`trainer.max_steps` smaller) and resumed later, so both parts follow one schedule.
        compile: compile the model in place with `torch.compile` (`hope.models.lm.compile_model`: the whole
            Transformer++, the self-modifying cores of HOPE; other cores stay eager). Same results to fp32
            round-off; the first steps pay the compilation.
        token_bytes: `[V]` UTF-8 byte length of each token id, for bits per byte (set by the trainer).
    """

    # read by Lightning's ThroughputMonitor: FLOPs are not counted (the inner-loop writes' backward is data-dependent
    # in cost), so it logs tokens/s and no MFU
    flops_per_batch = None

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        preset: str | None = None,
        size: str | int = "small",
        vocab_size: int | None = None,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        optimizer_kwargs: dict[str, Any] | None = None,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        lr_decay_steps: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        config = dict(config or {})
        if vocab_size is not None:
            config["vocab_size"] = int(vocab_size)
        self.save_hyperparameters()
        self.model_config = make_preset(preset, size, **config) if preset else HopeConfig(**config)
        self.model = HopeLM(self.model_config)
        if compile:
            compile_model(self.model)  # in place: the state dict keeps its keys
        ones = torch.ones(self.model_config.vocab_size, dtype=torch.long)
        self.register_buffer("token_bytes", ones, persistent=False)
        self._stream_state: StreamState | None = None
        self._saved_stream_state: dict[str, Any] | None = None
        self._warned_not_streams = False
        self._window_end = None
        self._eval_sums: dict[str, torch.Tensor] = {}

    def set_token_bytes(self, token_bytes: torch.Tensor) -> None:
        if token_bytes.shape != (self.model_config.vocab_size,):
            raise ValueError(
                f"token_bytes has shape {tuple(token_bytes.shape)}, expected ({self.model_config.vocab_size},)"
            )
        self.token_bytes = token_bytes.to(self.token_bytes.device, torch.long)

    def forward(self, input_ids: torch.Tensor, state: StreamState | None = None):
        return self.model(input_ids, state)

    def _loss(self, batch: dict[str, torch.Tensor], state: StreamState | None, score_last: bool = True):
        out = self(batch["input_ids"], state)
        labels = batch["labels"]  # [B, T]; -100 marks unscored positions (synthetic tasks)
        if not score_last:
            labels = torch.cat([labels[:, :-1], torch.full_like(labels[:, -1:], -100)], dim=1)
        scored = labels >= 0
        loss_sum = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        n_bytes = (self.token_bytes[labels.clamp_min(0)] * scored).sum()
        return loss_sum, int(scored.sum()), n_bytes, out.state

    def _carried_state(self, batch: dict[str, torch.Tensor]) -> StreamState | None:
        """The state each batch row carries from the previous batch (`persist`), checked against the batch's
        stream position when the data are streams (`data.stream`)."""
        if self._saved_stream_state is not None:
            self._stream_state = self.model.import_state(self._saved_stream_state)
            self._saved_stream_state = None
        state, pos = self._stream_state, batch.get("stream_pos")
        if pos is None:
            if not self._warned_not_streams:
                self._warned_not_streams = True
                warnings.warn("model persist=true carries each batch row's state into the next batch, but the data "
                              "are not streams (data.stream=false): every state meets unrelated text. Use data=stream.",
                              stacklevel=2)
            return state
        if state is None:  # a fresh run, or one resumed from a checkpoint without a carried state
            state = self.model.init_state(pos.shape[0], pos.device)
            state.pos = pos.clone()
        elif not torch.equal(state.pos, pos):
            raise ValueError(f"the carried state is at stream positions {state.pos.tolist()} but the batch starts at "
                             f"{pos.tolist()}: a stream run must resume with the batch size and world size it began "
                             "with")
        return state

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        state = self._carried_state(batch) if self.model_config.persist else None
        # On streams the window's last prediction, whose target opens the next window, is left out of the outer
        # loss (it is then the sum of exactly the losses the CMS chunks hold), so that the outer backward also gives
        # the gradients of the CMS writes due at the window's end: no backward of their own (`WindowEnd`).
        stream = state is not None and "stream_pos" in batch
        loss_sum, n_tokens, n_bytes, state = self._loss(batch, state, score_last=not stream)
        if stream:
            self._window_end = (self.model.detach_after_backward(state), n_tokens)
        elif self.model_config.persist:
            self._stream_state = self.model.detach_state(state)
        loss = loss_sum / max(n_tokens, 1)
        if not torch.isfinite(loss):
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLossError(
                f"non-finite training loss {loss.item()} at step {self.global_step}; stopped without saving. "
                f"Last good checkpoint: {ckpt}. Lower model.lr or raise warm-up."
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/bpb", loss_sum.detach() / (math.log(2) * n_bytes))
        self.log("train/tokens", float(n_tokens), reduce_fx="sum")
        return loss

    def on_after_backward(self) -> None:
        """Finish the stream's window: the CMS writes due at its end, from the gradients the backward left
        (the loss was a mean over `n` losses, possibly scaled by a mixed-precision grad scaler)."""
        if self._window_end is None:
            return
        end, n = self._window_end
        scaler = getattr(getattr(self.trainer, "precision_plugin", None), "scaler", None)
        scale = n / scaler.get_scale() if scaler is not None else n
        self._stream_state, self._window_end = end.finish(scale), None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # before clipping. Not Lightning's `grad_norm`: it gathers one norm per parameter into a host-side list
        # (a device sync per parameter on a GPU) and logs every parameter's norm; torch's foreach norm stays on device.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        loss_sum, n_tokens, n_bytes, _ = self._loss(batch, None)
        sums = self._eval_sums.setdefault(prefix, torch.zeros(3, dtype=torch.float64, device=self.device))
        sums += torch.stack([loss_sum.detach().double(), torch.tensor(float(n_tokens), device=self.device,
                             dtype=torch.float64), n_bytes.double()])

    def _eval_epoch_end(self, prefix: str) -> None:
        sums = self._eval_sums.pop(prefix, None)
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        loss = sums[0] / sums[1]
        self.log(f"{prefix}/loss", loss.float(), prog_bar=prefix == "val", sync_dist=False)
        self.log(f"{prefix}/ppl", torch.exp(loss).float())
        self.log(f"{prefix}/bpb", (sums[0] / (math.log(2) * sums[2])).float(), prog_bar=prefix == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        from hope.optim import build_optimizer

        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
        # named, so that LearningRateMonitor logs "train/lr/decay" and "train/lr/no_decay"
        groups = [{"params": decay, "weight_decay": hp.weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        if hp.optimizer in ("muon", "m3"):
            # embeddings (and the tied head) are lookup tables, not linear maps: element-wise fallback, no NS
            groups[1]["matrix"] = False
        kwargs = dict(hp.optimizer_kwargs or {})
        if hp.optimizer in ("adamw", "adam", "adam_memory"):
            kwargs.setdefault("betas", tuple(hp.betas))
        opt = build_optimizer(hp.optimizer, groups, lr=hp.lr, weight_decay=hp.weight_decay, **kwargs)
        total = hp.lr_decay_steps or self.trainer.max_steps
        if not total or total <= 0:
            raise ValueError(f"set trainer.max_steps or model.lr_decay_steps for the LR schedule, got {total!r}")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if self.model_config.persist and self._stream_state is not None:
            checkpoint["stream_state"] = self.model.export_state(self._stream_state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        if "stream_state" in checkpoint:
            # imported at the first training step: Lightning loads the weights after this hook, and the carried
            # fast weights θ_0 − Δ must be built from the trained θ_0
            self._saved_stream_state = checkpoint["stream_state"]
        trainer = self._trainer
        if trainer is not None:
            rerun_pending_validation(checkpoint, trainer.val_check_interval, trainer.limit_val_batches,
                                     trainer.max_steps)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None and hasattr(dm, "set_resume_batch"):
            dm.set_resume_batch(int(checkpoint["global_step"]) * int(trainer.accumulate_grad_batches))
