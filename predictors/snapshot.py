"""Predictor files: our code-free snapshot format, and finding a run's snapshot (a run folder or an
experiment number). Reading any predictor is :func:`predictors.load_predictor`.

A snapshot is a ``torch.save``'d dict of plain data and tensors only::

    {'format': 'amed-predictor', 'version': 1,
     'predictor_config': {...},      # AMEDPredictor constructor arguments
     'settings': {...},              # how the predictor was trained / is meant to be sampled with
     'state_dict': {name: tensor},   # CPU tensors
     'progress': {'kimg': ..., 'total_kimg': ..., 'partial': bool}}   # snapshots written in training

so :func:`load_snapshot` reads it with ``torch.load(weights_only=True)`` and executes no code.
NVIDIA-persistence pickles (the official ``.pkl`` predictors) are a different format that embeds
source code; :func:`load_snapshot` refuses them and :func:`predictors.load_predictor` hands them to
:func:`predictors.legacy.load_published_predictor`. A run folder or experiment number resolves to
the run's latest snapshot only once the run is complete (:func:`run_snapshot`).

An unfinished run also holds ``training-state.pt`` (:mod:`training.state`), from which
``train.py --resume`` continues.
"""

import io
import json
import os
import pickle
import re
import warnings
import zipfile

import torch

from torch_utils.misc import atomic_write, state_dict_mismatch, torch_file_problem

from predictors import experiments
from predictors.networks import build_predictor

__all__ = ['FORMAT', 'VERSION', 'save_snapshot', 'load_snapshot', 'resolve_predictor_path', 'latest_snapshot',
           'find_run', 'resolve_run_dir', 'run_snapshot', 'check_compatible', 'save_torch']

FORMAT = 'amed-predictor'
VERSION = 1
SNAPSHOT_RE = re.compile(r'^network-snapshot-(\d+)\.(pt|pkl)$')
SEARCH_DIRS = ('exps', 'exp')   # ./exps (ours), ./exp (where the official README puts the published predictors)


def _plain(name, value):
    """``value`` as plain JSON data (dicts with str keys, lists, str, int, float, bool, None).

    Tuples become lists. Raises ValueError if ``value`` is not JSON-serialisable (NaN and
    infinities included)."""
    if not isinstance(value, dict):
        raise ValueError(f'{name} must be a dict, got {type(value).__name__}')
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f'{name} is not JSON-serialisable: {e}') from None


def save_torch(path, data):
    """``torch.save`` ``data`` to ``path`` atomically (:func:`~torch_utils.misc.atomic_write`)."""
    buffer = io.BytesIO()   # serialised first: torch's writer turns a failed write into a RuntimeError
    torch.save(data, buffer)

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def save_snapshot(path, predictor, settings, progress=None):
    """Write ``predictor`` and ``settings`` to ``path`` atomically.

    Args:
        path: destination file (conventionally ``*.pt``); its folder must exist.
        predictor: an :class:`~predictors.networks.AMEDPredictor` (or a wrapper such as DDP whose
            ``.module`` is one).
        settings: JSON-serialisable dict chosen by the caller (solver, num_steps, schedule, afs,
            ...); stored as plain data (tuples come back as lists).
        progress: optional ``dict(kimg=..., total_kimg=..., partial=bool)``, stored as the
            top-level field ``progress``: how far training had got (``partial``: before the end
            of the run, e.g. a periodic or an interrupted run's snapshot).

    The file is first written to a temporary file in the same folder and then moved into place
    with ``os.replace``; on any error the temporary file is removed and ``path`` is untouched.
    """
    if not hasattr(predictor, 'config') and hasattr(predictor, 'module'):
        predictor = predictor.module
    data = {
        'format': FORMAT,
        'version': VERSION,
        'predictor_config': _plain('predictor_config', predictor.config()),
        'settings': _plain('settings', settings),
        'state_dict': {k: v.detach().cpu() for k, v in predictor.state_dict().items()},
    }
    if progress is not None:
        data['progress'] = _plain('progress', progress)
    save_torch(path, data)


def load_snapshot(path, device='cpu'):
    """Load a snapshot written by :func:`save_snapshot`; executes no code from the file.

    Returns:
        ``(predictor, settings)``: the :class:`~predictors.networks.AMEDPredictor` in eval mode with
        ``requires_grad=False`` on ``device``, and the settings dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an AMED predictor snapshot (unreadable, another torch file, a
            pickle such as the official NVIDIA-persistence ``.pkl``), or has another format/version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'AMED predictor snapshot not found: {path}')
    if os.path.isdir(path):
        raise ValueError(f'{path} is a directory, not an AMED predictor snapshot')
    not_ours = f'{path} is not an AMED predictor snapshot'
    try:
        with warnings.catch_warnings():     # torch warns about the protocol of plain pickles
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            data = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            raise ValueError(f'{not_ours} (a torch file holding objects other than plain data and tensors)') from None
        problem = torch_file_problem(path)
        if problem.startswith('a pickle'):
            problem += ': a plain or NVIDIA pickle is refused here; NVIDIA-pickle predictors (.pkl) are loaded ' \
                       'through the persistence path'
        raise ValueError(f'{not_ours} ({problem})') from None
    except OSError as e:
        if e.filename is not None:          # e.g. permission denied: say so, not 'not a snapshot'
            raise
        raise ValueError(f'{not_ours} ({torch_file_problem(path)})') from None   # torch's bare OSError
    except Exception:
        raise ValueError(f'{not_ours} ({torch_file_problem(path)})') from None

    if not isinstance(data, dict) or data.get('format') != FORMAT:
        raise ValueError(f'{not_ours} (no format tag {FORMAT!r})')
    if data.get('version') != VERSION:
        raise ValueError(f'{path}: unsupported AMED predictor snapshot version {data.get("version")!r} '
                         f'(this code reads version {VERSION})')
    config, settings, state = data.get('predictor_config'), data.get('settings'), data.get('state_dict')
    if not isinstance(config, dict) or not isinstance(settings, dict) or not isinstance(state, dict):
        raise ValueError(f'{path}: corrupt AMED predictor snapshot (missing predictor_config, settings or state_dict)')

    # Building the module draws its (discarded) initial weights: keep the global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        try:
            predictor = build_predictor(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f'{path}: bad predictor_config in AMED predictor snapshot: {e}') from None
    mismatch = state_dict_mismatch(predictor, state)
    if mismatch:
        raise ValueError(f'{path}: state_dict does not match predictor_config: {mismatch}')
    predictor.load_state_dict(state, strict=True)
    predictor.eval().requires_grad_(False)
    return predictor.to(device), settings


# ----------------------------------------------------------------------------------------------
# Any predictor file: ours, a run folder, an experiment number, a published pickle.

def latest_snapshot(run_dir):
    """The snapshot with the largest kimg in a run folder (ours .pt or published .pkl)."""
    found = []
    for entry in os.listdir(run_dir):
        m = SNAPSHOT_RE.match(entry)
        if m:
            found.append((int(m.group(1)), entry.endswith('.pt'), entry))
    if not found:
        raise FileNotFoundError(f'no network-snapshot-*.pt or *.pkl in {run_dir}')
    return os.path.join(run_dir, max(found)[2])


def find_run(run_id, search_dirs=SEARCH_DIRS):
    """The folder of experiment number ``run_id`` (``NNNNN-...``) in ./exps or ./exp; one-line
    FileNotFoundError / ValueError when no run or more than one matches."""
    matches = []
    for d in search_dirs:
        if os.path.lexists(d) and not os.path.exists(d):
            raise ValueError(f'./{d} is a symbolic link that leads nowhere (a loop or a missing target): '
                             f'fix it, or give the run folder')
        if os.path.isdir(d):
            for entry in sorted(os.listdir(d)):
                m = re.match(r'^(\d+)-', entry)
                if m and int(m.group(1)) == run_id and os.path.isdir(os.path.join(d, entry)):
                    matches.append(os.path.join(d, entry))
    if not matches:
        raise FileNotFoundError(f"experiment {run_id} not found in {' or '.join('./' + d for d in search_dirs)}")
    if len(matches) > 1:
        raise ValueError(f"experiment {run_id} is ambiguous: {', '.join(matches)}")
    return matches[0]


def resolve_run_dir(spec, search_dirs=SEARCH_DIRS):
    """``spec`` is a run folder or an experiment number (:func:`find_run`); returns the folder."""
    spec = str(spec)
    if re.fullmatch(r'\d+', spec):
        return find_run(int(spec), search_dirs)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f'run folder not found: {spec}')
    return spec


def run_snapshot(run_dir):
    """The final snapshot of a run folder; ValueError (one line) when the run is incomplete."""
    reason = experiments.incomplete_reason(run_dir)
    if reason is not None:
        raise ValueError(reason)
    return latest_snapshot(run_dir)


def resolve_predictor_path(spec, search_dirs=SEARCH_DIRS):
    """``spec`` is a snapshot file (or URL), a run folder, or an experiment number such as '3' or
    '00003', looked up in ./exps and ./exp. Returns the snapshot path; raises FileNotFoundError /
    ValueError with one line when nothing or more than one run matches, or when the run is
    incomplete (an explicit snapshot file of an incomplete run is accepted)."""
    spec = str(spec)
    if re.fullmatch(r'\d+', spec) or os.path.isdir(spec):
        return run_snapshot(resolve_run_dir(spec, search_dirs))
    if '://' in spec:
        return spec
    if not os.path.exists(spec):
        what = 'solver card' if spec.endswith('.json') else 'predictor file'
        raise FileNotFoundError(f'{what} not found: {spec}')
    return spec


def check_compatible(settings, model):
    """Raise ValueError (one line) when a predictor was trained for another model."""
    if settings.get('dataset_name') not in (None, getattr(model, 'dataset_name', None)):
        raise ValueError(f"the predictor was trained for dataset {settings['dataset_name']!r}, "
                         f"not {getattr(model, 'dataset_name', None)!r}")
    if tuple(settings.get('img_shape', model.img_shape)) != tuple(model.img_shape):
        raise ValueError(f"the predictor was trained for images of shape {tuple(settings['img_shape'])}, "
                         f"the model makes {tuple(model.img_shape)}")
    if int(settings.get('label_dim', model.label_dim)) != int(model.label_dim):
        raise ValueError(f"the predictor was trained for label_dim {settings['label_dim']}, "
                         f"the model has {model.label_dim}")
