"""Solver cards: an AMED predictor turned into a portable static schedule (a small JSON file).

A card fixes, for every interval [t_n, t_{n+1}] of the student's schedule, the predictor's
(r, scale_dir, scale_time), so that sampling needs neither the predictor nor the model feature::

    python -m integrations.card export --predictor_path=<run folder | exp number | .pt | .pkl> --out=card.json
    python sample.py --card=card.json --seeds=0-63 ...

Contents (``format`` ``amed-solver-card``, ``version`` 1):

* ``solver``, ``solver_options`` (``max_order``, ``predict_x0``, ``lower_order_final``,
  ``thresholding`` where the solver takes them), ``afs``, ``num_steps``, ``nfe`` (model evaluations,
  doubled under classifier-free guidance) and ``evaluations`` (denoiser calls);
* ``t_steps``: the student's N noise levels; ``r``, ``scale_dir``, ``scale_time``: N-1 values each;
* ``sigmas``: t_0, s_0, t_1, s_1, ..., t_{N-1} with the inserted points s_n = t_{n+1}^r t_n^(1-r);
  ``query_sigmas``: where the model is evaluated, in order (t_n, then scale_time * s_n; t_0 is
  skipped with AFS). Both are float32 values, the precision at which :func:`solvers.step` computes
  them, so a run on the card evaluates the model exactly there;
* ``sigma_min``, ``sigma_max``, ``schedule``: the schedule it was made on; ``model``: dataset,
  model file, image shape, label dim, guidance and sigma range of the model;
* ``feature``: how the predictor's feature was fixed; ``provenance``: the predictor's path and
  sha256, its settings and the run's ``training_options.json`` when it has one.

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
import math
import os

import click
import torch

import solver_utils
import solvers
from dnnlib.util import open_url, sha256_file
from models.presets import load_model
from torch_utils.misc import StackedRandomGenerator, atomic_write, parse_seeds
from training import snapshot

FORMAT = 'amed-solver-card'
VERSION = 1
FEATURE_MODES = ('mean', 'mean_feature', 'zero')
DEFAULT_FEATURE = 'mean'
DEFAULT_SEEDS = '1000-1063'       # calibration seeds: keep them apart from evaluation seeds
SOLVER_OPTIONS = ('max_order', 'predict_x0', 'lower_order_final', 'thresholding')
REQUIRED = ('solver', 'solver_options', 'afs', 't_steps', 'r', 'scale_dir', 'scale_time', 'sigmas', 'query_sigmas')


def _f32(v):
    return float(torch.tensor(float(v), dtype=torch.float32))


def schedule_points(t_steps, r, scale_time, afs):
    """The card's ``sigmas`` (t_0, s_0, t_1, ..., t_{N-1}) and ``query_sigmas`` (model evaluations in
    order), in float32 as :func:`solvers.step` computes them from float32 r and scale_time."""
    sigmas, queries = [], []
    for n in range(len(t_steps) - 1):
        t_cur, t_next = float(t_steps[n]), float(t_steps[n + 1])
        s = solver_utils.intermediate_time(t_cur, t_next, torch.tensor(r[n], dtype=torch.float32))
        sigmas += [_f32(t_cur), float(s)]
        if not (afs and n == 0):
            queries.append(_f32(t_cur))
        queries.append(float(torch.tensor(scale_time[n], dtype=torch.float32) * s))
    sigmas.append(_f32(t_steps[-1]))
    return sigmas, queries


def _solver_options(spec):
    return {k: getattr(spec, k) for k in SOLVER_OPTIONS if hasattr(spec, k)}


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
        rnd = StackedRandomGenerator(device, part)
        latents = rnd.randn([len(part), *model.img_shape])
        cond = model.sample_cond(rnd, len(part))
        recorder.index = 0
        for n, (_, info) in enumerate(solvers.iterate(model, spec, latents * t_list[0], t_list, cond, recorder, afs)):
            sums[n] += torch.stack([v.double().sum().cpu() for v in (info.r, info.scale_dir, info.scale_time)])
    if feature == 'mean':
        return [list(v) for v in zip(*(sums / len(seed_list)).tolist())]
    means = [(recorder.sums[n] / len(seed_list)).to(zero)[None] for n in range(len(intervals))]
    return [list(v) for v in zip(*[_query(predictor, f, tc, tn) for f, (tc, tn) in zip(means, intervals)])]


# ----------------------------------------------------------------------------------------------
# Building, writing and reading cards.

def build_card(model, spec, t_steps, afs, r, scale_dir, scale_time, model_info=None, schedule=None, feature=None,
               provenance=None):
    """A card dict from a solver (from :func:`solvers.prepare`), its schedule and per-step values."""
    t_list = [float(t) for t in t_steps]
    r, scale_dir, scale_time = ([_f32(v) for v in vals] for vals in (r, scale_dir, scale_time))
    sigmas, queries = schedule_points(t_list, r, scale_time, afs)
    calls = int(getattr(model, 'calls_per_eval', 1))
    info = dict(dataset_name=getattr(model, 'dataset_name', None), img_shape=list(model.img_shape),
                label_dim=int(model.label_dim), calls_per_eval=calls, sigma_min=float(model.sigma_min),
                sigma_max=float(model.sigma_max))
    info.update(model_info or {})
    return dict(format=FORMAT, version=VERSION, solver=spec.name, solver_options=_solver_options(spec), afs=bool(afs),
                num_steps=len(t_list), nfe=solvers.count_nfe(spec.name, len(t_list), afs, True,
                                                                   calls_per_eval=calls),
                evaluations=len(queries), sigma_min=t_list[-1], sigma_max=t_list[0], schedule=schedule or {},
                t_steps=t_list, r=r,
                scale_dir=scale_dir, scale_time=scale_time, sigmas=sigmas, query_sigmas=queries, model=info,
                feature=feature or {}, provenance=provenance or {})


def export_card(predictor_path, feature=DEFAULT_FEATURE, seeds=DEFAULT_SEEDS, batch=64, model=None, model_path=None,
                classifier_path=None, prompt=None, prompt_path=None, device='cpu'):
    """The card of a predictor (snapshot, run folder, experiment number or published pickle).

    The model (needed for the schedule and, for the ``mean`` modes, the calibration trajectories)
    is ``model`` or loaded from the predictor's settings (``model_path`` overrides theirs)."""
    path = snapshot.resolve_predictor_path(predictor_path)
    predictor, settings = snapshot.load_predictor(path, device=device)
    if model is None:
        model = load_model(settings['dataset_name'], model_path or settings.get('model_path'),
                           settings.get('guidance_type'), settings.get('guidance_rate'), classifier_path=classifier_path,
                           prompt_path=prompt_path, prompt=prompt, device=device)
    snapshot.check_compatible(settings, model)
    kw = snapshot.solver_kwargs_from_settings(settings)
    spec, t_steps = solvers.prepare(model, predictor=predictor, **{k: v for k, v in kw.items() if k != 'afs'})
    afs = bool(kw.get('afs', False))
    values = static_steps(model, spec, t_steps, predictor, afs, feature, seeds, batch, device)
    options_file = os.path.join(os.path.dirname(os.path.abspath(path)), 'training_options.json')
    training_options = None
    if '://' not in path and os.path.isfile(options_file):
        with open(options_file) as f:
            training_options = json.load(f)
    provenance = dict(predictor_path=str(predictor_path), predictor_file=os.path.basename(path),
                      predictor_sha256=sha256_file(open_url(path, verbose=False, return_filename=True)), settings=settings, training_options=training_options)
    feature_info = dict(mode=feature, seeds=None if feature == 'zero' else str(seeds),
                        reads_feature=bool(getattr(predictor, 'needs_feature', True)))
    model_info = dict(dataset_name=settings.get('dataset_name'), model_path=model_path or settings.get('model_path'),
                      guidance_type=settings.get('guidance_type'), guidance_rate=settings.get('guidance_rate'))
    schedule = {k: settings[k] for k in ('schedule_type', 'schedule_rho') if k in settings}
    return build_card(model, spec, t_steps, afs, *values, model_info=model_info, schedule=schedule,
                      feature=feature_info, provenance=provenance)


def save_card(card, path):
    """Write ``card`` as JSON, atomically (nothing half-written on error)."""
    text = json.dumps(load_card(card), indent=1, allow_nan=False)

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text + '\n')
    atomic_write(path, write)


def load_card(source):
    """Read and validate a card (a path or an already loaded dict); ValueError (one line) when it
    is not a consistent AMED solver card. Returns the dict."""
    if isinstance(source, dict):
        card, where = source, 'solver card'
    else:
        where = os.fspath(source)
        if not os.path.isfile(where):
            raise FileNotFoundError(f'solver card not found: {where}')
        try:
            with open(where) as f:
                card = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'{where}: not a JSON solver card ({e})') from None
    if not isinstance(card, dict) or card.get('format') != FORMAT:
        raise ValueError(f'{where}: not an AMED solver card (no format tag {FORMAT!r})')
    if card.get('version') != VERSION:
        raise ValueError(f"{where}: unsupported solver card version {card.get('version')!r} (this code reads {VERSION})")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ValueError(f"{where}: the solver card lacks {', '.join(missing)}")
    if card['solver'] not in solvers.STUDENTS:
        raise ValueError(f"{where}: solver {card['solver']!r} is not an AMED student ({', '.join(solvers.STUDENTS)})")
    opts = card['solver_options']
    if not isinstance(opts, dict) or set(opts) - set(SOLVER_OPTIONS):
        raise ValueError(f'{where}: solver_options must be a dict of {", ".join(SOLVER_OPTIONS)}')
    solvers.make_solver(card['solver'], **opts)
    t = card['t_steps']
    n = len(t) - 1 if isinstance(t, list) else -1
    if n < 1 or any(not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in t) \
            or any(b >= a for a, b in zip(t, t[1:])):
        raise ValueError(f'{where}: t_steps must be a descending list of at least 2 positive noise levels')
    for key in ('r', 'scale_dir', 'scale_time'):
        if not isinstance(card[key], list) or len(card[key]) != n or \
                any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in card[key]):
            raise ValueError(f'{where}: {key} must hold {n} numbers, one per interval of t_steps')
    if any(not 0 < v <= 1 for v in card['r']):
        raise ValueError(f'{where}: every r must lie in (0, 1]')
    sigmas, queries = schedule_points(t, card['r'], card['scale_time'], bool(card['afs']))
    for key, expected in (('sigmas', sigmas), ('query_sigmas', queries)):
        got = card[key]
        if not isinstance(got, list) or len(got) != len(expected) or \
                any(abs(a - b) > 1e-6 * abs(b) for a, b in zip(got, expected)):
            raise ValueError(f'{where}: {key} do not follow from t_steps, r and scale_time')
    return card


class CardPredictor:
    """The predictor of a card: the card's (r, scale_dir, scale_time) for each interval of its
    ``t_steps``, for every sample; it reads no feature. Sampling on another schedule is refused."""

    needs_feature = False

    def __init__(self, card):
        self.card = load_card(card)
        t = self.card['t_steps']
        self._steps = {(float(a), float(b)): v for a, b, *v in
                       zip(t[:-1], t[1:], self.card['r'], self.card['scale_dir'], self.card['scale_time'])}

    def __call__(self, feature, t_cur, t_next):
        key = (float(t_cur), float(t_next))
        if key not in self._steps:
            raise ValueError(f'the solver card has no interval [{key[0]:g}, {key[1]:g}]: sample on its own t_steps')
        ones = torch.ones(feature.shape[0], dtype=torch.float64, device=feature.device)
        return tuple(ones * v for v in self._steps[key])


def card_settings(card):
    """The card as the settings dict that :mod:`generation.generate` takes from a predictor snapshot."""
    card = load_card(card)
    model = card.get('model', {})
    settings = dict(solver=card['solver'], num_steps=len(card['t_steps']), t_steps=list(card['t_steps']),
                    afs=bool(card['afs']), **card['solver_options'])
    settings.update({k: v for k, v in card.get('schedule', {}).items() if k in ('schedule_type', 'schedule_rho')})
    settings.update({k: model[k] for k in ('dataset_name', 'guidance_type', 'guidance_rate', 'img_shape', 'label_dim')
                     if k in model})
    return settings


def load_card_predictor(source):
    """(CardPredictor, settings) of a card file, in the form :func:`training.snapshot.load_predictor` returns."""
    predictor = CardPredictor(source)
    return predictor, card_settings(predictor.card)


def tail_steps(card, denoise=1.0):
    """The card's last round(``denoise`` x intervals) intervals, as its noise levels (a tail of
    ``t_steps``): img2img from a noised image, as ComfyUI's ``denoise`` and diffusers' ``strength``.
    ``denoise`` 1 is the whole card. ValueError (one line) when no interval is left."""
    t = list(load_card(card)['t_steps'])
    n = len(t) - 1
    if not 0 < denoise <= 1:
        raise ValueError(f'denoise must lie in (0, 1], not {denoise:g}')
    keep = int(denoise * n + 0.5)
    if keep < 1:
        raise ValueError(f'denoise {denoise:g} keeps no interval of the {n}-interval solver card (the smallest '
                         f'is {1 / n:.3g}, one interval)')
    return t[n - keep:]


def kdiffusion_sigmas(card, append_zero=True, denoise=1.0):
    """The card's ``t_steps`` (or their tail for ``denoise`` < 1, :func:`tail_steps`) as a k-diffusion /
    ComfyUI SIGMAS tensor (float32), with the trailing 0 (the final Euler step to 0, one more model
    call) unless ``append_zero`` is False."""
    t = tail_steps(card, denoise) + ([0.0] if append_zero else [])
    return torch.tensor(t, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Command line.

@click.group()
def main():
    """Solver cards: static AMED schedules as JSON."""


@main.command()
@click.option('--predictor_path', help='Predictor snapshot, run folder, experiment number or published .pkl',
              type=str, required=True)
@click.option('--out', help='Card file to write (JSON)', type=str, required=True)
@click.option('--feature', help='How the feature of a feature-reading predictor is fixed',
              type=click.Choice(FEATURE_MODES), default=DEFAULT_FEATURE, show_default=True)
@click.option('--seeds', help='Calibration seeds of the mean modes', type=str, default=DEFAULT_SEEDS, show_default=True)
@click.option('--batch', help='Calibration batch', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--model_path', help="Model file overriding the predictor's", type=str)
@click.option('--classifier_path', help='Classifier of a classifier-guided model', type=str)
@click.option('--prompt', help='ms_coco: one prompt for the calibration', type=str)
@click.option('--prompt_path', help='ms_coco: captions CSV (caption i for calibration seed i)', type=str)
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
def export(predictor_path, out, feature, seeds, batch, model_path, classifier_path, prompt, prompt_path, device):
    """Export the solver card of a predictor."""
    try:
        card = export_card(predictor_path, feature, seeds, batch, model_path=model_path,
                           classifier_path=classifier_path, prompt=prompt, prompt_path=prompt_path, device=device)
        save_card(card, out)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    click.echo(f"Wrote {out}: {card['solver']} card, {card['num_steps']} time points, NFE {card['nfe']}, "
               f"feature {feature}")


if __name__ == '__main__':
    main()
