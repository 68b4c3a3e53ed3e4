"""A public profiler region for the in-context CMS writes: how long they take, without patching anything.

    from hope.cms import write_timer
    with write_timer() as timer:
        loss = model(ids).logits.sum(); loss.backward()
    timer.seconds, timer.writes      # wall time inside CMS writes, and how many write groups ran

Every write also runs inside `torch.profiler.record_function("hope.cms.write")`, so it shows as one region in a
`torch.profiler` trace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_active: list[WriteTimer] = []


@dataclass
class WriteTimer:
    """Wall-clock seconds spent in CMS writes while the timer was active, and the number of write groups."""

    seconds: float = 0.0
    writes: int = 0


@contextmanager
def write_timer() -> Iterator[WriteTimer]:
    """Time every CMS write made inside the `with` block (timers nest; each counts what ran while it was open)."""
    timer = WriteTimer()
    _active.append(timer)
    try:
        yield timer
    finally:
        _active.remove(timer)


@contextmanager
def write_region() -> Iterator[None]:
    """What the CMS engine wraps each write in: a profiler region, and the time charged to the open timers."""
    t0 = time.perf_counter()
    with torch.profiler.record_function("hope.cms.write"):
        yield
    elapsed = time.perf_counter() - t0
    for timer in _active:
        timer.seconds += elapsed
        timer.writes += 1
