"""Evaluation: continual-learning metrics and model-agnostic continual-learning baselines."""

from hope.eval.metrics import as_score_matrix, continual_metrics

__all__ = ["as_score_matrix", "continual_metrics"]
