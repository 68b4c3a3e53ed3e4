"""`hope.ops`: the short public name of the memory ops of `hope.memory` (layers call these, nothing deeper).

The entry (one call runs a memory over a sequence or a stream piece):
- `memory_update`: a linear memory over one sequence (`hope.memory.ops.memory_update`);
- `memory_stream`: the same for a stream fed in pieces, carrying a `hope.memory.LinearState`;
- `deep_memory`: the deep memory `z + W₁σ(W₂z)` over a stream piece, carrying a `hope.memory.DeepState`;
- `triton_available()`, `resolve_backend(backend, q, gamma, objective)`, `BACKENDS`: which backend runs.

Building blocks, for cores that fuse several memories into one chunk loop (`hope.memory.chunked`, `.deep`):
- `ChunkOperators`, `chunk_operators`: the state-independent operators of a chunk (UT transform, decays);
- `chunk_step`, `linear_chunk`: one chunk of a memory from its start state (given write values / linear write);
- `write_terms`, `chunk_write`: the write values x_t = η_t(y_t − S_cᵀ z_t) of an objective;
- `mlp`, `deep_write`: the deep memory's read `z + W₁σ(W₂z)` and one chunk of its writes.
"""

from hope.memory import (
    BACKENDS,
    ChunkOperators,
    chunk_operators,
    chunk_step,
    chunk_write,
    deep_memory,
    deep_write,
    linear_chunk,
    memory_stream,
    memory_update,
    mlp,
    resolve_backend,
    triton_available,
    write_terms,
)

__all__ = [
    # the entry
    "memory_update", "memory_stream", "deep_memory", "triton_available", "resolve_backend", "BACKENDS",
    # the building blocks of cores that fuse several memories
    "ChunkOperators", "chunk_operators", "chunk_step", "linear_chunk", "chunk_write", "write_terms", "mlp",
    "deep_write",
]
