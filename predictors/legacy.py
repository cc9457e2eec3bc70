"""Loading the published AMED predictors (NVIDIA-persistence pickles of the official code).

A published snapshot ``network-snapshot-*.pkl`` is a dict with ``'model'`` (a persistent
``AMED_predictor``) and ``'loss_fn'`` (a persistent ``AMED_loss`` whose state holds function
objects ``solvers_amed.<sampler>`` and CUDA tensors). Their embedded sources import
``torch_utils.persistence``, ``torch_utils.distributed``, ``solver_utils.get_schedule`` and (before
June 2024 for the predictor, always for the loss) ``solvers_amed`` (the official code).

This module provides ``solvers_amed`` only while such a file is being unpickled (a stand-in module
whose sampler functions refuse to run: we sample with :mod:`solvers`), loads every tensor on the
CPU, and wraps the predictor so that it answers our predictor interface. Nothing else in the
codebase depends on the legacy names.
"""

import contextlib
import sys
import types

import torch

import solvers
from predictors.settings import SolverSettings
from torch_utils import persistence

LEGACY_SAMPLERS = tuple(cls.legacy_name for cls in solvers.REGISTRY.values())


def _make_solvers_amed():
    module = types.ModuleType('solvers_amed', 'Stand-in for the official solvers_amed (unpickling only).')

    def make(name):
        def sampler(*args, **kwargs):
            raise RuntimeError(f'solvers_amed.{name} is a stand-in for unpickling; sample with solvers.py')
        sampler.__name__ = sampler.__qualname__ = name
        sampler.__module__ = 'solvers_amed'
        return sampler

    for name in LEGACY_SAMPLERS:
        setattr(module, name, make(name))
    return module


SOLVERS_AMED = _make_solvers_amed()


@contextlib.contextmanager
def legacy_modules():
    """Make ``import solvers_amed`` work (for unpickling or writing published-format files)."""
    previous = sys.modules.get('solvers_amed')
    sys.modules['solvers_amed'] = SOLVERS_AMED
    try:
        yield SOLVERS_AMED
    finally:
        if previous is None:
            sys.modules.pop('solvers_amed', None)
        else:
            sys.modules['solvers_amed'] = previous


class LegacyPredictor(torch.nn.Module):
    """A published ``AMED_predictor`` behind our interface ``(feature, t_cur, t_next) -> (r, c, a)``.

    Handles both output conventions (the official code): a bare r when both scale heads are
    off; a pair that is (r, scale_time) when ``scale_time`` is set and (r, scale_dir) otherwise; or
    the triple. A bare r is never split along the batch (the official [*output] bug)."""

    needs_feature = True

    def __init__(self, net):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def forward(self, feature, t_cur, t_next):
        b, dev = feature.shape[0], feature.device
        t_cur = torch.as_tensor(t_cur, dtype=torch.float32, device=dev).reshape(1)
        t_next = torch.as_tensor(t_next, dtype=torch.float32, device=dev).reshape(1)
        out = self.net(feature.float(), t_cur, t_next)
        ones = torch.ones(b, device=dev)
        if isinstance(out, torch.Tensor):
            r, c, a = out, ones, ones
        elif len(out) == 2:
            r, other = out
            c, a = (ones, other) if getattr(self.net, 'scale_time', 0) else (other, ones)
        elif len(out) == 3:
            r, c, a = out
        else:
            raise ValueError(f'unexpected AMED_predictor output of length {len(out)}')
        return r.reshape(b), c.reshape(b), a.reshape(b)


def solver_settings_of(net):
    """The :class:`~predictors.settings.SolverSettings` of an official predictor, from its attributes
    (``sampler_stu``, ``num_steps``, the schedule, ``afs`` and the options its solver takes)."""
    takes = solvers.solver_class(net.sampler_stu, 'sampler_stu').options
    official = dict(max_order=lambda v: None if v is None else int(v), predict_x0=bool, lower_order_final=bool)
    options = {k: convert(getattr(net, k)) for k, convert in official.items() if k in takes}
    return SolverSettings(net.sampler_stu, num_steps=int(net.num_steps), options=options,
                          schedule_type=net.schedule_type, schedule_rho=float(net.schedule_rho), afs=bool(net.afs))


def settings_of(net):
    """Our predictor settings from the config attributes of an official predictor: its solver
    settings (:func:`solver_settings_of`), the model and the training recipe."""
    guidance_type = getattr(net, 'guidance_type', None)
    guided = guidance_type not in ('None', None)
    return dict(solver_settings_of(net).to_dict(), dataset_name=net.dataset_name,
                guidance_type=guidance_type if guided else None,
                guidance_rate=getattr(net, 'guidance_rate', None) if guided else None,
                sampler_tea=getattr(net, 'sampler_tea', None), M=getattr(net, 'M', None))


def load_published_predictor(path, device='cpu', verbose=True):
    """Load a published AMED predictor pickle (path or URL) on ``device``, also without CUDA.

    Returns (predictor, settings). Prints a one-line note: unpickling executes code."""
    with legacy_modules():
        data = persistence.load_pickle(path, 'AMED predictor', verbose=verbose)
    if not isinstance(data, dict) or 'model' not in data:
        raise ValueError(f"{path}: not an AMED predictor pickle (no 'model' entry)")
    net = data['model']
    missing = [a for a in ('sampler_stu', 'num_steps', 'schedule_type', 'schedule_rho', 'afs', 'dataset_name')
               if not hasattr(net, a)]
    if missing:
        raise ValueError(f"{path}: the 'model' entry lacks the predictor settings {', '.join(missing)}")
    return LegacyPredictor(net).to(device), settings_of(net)
