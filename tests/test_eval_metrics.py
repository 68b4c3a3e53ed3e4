"""Continual-learning metrics on hand-computed matrices (N tasks; R[i][j] = score on task j after task i)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hope.eval import continual_metrics

# Accuracies, higher is better. Task 0 peaks *after* task 1 (0.85 > 0.80), so max-based forgetting differs from -BWT.
R_ACC = [
    [0.80, 0.10, 0.20],
    [0.85, 0.90, 0.30],
    [0.70, 0.50, 0.95],
]
B_ACC = [0.10, 0.20, 0.10]

# Losses, lower is better. Task 1's loss before training on it (3.0) is its worst, so the "best" score is a min.
R_LOSS = [
    [1.0, 3.0, 3.0],
    [1.5, 0.8, 2.9],
    [2.0, 1.2, 0.5],
]
B_LOSS = [3.2, 3.1, 3.0]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_accuracy_matrix_by_hand():
    m = continual_metrics(R_ACC, baseline=B_ACC)
    # A   = (0.70 + 0.50 + 0.95) / 3                          = 0.716666...
    assert _close(m["average_accuracy"], 2.15 / 3)
    # BWT = ((0.70 - 0.80) + (0.50 - 0.90)) / 2               = -0.25
    assert _close(m["backward_transfer"], -0.25)
    # FWT = ((R01 - b1) + (R12 - b2)) / 2 = ((0.10 - 0.20) + (0.30 - 0.10)) / 2 = 0.05
    assert _close(m["forward_transfer"], 0.05)
    # f_0 = max(0.80, 0.85) - 0.70 = 0.15 ; f_1 = max(0.10, 0.90) - 0.50 = 0.40 ; F = 0.275
    assert np.allclose(m["forgetting_per_task"], [0.15, 0.40], rtol=0, atol=1e-12)
    assert _close(m["average_forgetting"], 0.275)
    # A_0 = 0.80 ; A_1 = (0.85 + 0.90) / 2 = 0.875 ; A_2 = 2.15 / 3 ; AIA = mean of the three
    assert np.allclose(m["incremental_accuracy"], [0.80, 0.875, 2.15 / 3], rtol=0, atol=1e-12)
    assert _close(m["average_incremental_accuracy"], (0.80 + 0.875 + 2.15 / 3) / 3)
    assert m["num_tasks"] == 3 and m["higher_is_better"] is True


def test_loss_matrix_signs_flip():
    m = continual_metrics(R_LOSS, baseline=B_LOSS, higher_is_better=False)
    # A   = (2.0 + 1.2 + 0.5) / 3 = 1.2333... (a plain average loss, no sign flip)
    assert _close(m["average_accuracy"], 3.7 / 3)
    # BWT = -((2.0 - 1.0) + (1.2 - 0.8)) / 2 = -0.7   (losses went up: negative = forgot)
    assert _close(m["backward_transfer"], -0.7)
    # FWT = -((3.0 - 3.1) + (2.9 - 3.0)) / 2 = +0.1   (losses below the untrained model's: positive = helped)
    assert _close(m["forward_transfer"], 0.1)
    # f_0 = 2.0 - min(1.0, 1.5) = 1.0 ; f_1 = 1.2 - min(3.0, 0.8) = 0.4 ; F = 0.7
    assert np.allclose(m["forgetting_per_task"], [1.0, 0.4], rtol=0, atol=1e-12)
    assert _close(m["average_forgetting"], 0.7)
    # A_0 = 1.0 ; A_1 = (1.5 + 0.8) / 2 = 1.15 ; A_2 = 3.7 / 3
    assert _close(m["average_incremental_accuracy"], (1.0 + 1.15 + 3.7 / 3) / 3)


def test_no_forgetting_no_transfer():
    # Each task scores 1.0 from the stage it is learned on and keeps it; 0.5 (chance) before.
    r = np.where(np.tril(np.ones((4, 4))) > 0, 1.0, 0.5)
    m = continual_metrics(r, baseline=[0.5] * 4)
    assert m["backward_transfer"] == 0.0 and m["average_forgetting"] == 0.0 and m["forward_transfer"] == 0.0
    assert m["average_accuracy"] == 1.0 and m["average_incremental_accuracy"] == 1.0


def test_input_types_agree():
    ref = continual_metrics(R_ACC, baseline=B_ACC)
    for r, b in [(np.array(R_ACC), np.array(B_ACC)), (torch.tensor(R_ACC), torch.tensor(B_ACC))]:
        m = continual_metrics(r, baseline=b)
        for key in ("average_accuracy", "backward_transfer", "forward_transfer", "average_forgetting"):
            assert math.isclose(m[key], ref[key], rel_tol=1e-6), key  # torch default float32 storage


def test_single_task_has_no_transfer():
    m = continual_metrics([[0.4]])
    assert m["average_accuracy"] == 0.4 and m["average_incremental_accuracy"] == 0.4
    assert m["backward_transfer"] is None and m["average_forgetting"] is None and m["forward_transfer"] is None


def test_fwt_needs_baseline():
    assert continual_metrics(R_ACC)["forward_transfer"] is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "square"),
        ([], "2-D"),
        ([[]], "empty"),
        ([1.0, 2.0], "2-D"),
        ([[1.0, float("nan")], [1.0, 1.0]], r"R\[0\]\[1\] = nan"),
        ([[1.0, 0.0], [float("inf"), 1.0]], r"R\[1\]\[0\] = inf"),
        ([[1.0, 2.0], [3.0]], "rectangular"),
    ],
)
def test_bad_matrix_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(bad)


def test_bad_baseline_and_flags_raise():
    with pytest.raises(ValueError, match="one score per task"):
        continual_metrics(R_ACC, baseline=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"baseline\[2\] = nan"):
        continual_metrics(R_ACC, baseline=[0.1, 0.2, float("nan")])
    with pytest.raises(TypeError, match="string"):
        continual_metrics("abc")
    with pytest.raises(TypeError, match="higher_is_better"):
        continual_metrics(R_ACC, higher_is_better="yes")
