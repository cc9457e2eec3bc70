# The Python environment of quickstart.sh and tests/run.sh (sourced by both, from the checkout's root).
#
# By default: the virtual environment .venv in the checkout, created on first use with $PYTHON
# (default python3) and reused after (a symlink to another virtual environment works too).
# AMED_USE_ACTIVE_VENV=1: the active virtual environment (or a conda environment other than base)
# instead; any other interpreter is refused. Nothing is ever installed into an interpreter that is
# not a virtual environment, and torch is only installed where none is importable, so a CUDA build
# you installed yourself stays.
#
# Defines PY (the environment's interpreter) and `install_once NAME FILES -- PIP_ARGS...`, which
# runs `$PY -m pip install PIP_ARGS` unless the same NAME was installed from the same FILES before.

if [ "${AMED_USE_ACTIVE_VENV:-0}" != 0 ]; then
    PY=$(command -v python || command -v python3)
    if ! "$PY" -c 'import os, sys; sys.exit(not (sys.prefix != sys.base_prefix or
            (os.environ.get("CONDA_PREFIX") == sys.prefix and os.environ.get("CONDA_DEFAULT_ENV", "base") != "base")))'; then
        echo "Error: AMED_USE_ACTIVE_VENV is set, but $PY is not a virtual environment; activate one, or unset it to use .venv" >&2
        exit 1
    fi
else
    if [ ! -x .venv/bin/python ]; then
        echo "Creating the virtual environment .venv (once) with ${PYTHON:-python3}"
        if ! "${PYTHON:-python3}" -m venv .venv; then
            echo "Error: could not create .venv with ${PYTHON:-python3} -m venv (on Debian/Ubuntu: apt install python3-venv)" >&2
            exit 1
        fi
    fi
    PY=.venv/bin/python
fi
AMED_ENV_PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')

install_once() {
    local name=$1 files=() key
    shift
    while [ "$1" != -- ]; do files+=("$1"); shift; done
    shift
    key=$( { cat "${files[@]}" /dev/null; echo "$@"; } | "$PY" -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
    if [ "$(cat "$AMED_ENV_PREFIX/.amed-$name" 2>/dev/null)" != "$key" ]; then
        "$PY" -m pip install -q "$@"
        echo "$key" > "$AMED_ENV_PREFIX/.amed-$name"
    fi
}

# torch first and pinned: 2.13.0 resolves to the CPU wheel on a machine without CUDA; a bare
# `torch` would pull a multi-GB CUDA build. An environment that already has torch keeps it.
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo "Installing torch 2.13.0 into $AMED_ENV_PREFIX"
    "$PY" -m pip install -q torch==2.13.0
elif ! "$PY" -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.13.0"))'; then
    echo "Warning: $AMED_ENV_PREFIX has torch $("$PY" -c 'import torch; print(torch.__version__)'); the tested version is 2.13.0"
fi
install_once requirements requirements.txt -- -r requirements.txt
