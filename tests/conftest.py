"""Test-suite settings.

- One intra-op thread: the suite's tensors are small, and two threads spin-waiting on a 2-core machine make them
  slower, not faster.
- Without CUDA, Triton runs under its interpreter. The flag must be set before anything imports triton, and
  `transformers` (used by the tokenizer tests) may import a top-level `kernels` package, so it is set here, first.
"""

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
