"""SwiGLU MLP whose weights may be per-sample fast weights (a CMS level reads them from its state).

Legend: B batch, T time, D model width, F hidden width.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """`(silu(x W_gate) ⊙ x W_up) W_down` with weights either shared `[D, F]` or per sample `[B, D, F]`."""
    h = F.silu(x @ w_gate) * (x @ w_up)  # [B, T, F]
    return h @ w_down  # [B, T, D]


def _engine_needs(node) -> bool:
    """Whether the backward now running will execute `node` (True where torch cannot tell)."""
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _FastMatmul(torch.autograd.Function):
    """`x @ W` with per-sample fast weights `W = θ − s·Δ` `[B, D, F]` (Δ constant) whose outer gradient goes to θ
    and, when the write scale s is learned (`HopeConfig.cms_learn_lr`), to s.

    Same values and gradients as `x @ (θ.unsqueeze(0) − s·Δ)`, but ∂/∂θ is one flat matmul `Σ_b x_bᵀ g_b =
    x.flatten(0, 1)ᵀ g.flatten(0, 1)` instead of B per-sample products summed afterwards, ∂/∂s = −Σ ⟨x @ Δ, g⟩
    needs no per-sample weight gradient either, and no per-sample gradient is formed for `W`: the CMS write takes
    it from the recorded (x, y) pairs (`FastWeights.grads`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor, fast: torch.Tensor, scale: torch.Tensor | None = None,
                delta: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, fast, delta)
        ctx.theta_dtype = theta.dtype
        # θ (and s) arrive as non-leaf aliases (`FastWeights`), so backward can ask whether this backward needs
        # their gradients: the outer backward does, a write's backward (w.r.t. the products' outputs) does not
        ctx.theta_node = theta.grad_fn
        ctx.scale_node = None if scale is None else scale.grad_fn
        ctx.scale_dtype = None if scale is None else scale.dtype
        return torch.matmul(x, fast)  # [B, T, F]

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, fast, delta = ctx.saved_tensors
        gx = gtheta = gscale = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(gy, fast.to(gy.dtype).transpose(-1, -2)).to(x.dtype)  # [B, T, D]
        if ctx.needs_input_grad[1] and _engine_needs(ctx.theta_node):
            gtheta = (x.to(gy.dtype).flatten(0, -2).T @ gy.flatten(0, -2)).to(ctx.theta_dtype)  # [D, F]
        if len(ctx.needs_input_grad) > 3 and ctx.needs_input_grad[3] and _engine_needs(ctx.scale_node):
            xd = torch.matmul(x.to(gy.dtype), delta.to(gy.dtype))  # [B, T, F]
            gscale = -(xd * gy).sum().to(ctx.scale_dtype)
        return gx, gtheta, None, gscale, None


class FastWeights:
    """Per-sample fast weights of one SwiGLU, `{name: [B, *θ.shape]}`, and the products computed with them.

    Each `matmul` records its input and output; `grads(loss)` then returns ∂loss/∂W per sample as
    `Σ_uses x_bᵀ (∂loss/∂y_b)`, one backward for every level of a period (`hope.cms.level.write_levels`).
    A SwiGLU call records three products, the last of which (`w_down`) is the level's output: `output_grads`
    differentiates ⟨δ, output⟩ from them (the residual write signal of `HopeConfig.cms_signal`).
    """

    create_graph = False  # whether a write differentiates its chunk loss with create_graph (`SecondOrderFast`)

    def __init__(self, weights: dict[str, torch.Tensor], scale: torch.Tensor | None = None,
                 deltas: dict[str, torch.Tensor] | None = None) -> None:
        if (scale is None) != (deltas is None):
            raise ValueError("FastWeights: a learned write scale needs the writes Δ it scales, and only then")
        self.weights = weights
        self.scale = scale  # s of W = θ − s·Δ (a 0-dim tensor in the graph of the level's ρ), or None: s = 1 fixed
        self.deltas = deltas
        self.uses: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._alias: dict[int, torch.Tensor] = {}

    def _theta(self, theta: torch.Tensor) -> torch.Tensor:
        """θ through one view node per fast weight (see `_FastMatmul.forward`)."""
        if not theta.requires_grad or theta.grad_fn is not None:
            return theta
        alias = self._alias.get(id(theta))
        if alias is None or alias._base is not theta:
            alias = self._alias[id(theta)] = theta.view_as(theta)
        return alias

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def matmul(self, x: torch.Tensor, name: str, theta: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # nothing to record (e.g. a one-token generation step): the bare product
            return torch.matmul(x, self.weights[name])  # [B, T, F]
        if self.scale is None:
            y = _FastMatmul.apply(x, self._theta(theta), self.weights[name])
        else:
            y = _FastMatmul.apply(x, self._theta(theta), self.weights[name], self.scale, self.deltas[name])
        if y.requires_grad:
            self.uses.append((name, x, y))
        return y

    def grad_targets(self) -> list[torch.Tensor]:
        """What a write differentiates its chunk loss with respect to: the outputs y of the recorded products."""
        return [y for _, _, y in self.uses]

    def output_grads(self, deltas: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """∂/∂y of Σ_calls ⟨δ_call, output_call⟩ for every recorded product y, through this SwiGLU alone (its input
        held constant), for one δ `[B, T, D]` per recorded call (None: that call adds nothing). For the
        output product y = h W_down the gradient is δ; for a = x W_gate and u = x W_up it is g_h ⊙ u ⊙ silu'(a)
        and g_h ⊙ silu(a), with g_h = δ W_downᵀ (per sample)."""
        calls = [self.uses[i : i + 3] for i in range(0, len(self.uses), 3)]
        if len(self.uses) != 3 * len(deltas):
            raise RuntimeError(f"FastWeights: {len(self.uses)} products and {len(deltas)} output gradients do not "
                               "form whole SwiGLU calls")
        out: list[torch.Tensor | None] = []
        w_down = self.weights["w_down"].detach()  # [B, F, D]
        for call, delta in zip(calls, deltas):
            names = tuple(name for name, _, _ in call)
            if names != ("w_gate", "w_up", "w_down"):
                raise RuntimeError(f"FastWeights: expected the products of one SwiGLU call, got {names}")
            if delta is None:
                out.extend([None] * 3)
                continue
            a, u = call[0][2].detach(), call[1][2].detach()  # [B, T, F]
            g_h = torch.matmul(delta.to(w_down.dtype), w_down.transpose(-1, -2))  # [B, T, F]
            sig = torch.sigmoid(a)
            out.extend([g_h * u * sig * (1 + a * (1 - sig)), g_h * a * sig, delta])
        return out

    def grads(self, grads_y: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """∂loss/∂W `[B, *θ.shape]` per name from ∂loss/∂y of `grad_targets()` (zero for unused or unreached)."""
        out: dict[str, torch.Tensor] = {}
        for (name, x, _), gy in zip(self.uses, grads_y):
            if gy is None:
                continue
            xt = x.detach().to(self.weights[name].dtype).transpose(-1, -2)  # [B, D, T]
            gy = gy.to(xt.dtype)
            out[name] = out[name].baddbmm_(xt, gy) if name in out else torch.bmm(xt, gy)  # [B, D, F]
        for name, w in self.weights.items():
            if name not in out:
                out[name] = torch.zeros_like(w)
        return out


_WRITE = threading.local()  # `writing()`: a CMS write is taking its gradient (the writes Δ are its constants)


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """While a write differentiates its chunk loss, the writes Δ inside second-order fast weights pass no gradient
    (`SecondOrderFast`): a write's gradient is the first-order one, whatever the outer gradient sees."""
    before = getattr(_WRITE, "active", False)
    _WRITE.active = True
    try:
        yield
    finally:
        _WRITE.active = before


class _OuterOnly(torch.autograd.Function):
    """Δ, whose gradient passes to the outer backward and is cut inside a write's (`writing`)."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor) -> torch.Tensor:
        return delta.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None if getattr(_WRITE, "active", False) else grad


class SecondOrderFast(FastWeights):
    """Fast weights `W = θ − s·Δ` `[B, *θ.shape]` that stay in the autograd graph of θ, s and the writes Δ
    (`HopeConfig.cms_second_order`): the products are plain `x @ W`, and a write differentiates the chunk loss
    w.r.t. W itself with `create_graph=True`, so the outer gradient also flows through every write made with them
    (the second-order meta-gradient; first-order `FastWeights` hold the writes constant). Inside a write's own
    gradient the earlier writes stay constants (`writing`), so the values equal the first-order model's."""

    create_graph = True

    def __init__(self, theta: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                 scale: torch.Tensor | float = 1.0) -> None:
        weights = {name: w.unsqueeze(0) - scale * _OuterOnly.apply(delta[name]) for name, w in theta.items()}
        super().__init__({name: w if w.requires_grad else w.requires_grad_() for name, w in weights.items()})

    def matmul(self, x: torch.Tensor, name: str, theta: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weights[name])  # [B, T, F]

    def grad_targets(self) -> list[torch.Tensor]:
        return list(self.weights.values())

    def output_grads(self, deltas):
        raise RuntimeError("second-order CMS writes need HopeConfig.cms_signal='backprop' (the residual signal "
                           "differentiates the recorded products, which second-order fast weights do not keep)")

    def grads(self, grads_w: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(w) if g is None else g for (name, w), g in zip(self.weights.items(), grads_w)}


class SwiGLU(nn.Module):
    """SwiGLU feed-forward block (Shazeer 2020). Weights are stored input-major (`[D, F]`, `[F, D]`) so that a
    batch of per-sample copies `[B, D, F]` multiplies the same way."""

    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02, out_std: float | None = None,
                 learn_write_scale: bool = False, second_order_writes: bool = False) -> None:
        super().__init__()
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        self.w_gate = nn.Parameter(torch.empty(d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(hidden, d_model))
        # ρ of a CMS level's learned write scale s = exp(ρ) (`HopeConfig.cms_learn_lr`); None: s = 1, fixed
        self.log_write_scale = nn.Parameter(torch.zeros(())) if learn_write_scale else None
        # a CMS level whose outer gradient flows through its writes while training (`HopeConfig.cms_second_order`)
        self.second_order_writes = second_order_writes
        self.init_weights()

    def write_scale(self) -> torch.Tensor | None:
        """s = exp(ρ), the learned factor of the level's writes in its fast weights θ − s·Δ, or None (s = 1)."""
        return None if self.log_write_scale is None else self.log_write_scale.exp()

    def weights(self) -> dict[str, torch.Tensor]:
        return {"w_gate": self.w_gate, "w_up": self.w_up, "w_down": self.w_down}

    def forward(self, x: torch.Tensor, fast: FastWeights | None = None) -> torch.Tensor:
        if fast is None:
            return swiglu(x, self.w_gate, self.w_up, self.w_down)
        h = F.silu(fast.matmul(x, "w_gate", self.w_gate)) * fast.matmul(x, "w_up", self.w_up)  # [B, T, F]
        return fast.matmul(h, "w_down", self.w_down)  # [B, T, D]

    def init_weights(self) -> None:
        """w_gate, w_up: N(0, init_std²); w_down: N(0, out_std²) (the residual-branch scaling of GPT-2)."""
        nn.init.normal_(self.w_gate, std=self.init_std)
        nn.init.normal_(self.w_up, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.out_std)
        if self.log_write_scale is not None:
            nn.init.zeros_(self.log_write_scale)


def residual_std(init_std: float, n_layers: int) -> float:
    """Std of the projections that write into the residual stream: init_std / sqrt(2·n_layers)."""
    return init_std / math.sqrt(2 * n_layers)
