"""HOPE's inner-loop memories (docs/design.md §3), one package with one public entry (`hope.ops` re-exports it).

Modules:
- `ops`: `memory_update`, `memory_stream`, `deep_memory` (input checks, backend choice by `resolve_backend`);
- `rule`: the one-token `step` and the token-by-token oracle `recurrent` (linear memory, Sᵀ `[B, H, K, V]`);
- `chunked`: the chunk-parallel UT/WY form (`chunked`, and the per-chunk pieces `chunk_operators`,
  `chunk_step`, `linear_chunk` that the cores and the deep memory reuse);
- `deep`: the residual-MLP memory `z + W₁σ(W₂z)` (closed-form inner gradients, oracle and chunked form);
- `kernels`: the Triton kernels of the linear memory (imported only by `ops`, only when they run);
- `state`: `LinearState`, `DeepState`, the typed states a stream carries; `bounds`: chunk bookkeeping;
- `config`: `MemoryConfig`, the knobs of the memory cores, and the one definition of each knob's choices;
- `bench`: CPU micro-benchmarks.
"""

from hope.memory.chunked import ChunkOperators, chunk_operators, chunk_step, chunk_write, linear_chunk, write_terms
from hope.memory.config import BACKENDS, MemoryConfig
from hope.memory.deep import deep_write, mlp
from hope.memory.ops import deep_memory, memory_stream, memory_update, resolve_backend, triton_available
from hope.memory.state import DeepState, LinearState

__all__ = [
    # the entry (`hope.ops` re-exports it under a short name)
    "memory_update", "memory_stream", "deep_memory", "triton_available", "resolve_backend", "BACKENDS",
    "ChunkOperators", "chunk_operators", "chunk_step", "linear_chunk", "chunk_write", "write_terms", "mlp",
    "deep_write",
    # the typed config and stream states
    "MemoryConfig", "LinearState", "DeepState",
]
