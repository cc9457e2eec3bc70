"""Experiment folders: naming and creating new runs, and their training_options.json, which also
says whether the run is complete (finding a run's predictor is
:func:`predictors.snapshot.resolve_predictor_path`).

A run lives in ``<outdir>/NNNNN-<dataset>-<num_steps>-<nfe>-<student>-<teacher>-<M>-<schedule>[-afs][-<desc>]``
(as the official code's, except that ``--desc`` is joined with a '-').
"""

import json
import os
import re

import solvers
from dnnlib.util import read_settings_text
from torch_utils import locks
from torch_utils.misc import atomic_write

OPTIONS_FILE = 'training_options.json'


def schedule_tag(schedule_type, schedule_rho):
    """The schedule part of a run name, as the official code writes it (e.g. 'poly7.0', 'uni1.0';
    'explicit' for a schedule given as its noise levels)."""
    rho = float(schedule_rho)
    return {'polynomial': f'poly{rho}', 'logsnr': 'logsnr', 'time_uniform': f'uni{rho}',
            'discrete': 'discrete', 'explicit': 'explicit'}[schedule_type]


def run_name(run_id, dataset_name, num_steps, nfe, sampler_stu, sampler_tea, M, schedule_type, schedule_rho,
             afs, desc=None, trajectory=False):
    """The run folder name; ``trajectory`` (the --loss=trajectory runs) adds '-traj' after the
    official fields, before the description."""
    name = (f'{run_id:05d}-{dataset_name}-{num_steps}-{nfe}-{sampler_stu}-{sampler_tea}-{M}-'
            f'{schedule_tag(schedule_type, schedule_rho)}')
    if afs:
        name += '-afs'
    if trajectory:
        name += '-traj'
    if desc:
        if not re.fullmatch(r'[A-Za-z0-9_.+=-]+', desc):
            raise ValueError(f'desc {desc!r} may contain only letters, digits and _.+=-')
        name += f'-{desc}'
    return name


def training_nfe(num_steps, afs, calls_per_eval=1):
    """NFE of the student with a predictor, as in the run name (doubled under CFG)."""
    return solvers.count_nfe('amed', num_steps, afs, with_predictor=True, calls_per_eval=calls_per_eval)


def _run_ids(outdir):
    ids = []
    if os.path.isdir(outdir):
        for entry in os.listdir(outdir):
            m = re.match(r'^(\d+)', entry)
            if m:
                ids.append(int(m.group(1)))
    return ids


def next_run_id(outdir):
    """The id of the next run in ``outdir``: 1 + the largest existing id (0 if none)."""
    return max(_run_ids(outdir), default=-1) + 1


def make_run_dir(outdir, name_fn):
    """Create a new run folder ``outdir/<name_fn(id)>`` with id = 1 + the largest existing id (0 if
    none) and lock it (:class:`torch_utils.locks.Lock`); returns (folder, lock). The id is reserved
    under a lock of ``outdir`` (waited for: another run may be picking its number), so two runs
    started at once never get the same number; creation is exclusive as well."""
    os.makedirs(outdir, exist_ok=True)
    with locks.Lock(outdir, f'the experiments folder {outdir}', wait=60.0):
        run_id = next_run_id(outdir)
        for _ in range(100):
            path = os.path.join(outdir, name_fn(run_id))
            try:
                os.makedirs(path)
            except FileExistsError:
                run_id = max(_run_ids(outdir) + [run_id]) + 1
                continue
            return path, locks.Lock(path, f'run {path}')
    raise RuntimeError(f'could not create a new run folder in {outdir}')


def run_identity(options):
    """What makes a run's training state its own: the options that decide the trained weights
    (stored in the training state; :func:`check_state_belongs`)."""
    keys = ('dataset_name', 'model_path', 'batch', 'total_kimg', 'lr', 'seed', 'loss', 'inter_weight', 'settings',
            'predictor_kwargs', 'predictor_path')
    return json.loads(json.dumps({k: options.get(k) for k in keys}))


def check_state_belongs(state, options, path):
    """ValueError (one line) when the training ``state`` read from ``path`` was saved by a run
    with other options than ``options`` (e.g. copied from another run folder). States of older
    code, which do not record their run, are taken as they are."""
    if not state or 'identity' not in state:
        return
    saved, ours = state['identity'], run_identity(options)
    for key in ours:
        if saved.get(key) != ours[key]:
            raise ValueError(f'{path} belongs to another run: its {key} is {saved.get(key)!r}, this run\'s is '
                             f'{ours[key]!r}; remove it to restart the run from its beginning')


# ----------------------------------------------------------------------------------------------
# The run's options file, which also says how far the run got: ``complete`` (false until the
# final snapshot is written) and ``kimg`` (thousands of trajectories in the latest saved state).

def read_run_options(run_dir):
    """The options stored in ``run_dir``'s training_options.json; ValueError (one line) without it."""
    path = os.path.join(run_dir, OPTIONS_FILE)
    try:
        options = json.loads(read_settings_text(path, 'training options file'))
    except FileNotFoundError:
        raise ValueError(f'{run_dir} is not a training run folder (no {OPTIONS_FILE})') from None
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is unreadable: {e}') from None
    if not isinstance(options, dict):
        raise ValueError(f'{path} is not a dict of training options')
    return options


def write_run_options(run_dir, options):
    """Write ``options`` to ``run_dir``'s training_options.json atomically."""
    def write(tmp):
        with open(tmp, 'wt') as f:
            json.dump(options, f, indent=2)
    atomic_write(os.path.join(run_dir, OPTIONS_FILE), write)


def mark_run(run_dir, kimg, complete):
    """Record in training_options.json how far the run got (created if missing)."""
    path = os.path.join(run_dir, OPTIONS_FILE)
    options = read_run_options(run_dir) if os.path.exists(path) else {}
    write_run_options(run_dir, dict(options, kimg=kimg, complete=complete))


def incomplete_reason(run_dir):
    """None for a finished run (and for folders without our options file or its ``complete``
    field, such as published predictors and runs of older code), else a one-line explanation."""
    if not os.path.exists(os.path.join(run_dir, OPTIONS_FILE)):
        return None
    options = read_run_options(run_dir)
    if options.get('complete', True):
        return None
    total = f" of {options['total_kimg']:g}" if 'total_kimg' in options else ''
    return (f"run {run_dir} is incomplete ({options.get('kimg', 0):g}{total} kimg saved): resume it with "
            f"train.py --resume={run_dir}, or pass one of its snapshot files explicitly")
