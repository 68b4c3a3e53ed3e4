"""Element-wise gradient memories: SGD, momentum, Adam, preconditioned momentum (arXiv:2512.24695 §4.2, App. B).

Legend: shapes are the parameter's own, `[*shape]` (or `[B, *shape]` for per-sample CMS states); every rule here
acts on each coordinate independently, so batched states need nothing special.

Sign convention (all of `hope.optim`): `update` returns a direction d and the caller applies θ ← θ − lr·d. The
paper writes the same updates with the minus sign inside the memory (m ← α m − η ∇L, W ← W + m); here the learning
rate stays outside so one rule serves any outer step size or CMS level rate η_ℓ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hope.optim.base import State, check_grad, check_positive, check_retention

PRECONDITIONERS = ("rms", "identity")


def _step_count(param: torch.Tensor) -> torch.Tensor:
    """Step counter, a 0-d float32 tensor on the parameter's device (shared by every sample of a batch)."""
    return torch.zeros((), dtype=torch.float32, device=param.device)


@dataclass(frozen=True)
class SGDRule:
    """Plain gradient descent, the 1-level memory of eqs. 8–9: no state, d = g."""

    elementwise: bool = True

    def init_state(self, param: torch.Tensor) -> State:
        return {}

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise TypeError(f"grad must be a floating-point tensor, got {type(grad).__name__}")
        return {}, grad


@dataclass(frozen=True)
class MomentumRule:
    """Momentum as a value-less linear memory of gradients (eqs. 10–13, 33–34).

        m_t = β m_{t−1} + g_t                 d_t = m_t     (nesterov: d_t = g_t + β m_t)

    | symbol | meaning |
    |---|---|
    | g_t | gradient of the parameter |
    | m_t | the memory (momentum buffer), one GD step on min_m ⟨m, g⟩ with ℓ2 retention ⇔ β (paper: α) |
    | β | `beta`, retention in [0, 1) |

    With zero initial memory this is exactly `torch.optim.SGD(momentum=β, dampening=0, nesterov=…)`.
    """

    beta: float = 0.9
    nesterov: bool = False
    elementwise: bool = True

    def __post_init__(self) -> None:
        check_retention("beta", self.beta)
        if self.nesterov and self.beta == 0:
            raise ValueError(f"nesterov momentum needs beta > 0, got beta={self.beta!r}")

    def init_state(self, param: torch.Tensor) -> State:
        return {"momentum": torch.zeros_like(param)}

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        check_grad(state, "momentum", grad)
        m = state["momentum"].mul(self.beta).add_(grad)  # in place on a fresh tensor only: the rule stays pure
        return {"momentum": m}, (grad.add(m, alpha=self.beta) if self.nesterov else m)


@dataclass(frozen=True)
class AdamRule:
    """Adam as the element-wise associative memory of eqs. 100–105.

    The memory m solves min_m Σ_i ‖m ⊙ g_i − P‖² + λ‖m‖² (eq. 101); its optimum stacks two same-frequency memories,
    the first and second moments (eq. 102), and the choice P = H^{1/2} gives Adam (eq. 105). With retention the
    two moments are the usual exponential averages:

        M_t = β1 M_{t−1} + (1 − β1) g_t        V_t = β2 V_{t−1} + (1 − β2) g_t²
        d_t = (M_t / (1 − β1^t)) / (sqrt(V_t / (1 − β2^t)) + ε)

    | symbol | meaning |
    |---|---|
    | M, V | first / second moment memories (`exp_avg`, `exp_avg_sq`) |
    | β1, β2 | `betas`, retentions in [0, 1) |
    | ε | `eps` > 0, added after the square root (as `torch.optim.Adam`) |
    | t | `step`, shared by every sample of a batched state |

    With `bias_correction=True` this equals `torch.optim.Adam` (amsgrad off) step for step.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    bias_correction: bool = True
    elementwise: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got betas={self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        check_retention("beta1", self.betas[0])
        check_retention("beta2", self.betas[1])
        check_positive("eps", self.eps)

    def init_state(self, param: torch.Tensor) -> State:
        z = torch.zeros_like(param)
        return {"step": _step_count(param), "exp_avg": z, "exp_avg_sq": z.clone()}

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        check_grad(state, "exp_avg", grad)
        beta1, beta2 = self.betas
        step = state["step"] + 1
        m = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        v = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        if self.bias_correction:
            t = step.item()  # host floats, as torch.optim.Adam: one sync per call on GPU
            bc1, bc2_sqrt = 1 - beta1**t, (1 - beta2**t) ** 0.5
            direction = m.div(v.sqrt().div_(bc2_sqrt).add_(self.eps)).div_(bc1)
        else:
            direction = m.div(v.sqrt().add_(self.eps))
        return {"step": step, "exp_avg": m, "exp_avg_sq": v}, direction


@dataclass(frozen=True)
class PreconditionedMomentumRule:
    """Momentum whose memory stores preconditioned gradients P_t g_t (eqs. 46–47, "more expressive association").

        V_t = β2 V_{t−1} + (1 − β2) g_t²       P_t = diag(1 / (sqrt(V_t) + ε))     ("rms"; "identity": P_t = I)
        m_t = β m_{t−1} + P_t g_t              d_t = m_t

    | symbol | meaning |
    |---|---|
    | m | the momentum memory; eq. 47's forget gate α is β here (the paper's text includes it, its formula drops it) |
    | P_t | the value map: the paper leaves it open; "rms" is an element-wise memory of g² (its own inner level) |
    | β, β2 | `beta`, `beta2`: retentions in [0, 1) |
    | ε | `eps` > 0 |

    With "rms" this equals `torch.optim.RMSprop(alpha=β2, eps=ε, momentum=β, centered=False)`; with "identity" it
    is `MomentumRule`.
    """

    beta: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    preconditioner: str = "rms"
    elementwise: bool = True

    def __post_init__(self) -> None:
        check_retention("beta", self.beta)
        check_retention("beta2", self.beta2)
        check_positive("eps", self.eps)
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")

    def init_state(self, param: torch.Tensor) -> State:
        return {"momentum": torch.zeros_like(param), **init_preconditioner(self.preconditioner, param)}

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        check_grad(state, "momentum", grad)
        value, pre = precondition(self.preconditioner, state, grad, self.beta2, self.eps)
        m = state["momentum"].mul(self.beta).add_(value)
        return {"momentum": m, **pre}, m


def init_preconditioner(kind: str, param: torch.Tensor) -> State:
    """State of the value map P: an element-wise second-moment memory for "rms", nothing for "identity"."""
    return {"square_avg": torch.zeros_like(param)} if kind == "rms" else {}


def precondition(kind: str, state: State, grad: torch.Tensor, beta2: float, eps: float) -> tuple[torch.Tensor, State]:
    """The value P_t g_t written into a momentum memory, and the preconditioner's new state."""
    if kind == "identity":
        return grad, {}
    v = state["square_avg"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    return grad.div(v.sqrt().add_(eps)), {"square_avg": v}
