"""Test-suite settings: one intra-op thread (the suite's tensors are small, and two threads spin-waiting on a
2-core machine make them slower, not faster)."""

import torch

torch.set_num_threads(1)
