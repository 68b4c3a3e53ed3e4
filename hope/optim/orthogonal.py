"""Nonlinear outputs: Newton–Schulz orthogonalisation, Muon (eqs. 42–44, 52) and M3 (Algorithm 1, eq. 75).

Legend: B batch (any leading dims), R rows, K columns; every tensor here is `[..., R, K]` and the last two dims
are the matrix. Sign convention as in the whole package: the caller applies θ ← θ − lr·d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hope.optim.base import State, check_grad, check_int, check_matrix, check_positive, check_retention

# (a, b, c) of X ← a X + (b A + c A²) X with A = X Xᵀ. "cubic" is the classic Newton–Schulz iteration for the
# polar factor (eq. 44 without its proximal term O − g, step ζ = 1/4); "quintic" is the steeper polynomial
# popularised by Muon (K. Jordan et al., 2024), which trades exactness (σ lands in a band around 1, not on 1) for
# speed on small singular values.
NS_COEFFICIENTS = {"cubic": (1.5, -0.5, 0.0), "quintic": (3.4445, -4.7750, 2.0315)}
MUON_SCALES = ("rms", "shape")


def newton_schulz(x: torch.Tensor, steps: int = 5, coefficients: str = "quintic", eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U Vᵀ of x = U Σ Vᵀ, batched over leading dims.

    The paper reads Newton–Schulz as an inner memory level: one GD step on ‖Oᵀ O − I‖² per iteration (eqs. 43–44),
    started from O_0 = x / ‖x‖_F so every singular value starts in (0, 1].

    | symbol | meaning |
    |---|---|
    | x | `[..., R, K]` matrix (momentum or gradient) |
    | steps | iterations T >= 1 |
    | coefficients | "quintic" (default) or "cubic" |

    NS maps each singular value by the same scalar polynomial, so the band is exact: with "quintic" and T = 5,
    every σ_i ≥ 0.002·‖x‖_F ends in [0.68, 1.21] (smaller ones stay smaller); "cubic" converges to 1 from below
    (T = 12 reaches 1 to 1e-6 when σ_min ≥ 0.1·‖x‖_F). Computed in the input dtype, on the wide orientation (X Xᵀ
    is min(R, K)²). Returns `[..., R, K]`.
    """
    check_matrix("newton_schulz", x)
    check_int("steps", steps, 1)
    if coefficients not in NS_COEFFICIENTS:
        raise ValueError(f"coefficients must be one of {tuple(NS_COEFFICIENTS)}, got {coefficients!r}")
    a, b, c = NS_COEFFICIENTS[coefficients]
    tall = x.shape[-2] > x.shape[-1]
    X = x.mT if tall else x  # [..., min, max]
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT  # [..., min, min]
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


@dataclass(frozen=True)
class MuonRule:
    """Muon: a linear momentum memory read through a Newton–Schulz nonlinearity (eq. 52 with σ = NS, eqs. 42–44).

        m_t = β m_{t−1} + g_t          u_t = g_t + β m_t (nesterov) or m_t
        d_t = s · NS_T(u_t)

    | symbol | meaning |
    |---|---|
    | m | momentum memory `[..., R, K]` |
    | β | `beta`, retention in [0, 1) |
    | NS_T | `newton_schulz` with `ns_steps` iterations and `ns_coefficients` |
    | s | `scale`: "rms" (default) s = 0.2·sqrt(max(R, K)), so d has the ~0.2 RMS of an AdamW step and one lr serves
    |   | Muon and its element-wise fallback (Liu et al. 2025, "Muon is scalable for LLM training"); "shape"
    |   | s = sqrt(max(1, R/K)) is the original Muon convention (K. Jordan et al. 2024, used with lr ≈ 0.02) |

    Matrix-only: needs ndim >= 2 (`hope.optim.Muon` routes other parameters to an element-wise fallback).
    """

    beta: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: str = "quintic"
    scale: str = "rms"
    elementwise: bool = False

    def __post_init__(self) -> None:
        check_retention("beta", self.beta)
        check_int("ns_steps", self.ns_steps, 1)
        if self.ns_coefficients not in NS_COEFFICIENTS:
            raise ValueError(f"ns_coefficients must be one of {tuple(NS_COEFFICIENTS)}, got {self.ns_coefficients!r}")
        if self.scale not in MUON_SCALES:
            raise ValueError(f"scale must be one of {MUON_SCALES}, got {self.scale!r}")

    def init_state(self, param: torch.Tensor) -> State:
        check_matrix("muon", param)
        return {"momentum": torch.zeros_like(param)}

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        check_grad(state, "momentum", grad)
        m = self.beta * state["momentum"] + grad
        u = grad + self.beta * m if self.nesterov else m
        R, K = u.shape[-2:]
        s = 0.2 * max(R, K) ** 0.5 if self.scale == "rms" else max(1.0, R / K) ** 0.5
        return {"momentum": m}, s * newton_schulz(u, self.ns_steps, self.ns_coefficients)


@dataclass(frozen=True)
class M3Rule:
    """Multi-scale Momentum Muon (Algorithm 1, §7.2): a fast and a slow momentum, both orthogonalised, over √V.

        M1_t = β1 M1_{t−1} + g_t                              fast memory, every step
        V_t  = β2 V_{t−1} + (1 − β2) g_t²                     second moment (Adam's), every step
        S    = Σ of the gradients since the last refresh      the chunk the slow memory has not seen
        every f steps:  M2 ← β3 M2 + S,  O2 ← NS_T(M2),  S ← 0      slow memory (a CMS level of period f)
        d_t  = (NS_T(M1_t) + α O2) / (sqrt(V_t / (1 − β2^t)) + ε)

    | symbol | meaning |
    |---|---|
    | β1, β2, β3 | `betas`: retentions of M1, V, M2, each in [0, 1) |
    | α | `alpha` >= 0, weight of the slow memory's output |
    | f | `frequency`, steps between slow refreshes (Algorithm 1's f, eq. 75's Ĉ) |
    | NS_T | `newton_schulz` with `ns_steps` iterations |
    | ε | `eps` > 0 |

    Our reading (paper_notes.md §1.5): Algorithm 1 prints every accumulation as a plain sum (M ← M + β g). We read
    them as the exponential averages of the optimizers M3 combines (Adam for V, Muon for M1), with β the retention;
    NS is scale-free, so M1's and M2's write weights do not matter. O2 built at step kf serves steps kf+1…(k+1)f
    and is zero before the first refresh. As printed, the orthogonal numerator has unit scale while √V carries the
    gradient's scale, so the step grows like 1/|g| as gradients shrink: tune `lr` per model.
    """

    betas: tuple[float, float, float] = (0.95, 0.999, 0.9)
    alpha: float = 1.0
    frequency: int = 10
    eps: float = 1e-8
    ns_steps: int = 5
    ns_coefficients: str = "quintic"
    elementwise: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 3:
            raise ValueError(f"betas must be a triple (beta1, beta2, beta3), got betas={self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        for i, b in enumerate(self.betas, start=1):
            check_retention(f"beta{i}", b)
        check_positive("alpha", self.alpha, allow_zero=True)
        check_int("frequency", self.frequency, 1)
        check_positive("eps", self.eps)
        check_int("ns_steps", self.ns_steps, 1)
        if self.ns_coefficients not in NS_COEFFICIENTS:
            raise ValueError(f"ns_coefficients must be one of {tuple(NS_COEFFICIENTS)}, got {self.ns_coefficients!r}")

    def init_state(self, param: torch.Tensor) -> State:
        check_matrix("m3", param)
        z = torch.zeros_like(param)
        step = torch.zeros((), dtype=torch.float32, device=param.device)
        return {"step": step, "fast": z, "exp_avg_sq": z.clone(), "slow": z.clone(), "chunk_sum": z.clone(),
                "slow_output": z.clone()}  # fmt: skip

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        check_grad(state, "fast", grad)
        beta1, beta2, beta3 = self.betas
        step = state["step"] + 1
        t = int(step.item())  # host int: the refresh test and the bias correction (one sync per call on GPU)
        fast = state["fast"].mul(beta1).add_(grad)
        v = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        numerator = newton_schulz(fast, self.ns_steps, self.ns_coefficients).add_(
            state["slow_output"], alpha=self.alpha
        )
        direction = numerator.div_(v.sqrt().div_((1 - beta2**t) ** 0.5).add_(self.eps))
        slow, chunk_sum, slow_output = state["slow"], state["chunk_sum"] + grad, state["slow_output"]
        if t % self.frequency == 0:
            slow = beta3 * slow + chunk_sum
            slow_output = newton_schulz(slow, self.ns_steps, self.ns_coefficients)
            chunk_sum = torch.zeros_like(chunk_sum)
        new = {"step": step, "fast": fast, "exp_avg_sq": v, "slow": slow, "chunk_sum": chunk_sum}
        return {**new, "slow_output": slow_output}, direction
