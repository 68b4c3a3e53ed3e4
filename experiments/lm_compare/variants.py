"""The compared language models and HOPE ablations, each as the Hydra overrides of one `train.py` run.

Dimensions: none (configuration only).

Every variant trains with the same data, seed, steps and tokens (the overrides that `compare.py` adds to all of
them); a variant differs only in its model lines. The ablations are those of docs/design.md §3–§5 and Table 6 of
arXiv:2512.24695:

| variant             | change from HOPE                                             | paper / design reference   |
|---------------------|--------------------------------------------------------------|----------------------------|
| hope_gd             | erase β = 0 (plain GD with retention) instead of β = η (DGD)  | eq. 88; Table 6 "w/o DGD"  |
| hope_dgd_small_step | DGD at hope_gd's η_max (the control that separates β from η)  | eq. 88                     |
| hope_no_cms         | one frozen SwiGLU level (period None), hidden = Σ CMS hiddens | eqs. 70–74; "w/o CMS"      |
| hope_plain_targets  | M_k, M_v regress onto v̄_t = v_t/‖v_t‖, not M_□,c(t)(v̄_t)      | eqs. 84/87                 |
| hope_mem_chunk16    | main-memory chunk C = 16 (MemoryConfig default: 64)          | eq. 90, docs/design.md §4       |
| hope_proj_chunk64   | projection-memory chunk 64 (MemoryConfig default: 16)        | eq. 90, docs/design.md §4       |
| hope_small_step_c16 | hope_dgd_small_step + hope_mem_chunk16 (do they stack?)      | eqs. 88, 90                |
| hope_residual       | CMS write signal δ = ∂ℓ/∂h_L (`HopeConfig.cms_signal`)        | eq. 71, docs/design.md §5  |
| hope_fast           | hope_residual + projection-memory chunk 32                   | eqs. 71, 90                |
| hope_paper          | preset "hope_paper": every switch below together             | docs/design.md §4.1        |
| hope_full_width     | projection memories read all of x̃_t (`proj_width=full`)     | eqs. 83/94                 |
| hope_deep_memories  | all six memories 2-layer MLPs (proj/gate/mem_depth=deep)     | eqs. 89/91                 |
| hope_momentum       | momentum in M_mem                                            | Table 6 "w/o momentum"     |
| hope_self_target_mem| M_mem's self-generated target, adaptive q                    | eq. 85                     |
| hope_negative_eigenvalues | η_t = η_max(1 + α_t)σ(·): DGD factors down to −1       | eq. 88; Grazzi et al. 2024 |
| hope_learned_lr     | learned per-level CMS rate s_ℓ·η_ℓ (`HopeConfig.cms_learn_lr`) | eq. 71, docs/design.md §5  |
| hope_second_order   | outer gradient through the CMS writes (`cms_second_order`)  | eq. 71, docs/design.md §5  |

Plain GD adds a chunk's steps at the chunk-start state, so `MemoryConfig` only accepts η_max ≤ min(1, 2/C) for
the largest chunk C (docs/design.md §3); `hope_gd` therefore also sets η_max to that bound, the largest stable step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BASELINES = ("transformer", "titans", "hope_attention", "hope")


@dataclass(frozen=True)
class Variant:
    """One compared model: a name, the experiment config it starts from, extra Hydra overrides, and a note."""

    name: str
    experiment: str
    overrides: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""

    def hydra_overrides(self) -> list[str]:
        return [f"experiment={self.experiment}", *self.overrides]


def frozen_ffn_hidden(size: str | int) -> int:
    """Hidden width of one frozen SwiGLU holding as many weights as all of HOPE's CMS levels at `size`."""
    from hope import preset

    cfg = preset("hope", size)
    return sum(lvl.hidden or cfg.ffn_hidden for lvl in cfg.cms)


def gd_eta_max(size: str | int) -> float:
    """The largest η_max `MemoryConfig` accepts with plain GD for HOPE's chunks: min(1, 2/C_max)."""
    from hope import preset

    mem = preset("hope", size).memory
    return min(1.0, 2 / max(mem.chunk_size, mem.proj_chunk_size))


def all_variants(size: str | int) -> dict[str, Variant]:
    """Every variant by name, baselines first; the ablations' overrides depend on the size dial."""
    from hope import preset

    hidden, eta_max, defaults = frozen_ffn_hidden(size), gd_eta_max(size), preset("hope", size)
    mem = "+model.config.memory"
    small_step, chunk16 = f"{mem}.eta_max={eta_max:g}", f"{mem}.chunk_size=16"
    residual = "+model.config.cms_signal=residual"
    periods = ", ".join(str(p) for p in defaults.fast_periods)
    variants = [
        Variant("transformer", "transformer_small", note="Transformer++: RoPE attention + SwiGLU FFN"),
        Variant("titans", "titans_small", note="Titans LMM core (deep memory, GD + momentum) + SwiGLU FFN"),
        Variant("hope_attention", "hope_attention_small", note=f"attention core + CMS (periods {periods}, frozen)"),
        Variant("hope", "hope_small", note=f"self-modifying core (DGD, chunks {defaults.memory.chunk_size}/"
                f"{defaults.memory.proj_chunk_size}) + CMS (periods {periods}, frozen)"),
        Variant("hope_gd", "hope_small", (f"{mem}.erase=gd", small_step),
                f"β = 0 (plain GD), η_max = {eta_max:g} (the GD stability bound 2/C)"),
        Variant("hope_dgd_small_step", "hope_small", (small_step,),
                f"DGD at plain GD's step bound, η_max = {eta_max:g} (separates the erase from the step size)"),
        Variant("hope_no_cms", "hope_small", (f"+model.config.cms=[{{period:null,hidden:{hidden}}}]",),
                f"one frozen SwiGLU of hidden {hidden} (= the CMS levels' total) instead of the CMS"),
        Variant("hope_plain_targets", "hope_small", (f"{mem}.self_targets=false",),
                "projection memories regress onto v̄_t = v_t/‖v_t‖ (no self-generated targets)"),
        Variant("hope_mem_chunk16", "hope_small", (chunk16,),
                f"main-memory chunk 16 (HOPE: {defaults.memory.chunk_size})"),
        Variant("hope_proj_chunk64", "hope_small", (f"{mem}.proj_chunk_size=64",),
                f"projection-memory chunk 64 (HOPE: {defaults.memory.proj_chunk_size})"),
        Variant("hope_small_step_c16", "hope_small", (small_step, chunk16),
                f"DGD at η_max = {eta_max:g} with main-memory chunk 16: the two best single changes together"),
        Variant("hope_residual", "hope_small", (residual,),
                "CMS writes driven by δ = ∂ℓ/∂h_L through each level's own MLP (no backward through the layers above)"),
        Variant("hope_fast", "hope_small", (residual, f"{mem}.proj_chunk_size=32"),
                f"hope_residual with projection-memory chunk 32 (HOPE: {defaults.memory.proj_chunk_size})"),
        # the paper's literal HOPE and each of its switches on HOPE alone (docs/design.md §4.1)
        Variant("hope_paper", "hope_paper_small", note="preset hope_paper: every switch of docs/design.md §4.1"),
        Variant("hope_full_width", "hope_small", (f"{mem}.proj_width=full",),
                "projection memories read all of x̃_t (one per projection, not one per head)"),
        Variant("hope_deep_memories", "hope_small",
                tuple(f"{mem}.{k}=deep" for k in ("proj_depth", "gate_depth", "mem_depth")),
                "all six memories 2-layer MLPs (eqs. 89/91)"),
        Variant("hope_momentum", "hope_small", (f"{mem}.momentum=true",), "momentum in M_mem (Table 6)"),
        Variant("hope_self_target_mem", "hope_small", (f"{mem}.self_target_mem=true", f"{mem}.adaptive_q=true"),
                "M_mem regresses onto its self-generated target (eq. 85); q_t from a projection memory"),
        Variant("hope_negative_eigenvalues", "hope_small", (f"{mem}.negative_eigenvalues=true",),
                "η_t = η_max(1 + α_t)σ(·): DGD factors down to −1 (state tracking)"),
        Variant("hope_learned_lr", "hope_small", ("+model.config.cms_learn_lr=true",),
                "each CMS level's inner rate η_ℓ scaled by a learned s_ℓ = exp(ρ_ℓ), ρ_ℓ trained first-order"),
        Variant("hope_second_order", "hope_small", ("+model.config.cms_second_order=true",),
                "second-order CMS: the outer gradient flows through every in-context write"),
    ]
    return {v.name: v for v in variants}


def select(size: str | int, only: str | None) -> list[Variant]:
    """The variants named in the comma-separated `only` (all when None), in the table's order."""
    variants = all_variants(size)
    if only is None:
        return list(variants.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in variants]
    if not names or bad:
        raise ValueError(f"--only={only!r}: unknown variants {bad}; choose from {list(variants)}")
    return [variants[n] for n in variants if n in names]
