"""Continuum Memory System (docs/design.md §5, arXiv:2512.24695 eqs. 70–74): MLP levels that rewrite their own weights.

Level ℓ is a SwiGLU MLP with period C_ℓ. Its weights for the tokens of one chunk are fixed; at every multiple of
C_ℓ (absolute stream position) they are written once with the sum of the next-token-loss gradients of the chunk:

    θ_ℓ ← θ_ℓ − η_ℓ · Opt_ℓ( Σ_{t in chunk, t+1 in chunk} ∇_θℓ ℓ_t )          ℓ_t = CE(logits_t, x_{t+1})   (71)

| symbol | here |
|---|---|
| C_ℓ | `CMSLevel.period` (tokens) |
| η_ℓ | `CMSLevel.lr` |
| λ_ℓ | `CMSLevel.decay`: with it a write is Δ ← (1 − λ_ℓ)·Δ + η_ℓ·d (retention toward θ_ℓ,0; 0 in eq. 71) |
| Opt_ℓ | `hope.optim.memory_rule(CMSLevel.optimizer)`; direction d, update θ ← θ − η_ℓ·d |
| θ_ℓ,0 | the level's `nn.Parameter`s (meta-learned by the outer optimizer) |
| s_ℓ | `SwiGLU.write_scale()`: with `HopeConfig.cms_learn_lr`, learned exp(ρ_ℓ); fast = θ_0 − s_ℓ·Δ |

The error signal is set by `HopeConfig.cms_signal`. "backprop" (default) is (71) exactly: the gradient reaches the
level through every layer above it, so a write costs an activation backward through those layers over the chunk.
"residual" takes δ_t = ∂ℓ_t/∂h_L,t at the final residual stream (a backward through the final norm and head
only) as the gradient of the level's output, i.e. it treats the layers above as the identity along the residual
path, and differentiates ⟨δ, output⟩ through the level's own MLP; it equals "backprop" for the last level of the
last block and approximates it below (measured in `experiments/lm_compare`).

Fast weights are per sample: `fast = θ_0 − s_ℓ·Δ` with Δ `[B, *θ.shape]` detached (first-order: outer gradients
treat applied writes as constants and reach θ_0, and s_ℓ when it is learned, through every chunk, as one flat
matmul per product; see
`hope.layers.mlp.FastWeights`, which also records the products a write differentiates). `hope.cms.schedule` owns
the segment loop; this module holds what one fast level needs: its state, the inner-loss bookkeeping and the write.

Legend: B batch, T time, V vocabulary, P number of predictions in a segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from hope.config import CMSLevel
from hope.layers.mlp import FastWeights, SecondOrderFast, SwiGLU, writing
from hope.state import LevelState

Level = tuple[SwiGLU, CMSLevel, LevelState]  # a fast level: its MLP (θ_0), its config and its state


def init_level_state(mlp: SwiGLU, level: CMSLevel, batch_size: int) -> LevelState:
    """Fresh per-sample state of one fast level: zero write Δ, a fresh optimizer memory, fast = θ_0."""
    from hope.optim import memory_rule

    rule = memory_rule(level.optimizer, **level.optimizer_kwargs)
    delta, opt = {}, {}
    for name, w in mlp.weights().items():
        delta[name] = w.detach().new_zeros((batch_size, *w.shape))
        opt[name] = rule.init_state(delta[name])
    return LevelState(delta, opt, materialize(mlp, delta))


def materialize(mlp: SwiGLU, delta: dict[str, torch.Tensor]) -> FastWeights:
    """Fast weights θ_0 − s·Δ `[B, *θ.shape]` (s = 1 unless the level learns its write scale,
    `HopeConfig.cms_learn_lr`); the products made with them are differentiable in θ_0 and s (and in the fast
    weights themselves, which the next write needs, even under `torch.no_grad()` and for frozen θ_0).
    A level with second-order writes (`HopeConfig.cms_second_order`) in training mode gets `SecondOrderFast`,
    which keeps θ_0, s and Δ in the graph; its values are the same."""
    scale = mlp.write_scale()
    if mlp.second_order_writes and mlp.training:
        return SecondOrderFast(mlp.weights(), delta, 1.0 if scale is None else scale)
    fast = {name: w.requires_grad_() for name, w in fast_weight_values(mlp, delta).items()}
    if scale is None:
        return FastWeights(fast)
    return FastWeights(fast, scale if torch.is_grad_enabled() else scale.detach(), dict(delta))


def fast_weight_values(mlp: SwiGLU, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The values θ_0 − s·Δ `[B, *θ.shape]` of a level's fast weights, cut from the graph (for norms and reports)."""
    scale = mlp.write_scale()
    s = None if scale is None else scale.detach()
    return {name: w.detach().unsqueeze(0) - (delta[name] if s is None else s * delta[name])
            for name, w in mlp.weights().items()}


def prediction_losses(
    logits: torch.Tensor, ids: torch.Tensor, start: int, pending: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses whose targets are in this segment and the positions of their predictions.

    `logits` `[B, T, V]` and `ids` `[B, T]` cover absolute positions start..start+T-1; `pending` `[B, V]` holds the
    logits of position start-1 (from the previous segment), whose target ids[:, 0] only arrives now.
    Returns `ce` `[B, P]` (fp32, or fp64 for fp64 logits) and `positions` `[P]` (the position t of each prediction ℓ_t).
    """
    if pending is not None:
        pred = torch.cat((pending[:, None], logits[:, :-1]), dim=1)  # [B, T, V]
        targets, first = ids, start - 1
    else:
        pred, targets, first = logits[:, :-1], ids[:, 1:], start
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # at least fp32 (fp64 stays fp64)
    ce = F.cross_entropy(pred.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    positions = torch.arange(first, first + targets.shape[1], device=ids.device)
    return ce, positions


def chunk_loss(ce: torch.Tensor, positions: torch.Tensor, period: int) -> torch.Tensor:
    """Sum of the losses ℓ_t with t and t+1 in the same period-chunk (so a write never waits for a future token)."""
    inside = ((positions + 1) % period != 0).to(ce.dtype)  # [P]
    return (ce * inside).sum()


def level_grads(levels: list[Level], acc: torch.Tensor | None,
                finals: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
    """∂acc/∂W per sample `{name: [B, *θ.shape]}` for each level's fast weights W, from the products recorded in
    its `FastWeights` since they were made (zero where `acc` does not reach them).

    One `autograd.grad` (w.r.t. the outputs of the recorded products) serves every level. Gradients are per sample
    because sample b's loss depends only on fast[b]. `finals` selects the residual signal
    (`HopeConfig.cms_signal="residual"`): the final residual streams h_L `[B, T, D]` of the chunk's segments, one
    per SwiGLU call recorded in each level's `FastWeights`. Then δ = ∂acc/∂h_L (a backward through the final norm
    and head only) replaces ∂acc/∂(level output), and each level's gradient differentiates
    Σ_segments ⟨δ, level output⟩ through its own MLP only (`residual_grads`).
    """
    targets = [st.fast.grad_targets() for _, _, st in levels]
    flat = [t for level_targets in targets for t in level_targets]
    if acc is None or not acc.requires_grad or not flat:
        grads_y = [None] * len(flat)
    elif finals is None:
        create_graph = any(st.fast.create_graph for _, _, st in levels)  # second-order writes (`SecondOrderFast`)
        with writing():
            grads_y = list(torch.autograd.grad(acc, flat, retain_graph=True, allow_unused=True,
                                               create_graph=create_graph))
    else:
        grads_y = residual_grads(levels, acc, finals)
    out = []
    for (_, _, st), level_targets in zip(levels, targets):
        n = len(level_targets)
        out.append(st.fast.grads(grads_y[:n]))
        grads_y = grads_y[n:]
    return out


def write_levels(levels: list[Level], acc: torch.Tensor | None,
                 finals: list[torch.Tensor] | None = None) -> None:
    """Apply one write to every level of `levels`, whose chunks end here, from the accumulated chunk loss `acc`
    (in place on their states): θ ← θ − η_ℓ·Opt_ℓ(g), g = ∂acc/∂W (`level_grads`) plus the gradient carried from
    earlier windows of the same chunk (`LevelState.grad`, see `hope.cms.schedule`)."""
    apply_writes(levels, level_grads(levels, acc, finals))


def apply_writes(levels: list[Level], grads: list[dict[str, torch.Tensor]]) -> None:
    """The write of `write_levels` from gradients already taken (`level_grads`), one dict per level."""
    from hope.optim import memory_rule

    for (mlp, level, st), level_grad in zip(levels, grads):
        rule = memory_rule(level.optimizer, **level.optimizer_kwargs)
        for name in st.delta:
            g = level_grad[name] if st.grad is None else level_grad[name] + st.grad[name]
            g = g.to(st.delta[name].dtype)
            st.opt[name], direction = rule.update(st.opt[name], g)
            kept = st.delta[name] if level.decay == 0 else st.delta[name] * (1 - level.decay)  # retention
            st.delta[name] = torch.add(kept, direction, alpha=level.lr)
        st.grad = None
        st.fast = materialize(mlp, st.delta)


def residual_grads(levels: list[Level], acc: torch.Tensor,
                   finals: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The residual write signal (see `write_levels`): δ_s = ∂acc/∂h_L,s for each segment s of the chunk, then
    ∂/∂y of Σ_s ⟨δ_s, level output_s⟩ through each level's own MLP (`FastWeights.output_grads`), flattened in
    level order like the levels' `grad_targets()`."""
    deltas = torch.autograd.grad(acc, finals, retain_graph=True, allow_unused=True)
    return [g for _, _, st in levels for g in st.fast.output_grads(list(deltas))]


def detach_tree(tree):
    """`tree` (tensors in dicts, lists, tuples and registered dataclasses) with every tensor cut from the graph."""
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def level_memory(st: LevelState) -> LevelState:
    """A level's Δ, optimizer memory and carried gradient cut from the graph, in new containers, without fast
    weights (what a snapshot or an export keeps)."""
    return LevelState(detach_tree(st.delta), detach_tree(st.opt), grad=detach_tree(st.grad))


def detach_level_state(st: LevelState) -> LevelState:
    """`level_memory`: the level ready to continue the stream, cut from the graph. Its fast weights are built when
    the stream is next run (`ensure_fast`), from θ_0 as it is then: an outer step may change θ_0 in between."""
    return level_memory(st)


def ensure_fast(mlp: SwiGLU, st: LevelState) -> None:
    """Build the level's fast weights θ_0 − Δ from the current θ_0 if it has none (a detached or saved level)."""
    if st.fast is None:
        st.fast = materialize(mlp, st.delta)
