#!/usr/bin/env bash
# The one test command (README, .ci/run): install everything the tests need into the checkout's
# virtual environment .venv (see tests/env.sh), then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

source tests/env.sh     # .venv (or the active virtual environment with AMED_USE_ACTIVE_VENV=1), torch, requirements
install_once test requirements-test.txt requirements-latent.txt requirements-plots.txt -- \
    -r requirements-test.txt -r requirements-latent.txt -r requirements-plots.txt
# Test peers without their dependencies (k-diffusion's list pulls torchvision/CUDA).
install_once peers -- --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5 torchsde==0.2.6 trampoline==0.1.2
# ComfyUI's sampler code for the ComfyUI nodes' tests: the PyPI comfyui package (its only release,
# 0.0.1, marked yanked as a development release) without its dependency list (it pulls torchvision and
# CUDA builds), plus the two pure-Python modules comfy.samplers imports that we lack. Into its own
# folder, not the environment: the package also installs a top-level `tests`.
if ! [ -d .comfyui-peer/comfy ]; then
    "$PY" -m pip install --no-deps --target .comfyui-peer comfyui==0.0.1 ConfigArgParse==1.9.0 einops==0.8.2
fi

# Peers in their own virtual environment: pytorch-fid (our Inception-v3), torchmetrics with
# torch-fidelity (a second FID) and open_clip (the CLIP score). pytorch-fid and open_clip import
# torchvision, which does not import beside our torch 2.13.0, so they get the torch 2.14.1 /
# torchvision 0.29.1 pair (a CUDA build: ~5.6 GB, about 2 minutes from a local package mirror). The venv is reused when it
# already imports all of them; a venv with only the older peers gets the new ones added.
PEER_IMPORTS='import pytorch_fid.inception, open_clip, torchmetrics.image.fid, torch_fidelity'
if ! .peer-venv/bin/python -c "$PEER_IMPORTS" >/dev/null 2>&1; then
    if ! .peer-venv/bin/python -c 'import pytorch_fid.inception' >/dev/null 2>&1; then
        rm -rf .peer-venv
        "${PYTHON:-python3}" -m venv .peer-venv
    fi
    .peer-venv/bin/python -m pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0 numpy scipy pillow \
        open_clip_torch==3.3.0 torchmetrics==1.9.0 torch-fidelity==0.4.0
fi

# Two worker processes (pytest-xdist), one per core of a 2-core machine, each on one thread: tiny
# tensors gain nothing from more threads, and oversubscribed cores stall. AMED_TEST_WORKERS=0 runs
# the suite in this process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" -m pytest -q -n "${AMED_TEST_WORKERS:-2}" tests "$@"
