"""Momentum memories with an ℓ2 inner objective: delta momentum (eqs. 48–49) and deep momentum, DMGD (eq. 50).

Legend: B batch (any leading dims), R rows, K row width (last dim), H hidden width of the deep memory. A gradient
`[..., R, K]` is read as R rows of width K whose leading dims are batch; a 1-D gradient `[K]` is one row `[1, K]`.
Sign convention as in the whole package: the caller applies θ ← θ − lr·d.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hope.optim.base import State, as_rows, check_grad, check_int, check_positive, check_retention
from hope.optim.elementwise import PRECONDITIONERS, init_preconditioner, precondition


def _tiny(x: torch.Tensor) -> float:
    """Smallest positive normal of x's dtype: guards 0/0 when a gradient is exactly zero (the quotient is then 0)."""
    return torch.finfo(x.dtype).tiny


@dataclass(frozen=True)
class DeltaMomentumRule:
    """Delta momentum: the momentum memory minimises an ℓ2 (delta-rule) objective instead of ⟨m, g⟩ (eqs. 48–49).

        m_t = m_{t−1} (β I − ζ'_t G_tᵀ G_t) + P_t g_t,     ζ'_t = ζ / (1 + ζ ‖G_t‖_F²)          d_t = m_t

    | symbol | meaning |
    |---|---|
    | G_t | the gradient as rows `[..., R, K]`; Gᵀ G `[..., K, K]` is its Gram matrix over the row width |
    | m | momentum memory, same shape as the gradient |
    | β | `beta`, retention in [0, 1) (the paper's forget gate α) |
    | ζ | `erase` >= 0, step on the ℓ2 term, in units of 1/‖g‖²: how fast large gradients erase the memory |
    | P_t | value map, as in `PreconditionedMomentumRule` (`preconditioner` "identity" default, or "rms") |

    Derivation: the ℓ2 objective ½‖m Gᵀ − P‖² (eq. 48; the memory read with the gradient rows as keys) splits into
    the erase term ½‖m Gᵀ‖² and the write of P g. A proximal (implicit) step on the erase term, min_m ½‖m Gᵀ‖² +
    1/(2ζ)‖m − β m_{t−1}‖², is β m_{t−1} (I + ζ GᵀG)⁻¹; for a rank-1 gradient Sherman–Morrison gives exactly
    β m_{t−1}(I − ζ' g gᵀ) with ζ' = ζ / (1 + ζ‖g‖²), the same normalisation the paper uses for DGD (eqs. 56–57).
    For matrices we keep that closed form with ‖G‖_F² (exact for rank 1). We fold β into the erase factor as the
    paper does (α I − …) rather than multiplying it: along each right singular vector of G the factor is
    β − ζσ_i²/(1 + ζ‖G‖_F²) ∈ (β − 1, β], stable for any ζ and any gradient scale.

    This is the paper's "gradient-dependent weight decay" (Figure 4's explanation): a small gradient leaves the
    momentum almost untouched (ζ' ‖g‖² ≈ ζ‖g‖²), a large one erases the memory along its direction (→ 1). The two
    printed versions disagree (arXiv eq. 49: m (α − gᵀg), right side; NeurIPS eq. 22: (α I − g gᵀ) m, left side)
    and neither bounds the erase, whose factor α − ‖g‖² leaves [−1, 1] once ‖g‖² > 1 + α. We keep the arXiv side
    (the row space, as DGD's m (I − x xᵀ)) and the bounded step above. ζ = 0 recovers (preconditioned) momentum.
    """

    beta: float = 0.9
    erase: float = 1.0
    preconditioner: str = "identity"
    beta2: float = 0.99
    eps: float = 1e-8
    elementwise: bool = False

    def __post_init__(self) -> None:
        check_retention("beta", self.beta)
        check_retention("beta2", self.beta2)
        check_positive("eps", self.eps)
        check_positive("erase", self.erase, allow_zero=True)
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")

    def init_state(self, param: torch.Tensor) -> State:
        as_rows(param)
        return {"momentum": torch.zeros_like(param), **init_preconditioner(self.preconditioner, param)}

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        check_grad(state, "momentum", grad)
        value, pre = precondition(self.preconditioner, state, grad, self.beta2, self.eps)
        m, G = as_rows(state["momentum"]), as_rows(grad)  # [..., R, K]
        # m GᵀG, associated on the cheaper side: (m Gᵀ) G costs R²K, m (GᵀG) costs RK².
        erase = (m @ G.mT) @ G if G.shape[-2] <= G.shape[-1] else m @ (G.mT @ G)  # [..., R, K]
        step = self.erase / (1 + self.erase * G.square().sum(dim=(-2, -1), keepdim=True))  # ζ'  # [..., 1, 1]
        m = (self.beta * m - step * erase).reshape(grad.shape) + value
        return {"momentum": m, **pre}, m


def deep_memory_loss(w1: torch.Tensor, w2: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """DMGD's inner objective L⁽²⁾ = ½ Σ_r ‖W1 tanh(W2 k_r) − u_r‖², summed over leading batch dims too.

    Shapes: w1 `[..., K, H]`, w2 `[..., H, K]`, keys and values `[..., R, K]`. Used by tests as the
    `torch.func.grad` reference for `deep_memory_grads`.
    """
    pred = torch.tanh(keys @ w2.mT) @ w1.mT  # [..., R, K]
    return 0.5 * (pred - values).square().sum()


def deep_memory_grads(
    w1: torch.Tensor, w2: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form ∂L⁽²⁾/∂W1 `[..., K, H]`, ∂L⁽²⁾/∂W2 `[..., H, K]` and the hidden features h `[..., R, H]`."""
    h = torch.tanh(keys @ w2.mT)  # [..., R, H]
    err = h @ w1.mT - values  # [..., R, K]
    g1 = err.mT @ h  # [..., K, H]
    g2 = ((err @ w1) * (1 - h * h)).mT @ keys  # [..., H, K]
    return g1, g2, h


@dataclass(frozen=True, eq=False)
class DeepMomentumRule:
    """Deep Momentum Gradient Descent (DMGD, eq. 50): the momentum is an MLP memory trained by its own inner loss.

        keys k_r = g_r / ‖g_r‖, values u_r = g_r            (the gradient's rows, r = 1…R)
        M_φ(k) = W1 tanh(W2 k)                               φ = (W1 `[K, H]`, W2 `[H, K]`), one per matrix
        W1 ← β W1 − ζ ∇_{W1} L⁽²⁾ / λ_max(Σ_r h_r h_rᵀ)      L⁽²⁾ = ½ Σ_r ‖M_φ(k_r) − u_r‖²,  h_r = tanh(W2 k_r)
        W2 ←   W2 − ζ ∇_{W2} L⁽²⁾ / (‖W1‖_F² Σ_r ‖k_r‖²)      (both gradients at the old φ)
        d_r = M_φ'(k_r)                                      read with the updated memory (read after write)

    | symbol | meaning |
    |---|---|
    | β | `beta`, retention of W1 (the value store) in [0, 1); W2 (the addressing) is not decayed |
    | ζ | `inner_lr` in (0, 1 + β]: the inner step, normalised by a curvature bound of each layer |
    | H | `hidden`, width of the memory |
    | φ_0 | `initial_weights` (W1_0, W2_0), e.g. `nn.Parameter`s a CMS meta-learns; default W1_0 = 0 and W2_0 ~ N(0, 1)
    |   | drawn from `seed` (unit keys then give O(1) pre-activations) |

    Our reading: eq. 50 replaces eq. 33's linear momentum by an MLP updated with an internal objective and leaves
    keys, values and loss open ("need to be designed carefully"). We take the ℓ2 objective of delta momentum, with
    the gradient's direction as key and the gradient as value: the memory is a momentum addressed by direction, so
    gradients from an orthogonal subspace (eq. 45's continual setting) do not overwrite what it holds for another.
    The step normalisations bound each layer's curvature: L⁽²⁾ is quadratic in W1 with Hessian (Σ_r h_r h_rᵀ) ⊗ I,
    so along every direction W1's factor lies in [β − ζ, β]; for W2, ‖W1‖_F² Σ_r ‖k_r‖² bounds the Gauss–Newton
    curvature (|tanh'| ≤ 1), so the addressing learns slowly and safely. Stable at any gradient scale. For one row
    and a constant gradient the read-out converges to ζ/(1 − β + ζ)·g, an exponential average. All rows of a matrix
    share φ (leading dims are batch).
    """

    beta: float = 0.9
    inner_lr: float = 0.5
    hidden: int = 16
    initial_weights: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    seed: int = 0
    eps: float = 1e-12
    elementwise: bool = False

    def __post_init__(self) -> None:
        check_retention("beta", self.beta)
        check_int("hidden", self.hidden, 1)
        check_positive("eps", self.eps)
        if not isinstance(self.inner_lr, (int, float)) or not 0.0 < self.inner_lr <= 1.0 + self.beta:
            raise ValueError(f"inner_lr must be in (0, 1 + beta] = (0, {1 + self.beta}], got {self.inner_lr!r}")

    def init_state(self, param: torch.Tensor) -> State:
        rows = as_rows(param)
        lead, K = rows.shape[:-2], rows.shape[-1]
        if self.initial_weights is None:
            gen = torch.Generator().manual_seed(self.seed)
            w1 = torch.zeros(K, self.hidden)
            w2 = torch.randn(self.hidden, K, generator=gen)
        else:
            w1, w2 = self.initial_weights
            if tuple(w1.shape) != (K, self.hidden) or tuple(w2.shape) != (self.hidden, K):
                raise ValueError(
                    f"initial_weights must have shapes ({K}, {self.hidden}) and ({self.hidden}, {K}) for a parameter "
                    f"of shape {tuple(param.shape)}, got {tuple(w1.shape)} and {tuple(w2.shape)}"
                )
        like = dict(dtype=param.dtype, device=param.device)
        return {"w1": w1.to(**like).expand(*lead, K, self.hidden).clone(),
                "w2": w2.to(**like).expand(*lead, self.hidden, K).clone()}  # fmt: skip

    def update(self, state: State, grad: torch.Tensor) -> tuple[State, torch.Tensor]:
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise TypeError(f"grad must be a floating-point tensor, got {type(grad).__name__}")
        G = as_rows(grad)  # [..., R, K]
        w1, w2 = state["w1"], state["w2"]
        if G.shape[:-2] != w1.shape[:-2] or G.shape[-1] != w1.shape[-2]:
            raise ValueError(f"grad shape {tuple(grad.shape)} does not match the memory W1 {tuple(w1.shape)}")
        keys = G / (G.norm(dim=-1, keepdim=True) + self.eps)  # [..., R, K]
        g1, g2, h = deep_memory_grads(w1, w2, keys, G)
        gram = h.mT @ h  # [..., H, H]; eigvalsh has no half-precision kernels, so those go through fp32
        curv1 = torch.linalg.eigvalsh(gram.to(torch.promote_types(gram.dtype, torch.float32)))[..., -1:, None]
        curv1 = curv1.to(h.dtype).clamp_min(_tiny(h))  # λ_max(Σ_r h_r h_rᵀ)  # [..., 1, 1]
        curv2 = w1.square().sum(dim=(-2, -1), keepdim=True) * keys.square().sum(dim=(-2, -1), keepdim=True)
        w1 = self.beta * w1 - (self.inner_lr / curv1) * g1
        w2 = w2 - (self.inner_lr / curv2.clamp_min(_tiny(w1))) * g2
        direction = torch.tanh(keys @ w2.mT) @ w1.mT  # [..., R, K]
        return {"w1": w1, "w2": w2}, direction.reshape(grad.shape)
