"""Evaluation: continual-learning metrics and model-agnostic continual-learning baselines."""

from hope.eval.continual import EWC, IGNORE_INDEX, ReplayBuffer, lm_loss, logits_of, windowed_logits
from hope.eval.metrics import as_score_matrix, continual_metrics

__all__ = [
    "EWC", "IGNORE_INDEX", "ReplayBuffer", "as_score_matrix", "continual_metrics", "lm_loss", "logits_of",
    "windowed_logits",
]
