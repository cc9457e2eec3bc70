"""The AMED predictor in all its forms, and the one loader that reads any of them.

* :mod:`predictors.networks`: the network (:class:`~predictors.networks.AMEDPredictor`);
* :mod:`predictors.snapshot`: our code-free snapshot format, and a run's final snapshot;
* :mod:`predictors.legacy`: the published NVIDIA-persistence pickles of the official code;
* :mod:`predictors.experiments`: run folders (``NNNNN-<desc>``, experiment numbers, training_options.json);
* :mod:`predictors.card`: solver cards (a predictor turned into a static schedule, JSON);
* :mod:`predictors.settings`: :class:`~predictors.settings.SolverSettings`, the one value for a
  run's solver settings.

:func:`load_predictor` takes a file or URL (``.pt`` snapshot, published ``.pkl``, ``.json`` card),
a run folder or an experiment number, and returns a :class:`LoadedPredictor`: the predictor, its
solver settings, the rest of its settings (model, guidance, recipe) and where it came from.
"""

import typing

import torch

from dnnlib.util import file_identity
from predictors import card as card_format
from predictors import snapshot
from predictors.legacy import load_published_predictor
from predictors.settings import SolverSettings

__all__ = ['LoadedPredictor', 'load_predictor', 'SolverSettings']

#: What every predictor's settings say (the published pickles' too, :mod:`predictors.legacy`).
PREDICTOR_SETTINGS = ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'afs', 'dataset_name')


class LoadedPredictor(typing.NamedTuple):
    """What :func:`load_predictor` returns.

    ``predictor``: the module (or :class:`~predictors.card.CardPredictor`) to sample with (None for a
    schedule card: its plain solver runs alone);
    ``settings``: its settings dict as stored (solver settings plus dataset_name, guidance, image
    shape, training recipe ...); ``solver``: the :class:`SolverSettings` read from them;
    ``source``: where it came from, ``dict(kind='predictor'|'card', format='snapshot'|'published'|'card',
    given=<the spec>, path=<the resolved file or URL>, file=<the local file>, sha256=...)``."""
    predictor: object
    settings: dict
    solver: SolverSettings
    source: dict


def load_predictor(spec, device='cpu', verbose=True):
    """Load any predictor: our snapshot (.pt), a published pickle (.pkl) or a solver card (.json),
    given as a file or URL, a run folder or an experiment number (./exps, ./exp; the run's final
    snapshot, :func:`predictors.snapshot.resolve_predictor_path`).

    FileNotFoundError / ValueError (one line naming the file) when nothing matches, the file is
    not a predictor, its settings lack one of :data:`PREDICTOR_SETTINGS` or are invalid, or a
    weight is NaN or infinite (a diverged training: it would sample black images)."""
    given = str(spec)
    path = snapshot.resolve_predictor_path(spec)
    identity = file_identity(path)          # a URL is fetched into the download cache once, here
    local = identity['file']
    if path.endswith('.json'):
        card = card_format.load_card(local)
        predictor = card_format.card_predictor(card)      # None: a schedule card (a plain solver)
        settings = card_format.card_settings(card)
        kind, fmt = 'card', 'card'
    elif path.endswith('.pkl'):
        predictor, settings = load_published_predictor(local, device=device, verbose=verbose)
        kind, fmt = 'predictor', 'published'
    else:
        predictor, settings = snapshot.load_snapshot(local, device=device)
        kind, fmt = 'predictor', 'snapshot'
        explicit = settings.get('t_steps') is not None     # an explicit schedule replaces the schedule keys
        missing = [k for k in PREDICTOR_SETTINGS if k not in settings
                   and not (explicit and k in SolverSettings.SCHEDULE_KEYS)]
        if missing:
            raise ValueError(f"{path}: the snapshot's settings lack {', '.join(missing)} (written by another "
                             f"program, or edited)")
    try:
        solver = SolverSettings.from_dict(settings)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    state = predictor.state_dict() if hasattr(predictor, 'state_dict') else {}
    bad = sum(int((~torch.isfinite(v)).sum()) for v in state.values() if v.is_floating_point())
    if bad:
        raise ValueError(f'{path}: {bad} of the predictor\'s weights are NaN or infinite (its training diverged); '
                         f'it cannot sample')
    source = dict(kind=kind, format=fmt, given=given, path=path, file=local, sha256=identity['sha256'])
    return LoadedPredictor(predictor, settings, solver, source)
