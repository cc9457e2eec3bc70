"""The training state beside the snapshots of an unfinished run: what ``train.py --resume`` needs
besides the options (plain data and tensors: the predictor and Adam state dicts, the loop position
and the statistics of the current tick)."""

import torch

from predictors.snapshot import save_torch
from torch_utils.misc import torch_file_problem

STATE_FILE = 'training-state.pt'   # in the folder of a run that has not finished
STATE_FORMAT = 'amed-training-state'
VERSION = 1


def save_training_state(path, state):
    """Write the training-loop ``state`` (a dict of plain data and tensors) to ``path`` atomically."""
    save_torch(path, dict(format=STATE_FORMAT, version=VERSION, **state))


def load_training_state(path):
    """Read a file of :func:`save_training_state` (``torch.load(weights_only=True)``: runs no
    code); ValueError (one line, naming the file) when it is not one."""
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:      # torch gives a bare OSError for a truncated file: name the file and the cause
        raise ValueError(f'{path} is not an AMED training state ({torch_file_problem(path)})') from None
    if not isinstance(data, dict) or data.get('format') != STATE_FORMAT or data.get('version') != VERSION:
        raise ValueError(f'{path} is not an AMED training state (no format tag {STATE_FORMAT!r}, version {VERSION})')
    return data
