#!/usr/bin/env bash
# Quickstart on a fresh machine (CPU, no downloads beyond the Python packages): installs the
# requirements, trains AMED predictors on the built-in analytic model, samples a grid PNG and
# prints the error table of AMED against plain solvers at NFE 3, 5, 7 and 9.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0          # pinned: the CPU build here; a bare `torch` pulls CUDA
python -m pip install -q -r requirements.txt
python -m evaluation.quickstart "$@"
