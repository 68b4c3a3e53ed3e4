"""The inner-loop rule of HOPE's memories (DESIGN.md §3), written once and tested form against form:

- `rule`: the one-token `step` and the token-by-token oracle `recurrent` (linear memory, Sᵀ `[B, H, K, V]`);
- `chunked`: the chunk-parallel UT/WY form (`chunked`, and the per-chunk pieces `chunk_operators`,
  `chunk_step`, `linear_chunk` that the cores and the deep memory reuse);
- `deep`: the residual-MLP memory `z + W₁σ(W₂z)` (closed-form inner gradients, oracle and chunked form);
- `config`: `MemoryConfig`, the knobs of the memory cores.

Layers reach these through `hope.ops`, which adds input checks and the Triton dispatch.
"""
