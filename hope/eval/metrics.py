"""Continual-learning metrics computed from a task-by-task score matrix.

Dimensions: N number of tasks (rows: training stages, columns: evaluated tasks).

Symbols used in every formula below:

| symbol  | meaning                                                                  |
|---------|--------------------------------------------------------------------------|
| R_{i,j} | score on task j after training on tasks 0..i (row i, column j), 0-based  |
| N       | number of tasks; R is N x N                                              |
| b_j     | score on task j of the model before any training (random init)           |
| s       | orientation: +1 when higher is better (accuracy), -1 when lower is       |
|         | better (loss, perplexity)                                                |

The metrics and their sources:

- average accuracy        A   = (1/N) Σ_j R_{N-1,j}                      (Lopez-Paz & Ranzato 2017, "GEM")
- backward transfer       BWT = (s/(N-1)) Σ_{j<N-1} (R_{N-1,j} − R_{j,j})  (Lopez-Paz & Ranzato 2017)
- forward transfer        FWT = (s/(N-1)) Σ_{j≥1} (R_{j-1,j} − b_j)        (Lopez-Paz & Ranzato 2017)
- average forgetting      F   = (1/(N-1)) Σ_{j<N-1} f_j,
      f_j = max_{l<N-1} s·R_{l,j} − s·R_{N-1,j}                           (Chaudhry et al. 2018, "RWalk", eq. 9)
- average incremental accuracy
                          AIA = (1/N) Σ_i A_i,  A_i = (1/(i+1)) Σ_{j≤i} R_{i,j}   (Rebuffi et al. 2017, "iCaRL")

Orientation. With s = -1 (losses) A and AIA stay plain averages of the scores (an average loss), while BWT, FWT
and F are multiplied by s so that their meaning does not depend on the kind of score: BWT > 0 and FWT > 0 always
mean "helped" (a loss went down), F > 0 always means "forgot" (the final score is worse than the best score that
task ever had, i.e. for losses the final loss is above the lowest loss seen before the last stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["continual_metrics", "as_score_matrix"]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a list / numpy array / torch tensor of numbers to float64 numpy, with readable errors."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; avoid importing torch for numpy users
        x = x.detach().cpu().double().numpy()
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a matrix of numbers, got the string {x!r}")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError) as err:  # ragged lists, non-numeric entries
        raise ValueError(f"{name} must be a rectangular array of numbers, got {x!r} ({err})") from err
    return arr


def as_score_matrix(R: Any) -> np.ndarray:
    """Validate and return the score matrix R as a float64 array of shape [N, N].

    Raises `ValueError` for an empty, non-2-D, non-square or non-finite matrix; the message names the value.
    """
    arr = _to_numpy(R, "R")
    if arr.ndim != 2:
        raise ValueError(f"R must be 2-D (tasks trained x tasks evaluated), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"R must not be empty, got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"R must be square (one row per training stage, one column per task), got shape {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        i, j = bad[0]
        raise ValueError(f"R must be finite, got R[{i}][{j}] = {arr[i, j]}")
    return arr


def _as_baseline(baseline: Any, n: int) -> np.ndarray:
    b = _to_numpy(baseline, "baseline")
    if b.shape != (n,):
        raise ValueError(f"baseline must hold one score per task ({n}), got {baseline!r}")
    bad = np.flatnonzero(~np.isfinite(b))
    if len(bad):
        raise ValueError(f"baseline must be finite, got baseline[{bad[0]}] = {b[bad[0]]}")
    return b


def continual_metrics(
    R: Sequence[Sequence[float]] | Any,
    baseline: Sequence[float] | Any | None = None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """Average accuracy, BWT, FWT, forgetting and average incremental accuracy of a score matrix.

    Formulas (symbols in the module docstring; s = +1 if `higher_is_better` else -1):

        A   = (1/N) Σ_j R[N-1, j]                                  average accuracy (final row)
        BWT = s/(N-1) Σ_{j<N-1} (R[N-1, j] − R[j, j])              backward transfer; < 0 means forgetting
        FWT = s/(N-1) Σ_{j≥1} (R[j-1, j] − b[j])                   forward transfer (needs `baseline`)
        F   = 1/(N-1) Σ_{j<N-1} max_{l<N-1} (s R[l, j] − s R[N-1, j])   average (max-based) forgetting
        AIA = 1/N Σ_i (1/(i+1)) Σ_{j≤i} R[i, j]                    average incremental accuracy

    Args:
        R: N x N scores; R[i][j] is the score on task j after learning task i (list of lists, numpy or tensor).
        baseline: length-N scores of the untrained model on each task; FWT is None without it.
        higher_is_better: False for losses/perplexities; flips the sign of BWT, FWT and F (not of A, AIA) so
            that BWT, FWT > 0 mean improvement and F > 0 means forgetting for every kind of score.

    Returns:
        dict with `average_accuracy`, `backward_transfer`, `forward_transfer`, `average_forgetting`,
        `average_incremental_accuracy` (floats; BWT, FWT and F are None when N = 1, FWT also without a
        baseline), `forgetting_per_task` (list of N-1 floats), `incremental_accuracy` (list of the N A_i),
        `num_tasks` and `higher_is_better`.
    """
    if not isinstance(higher_is_better, (bool, np.bool_)):
        raise TypeError(f"higher_is_better must be a bool, got {higher_is_better!r}")
    arr = as_score_matrix(R)
    n = arr.shape[0]
    s = 1.0 if higher_is_better else -1.0
    b = None if baseline is None else _as_baseline(baseline, n)

    final = arr[n - 1]  # [N]
    incremental = [float(arr[i, : i + 1].mean()) for i in range(n)]  # A_i, the mean over the tasks seen so far
    out: dict[str, Any] = {
        "num_tasks": n,
        "higher_is_better": bool(higher_is_better),
        "average_accuracy": float(final.mean()),
        "average_incremental_accuracy": float(np.mean(incremental)),
        "incremental_accuracy": incremental,
        "backward_transfer": None,
        "forward_transfer": None,
        "average_forgetting": None,
        "forgetting_per_task": [],
    }
    if n == 1:  # no earlier task to forget or to transfer from
        return out

    diag = np.diag(arr)[: n - 1]  # [N-1] score on each task right after learning it
    out["backward_transfer"] = float(s * (final[: n - 1] - diag).mean())
    # Best score each old task had at any stage before the last one (Chaudhry et al. 2018: max over l < N-1).
    best = (s * arr[: n - 1, : n - 1]).max(axis=0)  # [N-1]
    forgetting = best - s * final[: n - 1]  # [N-1]
    out["forgetting_per_task"] = [float(f) for f in forgetting]
    out["average_forgetting"] = float(forgetting.mean())
    if b is not None:
        before = np.array([arr[j - 1, j] for j in range(1, n)])  # [N-1] score on task j before training on it
        out["forward_transfer"] = float(s * (before - b[1:]).mean())
    return out
