"""Shared test fixtures. Tests run from any folder: the repository root goes on sys.path."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope='module')
def single_thread():
    """Run a module's tiny convolutions on one thread: on a busy 2-core machine OpenMP's
    multi-threaded kernels for tiny tensors stall. The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
