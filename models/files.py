"""Checkpoint files of the pretrained models: finding them (local paths, official placements, the
download cache, official zips) and reading them without running code.

* :func:`load_checkpoint`: a state dict from ``.ckpt``/``.pt`` (``torch.load(weights_only=True)``;
  classes pickled beside the tensors are read as named placeholders) or ``.safetensors``.
* :func:`resolve_model_file` / :func:`find_file`: a user path, URL or zip, or the first existing
  official placement, else the official URL downloaded to the dnnlib cache; offline, one line that
  says where to put the file.
* :func:`sidecar_config`: the ``config`` dict of ``<checkpoint>.json`` (architecture overrides).
* :func:`load_strict`: a strict ``load_state_dict`` with a one-line error.
"""

import hashlib
import json
import os
import pickle
import zipfile

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.misc import atomic_write, state_dict_mismatch, torch_file_problem


def load_checkpoint(path, what):
    """The state dict of a single-file checkpoint (``.ckpt``/``.pt``: a torch file, optionally
    ``{'state_dict': ...}``; ``.safetensors``), read on the CPU without running code."""
    if os.path.isdir(path):
        raise FileNotFoundError(f'{what} file {path} is a folder, not a file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} file not found: {path}')
    try:
        if path.endswith('.safetensors'):
            import safetensors.torch
            state = safetensors.torch.load_file(path, device='cpu')
        else:
            state = _load_torch_file(path)
    except Exception as e:
        cause = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        if not path.endswith('.safetensors') and isinstance(e, (OSError, EOFError, KeyError, pickle.UnpicklingError)):
            cause = torch_file_problem(path)
        raise ValueError(f'{path}: not a readable {what} checkpoint ({cause})') from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{path}: holds no {what} state dict')
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


class _Placeholder:
    """Stands in for a class a checkpoint pickles besides its tensors (e.g. PyTorch Lightning's
    ModelCheckpoint callback in LDM's training checkpoints): it takes any arguments and state and
    runs no code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def _load_torch_file(path):
    """``torch.load(weights_only=True)``; classes other than tensors' (which weights_only refuses)
    are read as :class:`_Placeholder` subclasses of the same name, so no code from the file runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names:
            raise
    stand_ins = []
    for full in names:
        module, _, name = full.rpartition('.')
        stand_ins.append(type(name, (_Placeholder,), {'__module__': module, '__qualname__': name}))
    with torch.serialization.safe_globals(stand_ins):
        state = torch.load(path, map_location='cpu', weights_only=True)
    dist.print0(f"{path}: read {', '.join(names)} as placeholders (only the tensors are used; no code from the file runs)")
    return state


def find_file(what, candidates, url, member=None, option='--model_path'):
    """The first existing path of ``candidates``; otherwise the (cached) download of ``url``; with
    ``member``, ``url`` is a zip and the member is extracted once into the download cache.

    A failed download raises FileNotFoundError with one line that says where to put the file."""
    for path in candidates:
        if os.path.isfile(path):
            return path
    try:
        local = dnnlib.util.open_url(url, return_filename=True)
    except (dnnlib.util.DownloadError, OSError) as e:
        raise FileNotFoundError(f'{what} not found: put it at {candidates[0]} or pass {option} '
                                f'(downloading {url} failed: {str(e).splitlines()[0]})') from None
    return extract_member(local, member) if member else local


def extract_member(zip_path, member):
    """Extract a zip file once into the download cache (as the official code unpacks
    ``lsun_bedrooms.zip`` / ``vq-f4.zip``) and return the path of ``member`` (matched by basename,
    the shallowest one). Files are written atomically; an extracted file is not written again."""
    st = os.stat(zip_path)
    key = hashlib.md5(f'{os.path.abspath(zip_path)}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:16]
    target_dir = dnnlib.util.make_cache_dir_path('extracted', f'{key}_{os.path.basename(zip_path)}.d')
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if not n.endswith('/')]
            matches = [n for n in names if os.path.basename(n) == member]
            if not matches:
                raise ValueError(f'{zip_path}: no {member} inside')
            for name in names:
                target = os.path.join(target_dir, *name.split('/'))
                if os.path.isfile(target):
                    continue

                def write(tmp, name=name):
                    with zf.open(name) as src, open(tmp, 'wb') as dst:
                        while chunk := src.read(1 << 24):
                            dst.write(chunk)
                atomic_write(target, write)
    except zipfile.BadZipFile:
        raise ValueError(f'{zip_path}: not a zip file') from None
    return os.path.join(target_dir, *min(matches, key=len).split('/'))


def resolve_model_file(path, member='model.ckpt'):
    """A user-given model path: a zip (the official ``lsun_bedrooms.zip`` / ``vq-f4.zip``) is
    read through its ``member``; a URL is downloaded to the cache first."""
    if '://' in str(path):
        path = dnnlib.util.open_url(path, return_filename=True)
    if str(path).endswith('.zip'):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'file not found: {path}')
        return extract_member(path, member)
    return str(path)


def sidecar_config(path):
    """The ``config`` dict of ``<path>.json`` next to a checkpoint, or {} when there is none."""
    side = str(path) + '.json'
    if not os.path.exists(side):
        return {}
    with open(side) as f:
        config = json.load(f).get('config')
    if not isinstance(config, dict):
        raise ValueError(f"{side}: no 'config' dict")
    return config


def load_strict(module, state, path, what):
    """``module.load_state_dict(state, strict=True)`` with a one-line ValueError naming the file and
    what does not fit (:func:`torch_utils.misc.state_dict_mismatch`)."""
    mismatch = state_dict_mismatch(module, state)
    try:
        if mismatch is None:
            module.load_state_dict(state, strict=True)
    except RuntimeError as e:   # what the summary lets through (e.g. batch-norm counters): torch's first reason
        mismatch = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).strip())
    if mismatch:
        raise ValueError(f'{path}: does not match the {what} architecture ({mismatch})')
    return module
