"""Triton kernels for the HOPE inner-loop memory update (see kernels/README.md).

Import name note: an unrelated PyPI distribution also installs a top-level package called ``kernels``;
this one ships inside the ``hope-nested-learning`` distribution next to ``hope``.
"""

from kernels.chunk import chunk_memory_update
from kernels.recurrent import recurrent_memory_update

__all__ = ["chunk_memory_update", "recurrent_memory_update"]
