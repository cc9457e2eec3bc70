"""Solver cards: an AMED predictor turned into a portable static schedule (a small JSON file).

A card fixes, for every interval [t_n, t_{n+1}] of the student's schedule, the predictor's
(r, scale_dir, scale_time), so that sampling needs neither the predictor nor the model feature::

    python -m integrations.card export --predictor_path=<run folder | exp number | .pt | .pkl> --out=card.json
    python sample.py --card=card.json --seeds=0-63 ...

The format, reading and writing: :mod:`predictors.card` (re-exported here).

**The export of a feature-reading predictor is an approximation.** A trained predictor reads the
model's 8x8 feature of each sample, a card cannot. ``--feature`` says how the feature is fixed:

* ``mean`` (default, chosen by measurement, see README): run the predictor dynamically along real
  trajectories of a batch of calibration seeds and average its (r, scale_dir, scale_time) per step;
* ``mean_feature``: the same trajectories, but the predictor is queried once per step on the
  feature averaged over the batch;
* ``zero``: the predictor reads a zero feature, as the official diffusers example does (and as AFS
  steps always do).
"""

import json
import os

import click
import torch

import cli
import solvers
from dnnlib.util import read_settings_text
from models.base import seeded_inputs
from models.presets import load_model
from predictors import load_predictor, snapshot
from predictors.card import (FORMAT, VERSION, REQUIRED, CardPredictor, build_card, card_settings,  # noqa: F401
                             card_solver_settings, kdiffusion_sigmas, load_card, save_card, schedule_points,
                             tail_steps)
from torch_utils.locks import Lock
from torch_utils.misc import check_output_file, parse_seeds

FEATURE_MODES = ('mean', 'mean_feature', 'zero')
DEFAULT_FEATURE = 'mean'
DEFAULT_SEEDS = '1000-1063'       # calibration seeds: keep them apart from evaluation seeds


# ----------------------------------------------------------------------------------------------
# Fixing the feature: per-step (r, scale_dir, scale_time) of a predictor.

class _FeatureRecorder:
    """Wraps a predictor and keeps the sum of the features it reads, per step."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.needs_feature = getattr(predictor, 'needs_feature', True)
        self.sums, self.index = {}, 0

    def __call__(self, feature, t_cur, t_next):
        f = feature.detach().double().sum(0)
        self.sums[self.index] = self.sums.get(self.index, 0) + f
        self.index += 1
        return self.predictor(feature, t_cur, t_next)


def _query(predictor, feature, t_cur, t_next):
    out = predictor(feature, t_cur, t_next)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ValueError('an AMED predictor must return the triple (r, scale_dir, scale_time)')
    return [float(v.reshape(-1)[0]) for v in out]


@torch.no_grad()
def static_steps(model, spec, t_steps, predictor, afs, feature=DEFAULT_FEATURE, seeds=DEFAULT_SEEDS, batch=64,
                 device='cpu'):
    """(r, scale_dir, scale_time) per interval of ``t_steps`` with the feature fixed as ``feature``
    (see the module docstring); lists of N-1 floats."""
    if feature not in FEATURE_MODES:
        raise ValueError(f"unknown feature mode {feature!r} (choose one of {', '.join(FEATURE_MODES)})")
    t_list = [float(t) for t in t_steps]
    intervals = list(zip(t_list[:-1], t_list[1:]))
    zero = torch.zeros(1, 8, 8, device=device)
    if feature == 'zero':
        return [list(v) for v in zip(*[_query(predictor, zero, tc, tn) for tc, tn in intervals])]
    seed_list = parse_seeds(seeds)
    if not seed_list:
        raise ValueError('the calibration needs at least one seed')
    model.check_seeds(seed_list)
    recorder = _FeatureRecorder(predictor)
    sums = torch.zeros(len(intervals), 3, dtype=torch.float64)
    for i in range(0, len(seed_list), batch):
        part = seed_list[i:i + batch]
        latents, cond = seeded_inputs(model, part, device)
        recorder.index = 0
        for n, (_, info) in enumerate(solvers.iterate(model, spec, latents * t_list[0], t_list, cond, recorder, afs)):
            sums[n] += torch.stack([v.double().sum().cpu() for v in (info.r, info.scale_dir, info.scale_time)])
    if feature == 'mean':
        return [list(v) for v in zip(*(sums / len(seed_list)).tolist())]
    means = [(recorder.sums[n] / len(seed_list)).to(zero)[None] for n in range(len(intervals))]
    return [list(v) for v in zip(*[_query(predictor, f, tc, tn) for f, (tc, tn) in zip(means, intervals)])]


def export_card(predictor_path, feature=DEFAULT_FEATURE, seeds=DEFAULT_SEEDS, batch=64, model=None, model_path=None,
                classifier_path=None, prompt=None, prompt_path=None, device='cpu'):
    """The card of a predictor (snapshot, run folder, experiment number or published pickle).

    The model (needed for the schedule and, for the ``mean`` modes, the calibration trajectories)
    is ``model`` or loaded from the predictor's settings (``model_path`` overrides theirs)."""
    predictor, settings, solver_settings, source = load_predictor(predictor_path, device=device)
    if source['kind'] == 'card':
        raise ValueError(f'{predictor_path} is a solver card already')
    if model is None:
        model = load_model(settings['dataset_name'], model_path or settings.get('model_path'),
                           settings.get('guidance_type'), settings.get('guidance_rate'), classifier_path=classifier_path,
                           prompt_path=prompt_path, prompt=prompt, device=device)
    snapshot.check_compatible(settings, model)
    spec, t_steps = solver_settings.prepare(model, predictor)
    afs = solver_settings.afs
    values = static_steps(model, spec, t_steps, predictor, afs, feature, seeds, batch, device)
    path = source['path']
    options_file = os.path.join(os.path.dirname(os.path.abspath(path)), 'training_options.json')
    training_options = None
    if '://' not in path and os.path.isfile(options_file):
        training_options = json.loads(read_settings_text(options_file, 'training options file'))
    provenance = dict(predictor_path=str(predictor_path), predictor_file=os.path.basename(path),
                      predictor_sha256=source['sha256'], settings=settings, training_options=training_options)
    feature_info = dict(mode=feature, seeds=None if feature == 'zero' else str(seeds),
                        reads_feature=bool(getattr(predictor, 'needs_feature', True)))
    model_info = dict(dataset_name=settings.get('dataset_name'), model_path=model_path or settings.get('model_path'),
                      guidance_type=settings.get('guidance_type'), guidance_rate=settings.get('guidance_rate'))
    schedule = dict(schedule_type=solver_settings.schedule_type, schedule_rho=solver_settings.schedule_rho)
    return build_card(model, spec, t_steps, afs, *values, model_info=model_info, schedule=schedule,
                      feature=feature_info, provenance=provenance)


# ----------------------------------------------------------------------------------------------
# Command line.

EXAMPLES = """
Examples:
  python -m integrations.card export --predictor_path=3 --out=card.json            # experiment 3
  python -m integrations.card export --predictor_path=exps/00003-.../network-snapshot-000010.pt \\
      --out=card.json --feature=zero
  python sample.py --predictor_path=card.json --seeds=0-63 --grid                  # sample with it
"""


@click.group(epilog=cli.epilog(EXAMPLES))
def main():
    """Solver cards: static AMED schedules as JSON."""


@main.command(epilog=cli.epilog(EXAMPLES))
@click.option('--predictor_path', help='Predictor snapshot, run folder, experiment number or published .pkl',
              type=str, required=True)
@click.option('--out', help='Card file to write (JSON)', type=str, required=True)
@click.option('--feature', help='How the feature of a feature-reading predictor is fixed',
              type=click.Choice(FEATURE_MODES), default=DEFAULT_FEATURE, show_default=True)
@click.option('--seeds', help='Calibration seeds of the mean modes', type=str, default=DEFAULT_SEEDS, show_default=True)
@click.option('--batch', help='Calibration batch', type=click.IntRange(min=1), default=64, show_default=True)
@cli.model_options('model_path', 'classifier_path', 'prompt', 'prompt_path', 'device', device_default='cpu')
@click.option('--overwrite', help='Replace --out if it exists', is_flag=True)
@cli.user_errors
def export(predictor_path, out, feature, seeds, batch, model_path, classifier_path, prompt, prompt_path, device,
           overwrite):
    """Export the solver card of a predictor. --out is checked (and locked) before the calibration;
    an existing card is replaced only with --overwrite."""
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device=cuda: CUDA is not available here; use --device=cpu')
    check_output_file(out, '--out', overwrite)
    lock = Lock(out, f'--out {out}', is_file=True, wait=1.0)
    try:
        check_output_file(out, '--out', overwrite)   # again, now that no one else writes it
        card = export_card(predictor_path, feature, seeds, batch, model_path=model_path,
                           classifier_path=classifier_path, prompt=prompt, prompt_path=prompt_path, device=device)
        save_card(card, out)
    finally:
        lock.release(cleanup=True)
    click.echo(f"Wrote {out}: {card['solver']} card, {card['num_steps']} time points, NFE {card['nfe']}, "
               f"feature {feature}")


if __name__ == '__main__':
    cli.run(main)
