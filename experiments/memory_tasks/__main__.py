"""Run every memory benchmark with the same flags: `python -m experiments.memory_tasks [--tiny] [--models ...]`."""

from __future__ import annotations

import sys

from experiments.memory_tasks import formal_languages, mqar, passkey

if __name__ == "__main__":
    for bench in (mqar, passkey, formal_languages):
        print(f"== {bench.NAME} ==")
        bench.run(sys.argv[1:])
