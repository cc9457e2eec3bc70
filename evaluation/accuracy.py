"""Accuracy of solvers: error to the reference ODE solution from the same noise, at a given NFE.

The reference is the model's own ``ode_solution_from_noise``: exact up to 2e-8 on the analytic
mixture (``toy``, ``toy_cond``), a converged RK4 solve of the learned ``toy_unet``."""

import hashlib
import math

import torch

import solvers
from models.base import seeded_inputs
from training import RECIPES, plan_training, run_training
from predictors import load_predictor

#: The plain solvers on their paper schedules (the official toolbox's recommended settings):
#: (label, solver options).
PLAIN = [
    ('Euler', dict(solver='euler', schedule_type='polynomial', schedule_rho=7.0)),
    ('iPNDM', dict(solver='ipndm', max_order=4, schedule_type='polynomial', schedule_rho=7.0)),
    ('iPNDM_v', dict(solver='ipndm_v', max_order=4, schedule_type='polynomial', schedule_rho=7.0)),
    ('DEIS-tAB3', dict(solver='deis', max_order=4, deis_mode='tab', schedule_type='time_uniform', schedule_rho=2.0)),
    ('UniPC-3', dict(solver='unipc', max_order=3, variant='bh2', schedule_type='logsnr')),
    ('DPM-Solver++(3M)', dict(solver='dpmpp', max_order=3, schedule_type='logsnr')),
    ('DPM-Solver-2', dict(solver='dpm', schedule_type='polynomial', schedule_rho=7.0)),
]
#: The comparison of the quickstart: the four plain solvers of the paper's tables, in its order.
BASELINES = [(label, dict(PLAIN)[label]) for label in ('iPNDM', 'DPM-Solver-2', 'DPM-Solver++(3M)', 'Euler')]

#: The learned methods by short name: the recipes of :mod:`training.recipes` they come from.
RECIPE_NAMES = {'amed': 'paper-solver', 'ipndm': 'paper-plugin', 'dpmpp': 'plugin-dpmpp', 'recommended': 'recommended'}
#: The students of the comparisons by short name: the solver part and the learning rate of the
#: training recipes, trained at each NFE with AFS (``recommended`` also fixes its loss and its
#: predictor, a table). A recipe whose values change with the number of time points
#: (``Recipe.by_num_steps``) is named (``recipe``) and leaves those values to it.
def _student(name):
    r = RECIPES[name]
    ruled = {k for values in r.by_num_steps.values() for k in values}
    options = {k: v for k, v in dict(r.solver, lr=r.run['lr']).items() if k not in ruled}
    return dict(options, recipe=name) if ruled else options


AMED_RECIPES = {key: _student(name) for key, name in RECIPE_NAMES.items()}
AMED_LABELS = {key: RECIPES[name].label for key, name in RECIPE_NAMES.items()}


def steps_for_nfe(solver, nfe, afs, with_predictor):
    """The number of time points N whose run costs exactly ``nfe`` evaluations (ValueError if none)."""
    for n in range(2, nfe + 3):
        if solvers.count_nfe(solver, n, afs, with_predictor) == nfe:
            return n
    raise ValueError(f'no num_steps gives NFE {nfe} for {solver} (afs={afs}, predictor={with_predictor})')


def rms_error(x, exact):
    """Mean over samples of the per-sample root-mean-square pixel difference."""
    return (x.double() - exact.double()).flatten(1).square().mean(1).sqrt().mean().item()


@torch.no_grad()
def exact_solution(model, latents, sigma_max, sigma_min, cond=None, steps_per_unit=None):
    """The model's reference ODE solution at ``sigma_min`` (``steps_per_unit`` None: its default accuracy)."""
    return model.ode_solution_from_noise(latents.double(), sigma_max, [sigma_min], cond=cond,
                                         steps_per_unit=steps_per_unit)[-1]


@torch.no_grad()
def sample_all(model, latents, cond=None, predictor=None, batch=64, **solver_kwargs):
    """``solvers.sample`` over ``latents`` in batches of ``batch``; the final states, concatenated."""
    outs = []
    for i in range(0, latents.shape[0], batch):
        c = None if cond is None else cond[i:i + batch]
        outs.append(solvers.sample(model, latents[i:i + batch], c, predictor=predictor, **solver_kwargs))
    return torch.cat(outs)


def baseline_samples(model, latents, cond, nfe, batch=64):
    """(label, samples) of every plain solver of :data:`BASELINES` at ``nfe``, with AFS."""
    return [(label, sample_all(model, latents, cond, batch=batch, afs=True, **kwargs,
                               num_steps=steps_for_nfe(kwargs['solver'], nfe, afs=True, with_predictor=False)))
            for label, kwargs in BASELINES]


def solver_error(model, latents, exact, cond=None, predictor=None, batch=64, **solver_kwargs):
    """RMS error (see :func:`rms_error`) of one solver configuration against ``exact``."""
    return rms_error(sample_all(model, latents, cond, predictor, batch, **solver_kwargs), exact)


def model_fingerprint(model, latents, cond):
    """sha256 of the model's denoised output on a few of the latents: a cache key that changes
    when the model does."""
    with torch.no_grad():
        c = None if cond is None else cond[:2]
        out = model(latents[:2] * 10.0, torch.full((2,), 10.0), c)
    return hashlib.sha256(out.double().cpu().numpy().tobytes()).hexdigest()[:16]


def reference_set(model, seeds, device=torch.device('cpu'), steps_per_unit=None):
    """(latents, cond, reference ODE solutions) of the given sampling seeds (:func:`seeded_inputs`);
    ``steps_per_unit`` None: the model's default accuracy."""
    latents, cond = seeded_inputs(model, seeds, device)
    exact = exact_solution(model, latents, model.sigma_max, model.sigma_min, cond, steps_per_unit=steps_per_unit)
    return latents, cond, exact


def train_recipe(recipe, nfe, device=torch.device('cpu'), progress=False, **options):
    """Train one AMED predictor with the training options ``recipe`` (e.g. an entry of
    :data:`AMED_RECIPES`) plus ``options``, with AFS, at ``nfe``. Returns (snapshot path,
    predictor, settings)."""
    opts = dict(recipe, afs=True, **options)
    opts['num_steps'] = steps_for_nfe(opts['sampler_stu'], nfe, afs=True, with_predictor=True)
    _, path = run_training(plan_training(opts, device), progress=progress)
    predictor, settings = load_predictor(path)[:2]
    return path, predictor, settings


def format_table(rows, nfes, title='RMS error to the exact ODE solution'):
    """Markdown table: rows are (label, {nfe: value})."""
    head = f"| {title} | " + ' | '.join(f'NFE {n}' for n in nfes) + ' |'
    sep = '|---|' + '---|' * len(nfes)
    lines = [head, sep]
    for label, values in rows:
        cells = [('%.4f' % values[n]) if n in values and not math.isnan(values[n]) else '-' for n in nfes]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
