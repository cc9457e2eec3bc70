#!/usr/bin/env bash
# Quickstart (CPU, no downloads beyond the Python packages): in the checkout's own virtual
# environment .venv (see tests/env.sh), trains AMED predictors on the built-in analytic model,
# prints the error table of AMED against plain solvers and writes a sample grid and plots.
# Extra arguments go to `python -m evaluation.quickstart`.
set -euo pipefail
cd "$(dirname "$0")"
source tests/env.sh
# matplotlib for the plots, pytest for the light test run `.venv/bin/python -m pytest -q tests`
install_once quickstart requirements-plots.txt requirements-test.txt -- -r requirements-plots.txt -r requirements-test.txt
exec "$PY" -m evaluation.quickstart "$@"
