"""Test-only peer implementations, imported without their heavy optional parts."""

import importlib
import importlib.util
import os
import sys
import types

import pytest


def k_diffusion_sampling():
    """Import ``k_diffusion.sampling`` (crowsonkb/k-diffusion, installed with --no-deps).

    The package's ``__init__`` and ``utils`` import torchvision, which does not import beside our
    torch build; ``sampling`` needs only ``utils.append_dims`` from it, so the package is
    entered without running ``__init__`` and ``utils`` is a one-function module. The samplers
    under test are k-diffusion's own code."""
    if 'k_diffusion.sampling' in sys.modules:
        return sys.modules['k_diffusion.sampling']
    spec = importlib.util.find_spec('k_diffusion')
    if spec is None:
        pytest.skip('k-diffusion is not installed (see requirements-test.txt)')
    pkg = types.ModuleType('k_diffusion')
    pkg.__path__ = [os.path.dirname(spec.origin)]
    utils = types.ModuleType('k_diffusion.utils')

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules['k_diffusion'] = pkg
    sys.modules['k_diffusion.utils'] = utils
    return importlib.import_module('k_diffusion.sampling')


def k_diffusion_external():
    """``k_diffusion.external`` (the model wrappers such as ``CompVisDenoiser``), entered as above."""
    k_diffusion_sampling()
    return importlib.import_module('k_diffusion.external')


PEER_VENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.peer-venv')


def peer_python(*packages):
    """The python of the peer venv ``.peer-venv`` (pytorch-fid, torchmetrics, open_clip beside their own
    torch/torchvision), or a skip naming what is missing. Packages are looked up as folders, without
    starting the interpreter."""
    python = os.path.join(PEER_VENV, 'bin', 'python')
    if not os.path.exists(python):
        pytest.skip('peer venv .peer-venv missing: run tests/run.sh (the README test command)')
    import glob  # pylint: disable=import-outside-toplevel
    for package in packages:
        if not glob.glob(os.path.join(PEER_VENV, 'lib', 'python*', 'site-packages', package)):
            pytest.skip(f'the peer venv lacks {package}: run tests/run.sh (the README test command)')
    return python
