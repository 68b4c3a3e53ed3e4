"""Triton kernels for the HOPE inner-loop memory update (see README.md next to this file).

Import name: ``hope.memory.kernels`` (imported only by ``hope.memory.ops``, and only when a kernel runs: it imports
Triton). The host functions take the checked inputs as one ``common.Inputs``; ``common`` also holds the tiling
plan, the launch helper and the Triton helpers the kernels share.
"""

from .chunk import chunk_memory_update
from .recurrent import recurrent_memory_update

__all__ = ["chunk_memory_update", "recurrent_memory_update"]
