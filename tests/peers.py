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


COMFYUI_PEER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.comfyui-peer')


def comfyui(module='comfy.samplers'):
    """Import ``module`` of ComfyUI (the PyPI ``comfyui`` package, installed with --no-deps into
    ``.comfyui-peer`` by tests/run.sh, or into the environment), or skip saying why. ComfyUI's own
    modules run as they are: nothing is stubbed."""
    if importlib.util.find_spec('comfy') is None and os.path.isdir(COMFYUI_PEER):
        sys.path.append(COMFYUI_PEER)    # appended: its top-level ``tests`` must not shadow ours
    if importlib.util.find_spec('comfy') is None:
        pytest.skip('ComfyUI (PyPI comfyui) is not installed: tests/run.sh puts it in .comfyui-peer')
    cwd = os.getcwd()
    os.chdir(_comfyui_home())   # ComfyUI makes its input/ folder in the working folder at import
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f'ComfyUI is installed but {module} does not import here: {e}')
    finally:
        os.chdir(cwd)


def _comfyui_home(home=[]):  # noqa: B006 (one folder per test session)
    if not home:
        import tempfile  # pylint: disable=import-outside-toplevel
        home.append(tempfile.mkdtemp(prefix='comfyui-home-'))
    return home[0]
