"""Model-agnostic continual-learning baselines: reservoir replay and elastic weight consolidation (EWC).

Dimensions: B batch, T time (tokens), V vocabulary, P number of trainable parameters.

Both baselines work with any `nn.Module` language model whose forward maps token ids `[B, T]` to logits
`[B, T, V]`, returned directly, as the first element of a tuple, or as an `.logits` attribute (HopeLM). A batch is
a pair `(inputs [B, T], targets [B, T])`; targets equal to -100 are ignored, which lets the same code train plain
language modelling (targets = inputs shifted by one) and classification as next-token prediction of a label
(every target -100 except the label position).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IGNORE_INDEX", "EWC", "ReplayBuffer", "lm_loss", "logits_of"]

IGNORE_INDEX = -100
Batch = tuple[Tensor, ...]


def logits_of(out: object) -> Tensor:
    """Return the logits `[B, T, V]` from a model output: a tensor, a tuple (logits first) or an `.logits` field."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def windowed_logits(model: nn.Module, inputs: Tensor, window: int | None = None,
                    scored: Tensor | None = None) -> Tensor:
    """Logits `[B, T, V]` of `inputs` `[B, T]`, read in windows of `window` tokens with the model's state carried
    from window to window and cut from the graph between them (truncated BPTT, as in stream training).

    `window` None (or ≥ T): one call. With `scored` `[B, T]` (bool), a window with no scored position is read
    without autograd: it only advances the state, so nothing of it needs a gradient. The model must take
    `model(x, state)` and return `.logits` and `.state`, and have `detach_state` (`HopeLM` does).
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens or None, got {window!r}")
    T = inputs.shape[1]
    if window is None or T <= window:
        return logits_of(model(inputs))
    state, pieces = None, []
    for a in range(0, T, window):
        grad = torch.is_grad_enabled() and (scored is None or bool(scored[:, a : a + window].any()))
        with torch.set_grad_enabled(grad):
            out = model(inputs[:, a : a + window], state)
        pieces.append(out.logits)
        state = model.detach_state(out.state)
    return torch.cat(pieces, dim=1)


def lm_loss(model: nn.Module, inputs: Tensor, targets: Tensor, window: int | None = None) -> Tensor:
    """Mean next-token cross-entropy of `model` over the targets that are not `IGNORE_INDEX`.

        L(θ) = −(1/|M|) Σ_{(b,t) ∈ M} log softmax(f_θ(x)_{b,t})[y_{b,t}],   M = {(b,t) : y_{b,t} ≠ −100}

    | symbol | meaning                                 |
    |--------|-----------------------------------------|
    | x      | `inputs` [B, T], token ids              |
    | y      | `targets` [B, T], next token or -100    |
    | f_θ    | the model; its logits are [B, T, V]     |

    With `window`, the inputs are read in windows with the state carried (`windowed_logits`).
    """
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs and targets must have the same shape, got {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}")
    logits = windowed_logits(model, inputs, window, targets != IGNORE_INDEX)  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class ReplayBuffer:
    """A bounded store of past training rows filled by reservoir sampling (Vitter 1985, Algorithm R).

    After n rows have been offered, each of them is in the buffer with probability min(1, capacity / n), whatever
    the order of the tasks, so the buffer is a uniform sample of everything seen so far (the "reservoir" replay
    of Chaudhry et al. 2019, "On tiny episodic memories in continual learning"). Rows are tuples of tensors
    (e.g. `(inputs [T], targets [T])`). Two random streams seeded from `seed` are used, one for which rows are
    kept and one for sampling, so the contents depend only on the rows offered, not on how often one samples.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.rows: list[Batch] = []
        self.seen = 0  # rows offered so far, the n of Algorithm R
        self._keep_rng = random.Random(seed)
        self._sample_rng = random.Random(seed + 1_000_003)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, *tensors: Tensor) -> None:
        """Offer every row of a batch (tensors sharing the leading batch dimension B) to the reservoir."""
        if not tensors:
            raise ValueError("add() needs at least one tensor")
        size = tensors[0].shape[0]
        if any(t.shape[0] != size for t in tensors):
            raise ValueError(f"tensors must share the batch dimension, got shapes {[tuple(t.shape) for t in tensors]}")
        for b in range(size):
            row = tuple(t[b].detach().clone() for t in tensors)
            if len(self.rows) < self.capacity:
                self.rows.append(row)
            else:
                j = self._keep_rng.randrange(self.seen + 1)  # keep the new row with probability capacity / (n+1)
                if j < self.capacity:
                    self.rows[j] = row
            self.seen += 1

    def sample(self, n: int) -> Batch:
        """Draw n stored rows uniformly without replacement (all of them if fewer), stacked to `[n, ...]` each."""
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not self.rows:
            raise ValueError("cannot sample from an empty replay buffer")
        picks = self._sample_rng.sample(range(len(self.rows)), min(n, len(self.rows)))
        return tuple(torch.stack([self.rows[i][k] for i in picks]) for k in range(len(self.rows[0])))


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017, PNAS, eq. 3) with a diagonal empirical Fisher.

    After each task k the parameters θ*_k are stored with a diagonal Fisher estimate F_k, and training on
    later tasks adds

        Ω(θ) = Σ_k (λ/2) Σ_p F_{k,p} (θ_p − θ*_{k,p})²,      F_{k,p} = (1/M) Σ_{m=1}^{M} (∂L_m/∂θ_p |_{θ*_k})²

    | symbol   | meaning                                                                 |
    |----------|-------------------------------------------------------------------------|
    | θ, θ*_k  | current parameters; parameters at the end of task k                     |
    | F_k      | diagonal Fisher of task k, one value per parameter (P values)           |
    | L_m      | mean loss of batch m of task k (`lm_loss` by default)                   |
    | M        | number of batches used for the estimate                                  |
    | λ        | `strength`                                                              |

    The Fisher uses per-batch squared gradients (one backward per batch, not one per sample), which is
    cheaper than the per-sample empirical Fisher and smaller than it by roughly the batch size; λ absorbs
    the scale. One penalty term is kept per task (the original multi-task form), not a running sum.
    """

    def __init__(self, strength: float) -> None:
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not strength >= 0:
            raise ValueError(f"strength (λ) must be a non-negative number, got {strength!r}")
        self.strength = float(strength)
        self.anchors: list[dict[str, tuple[Tensor, Tensor]]] = []  # per task: name -> (θ*, F)

    @staticmethod
    def fisher_diagonal(
        model: nn.Module,
        batches: Iterable[Batch],
        loss_fn: Callable[..., Tensor] = lm_loss,
    ) -> dict[str, Tensor]:
        """Return F_p = mean over batches of (∂L_m/∂θ_p)² for every trainable parameter (no `.grad` is touched)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
        count = 0
        for batch in batches:
            loss = loss_fn(model, *batch)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    fisher[n] += g.detach().float().pow(2)
            count += 1
        if count == 0:
            raise ValueError("fisher_diagonal needs at least one batch, got none")
        return {n: f / count for n, f in fisher.items()}

    def consolidate(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        loss_fn: Callable[..., Tensor] = lm_loss,
    ) -> None:
        """End of a task: store θ* = the current parameters and their Fisher F estimated on `batches`."""
        fisher = self.fisher_diagonal(model, batches, loss_fn)
        params = dict(model.named_parameters())
        self.anchors.append({n: (params[n].detach().clone(), f) for n, f in fisher.items()})

    def penalty(self, model: nn.Module) -> Tensor:
        """Ω(θ) = Σ_k λ/2 Σ_p F_{k,p} (θ_p − θ*_{k,p})², differentiable in the model's parameters."""
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device if params else None
        total = torch.zeros((), device=device)
        for anchor in self.anchors:
            for name, (theta_star, fisher) in anchor.items():
                if name not in params:
                    raise ValueError(f"EWC anchor names parameter {name!r}, which the model does not have")
                total = total + (fisher * (params[name].float() - theta_star.float()).pow(2)).sum()
        return 0.5 * self.strength * total
