"""The solver-card format: an AMED predictor turned into a portable static schedule (a small JSON
file). Writing and reading cards, and :class:`CardPredictor`, the predictor a card stands for; the
export of a card from a predictor is :mod:`integrations.card`.

A card may also carry a plain solver's schedule alone (a **schedule card**, e.g. a GITS schedule
from ``python -m evaluation.gits``): ``r``, ``scale_dir`` and ``scale_time`` are null, the solver is
any plain solver, ``sigmas`` are its ``t_steps`` and ``query_sigmas`` where the plain solver calls the
model (:func:`plain_queries`). It stands for no predictor (:func:`card_predictor` is None): sample.py
and the integrations run the plain solver on its schedule.

Contents (``format`` ``amed-solver-card``, ``version`` 1):

* ``solver``, ``solver_options`` (every option of the solver, :data:`solvers.REGISTRY`), ``afs``,
  ``num_steps``, ``nfe`` (model evaluations, doubled under classifier-free guidance) and
  ``evaluations`` (denoiser calls);
* ``t_steps``: the student's N noise levels; ``r``, ``scale_dir``, ``scale_time``: N-1 values each;
* ``sigmas``: t_0, s_0, t_1, s_1, ..., t_{N-1} with the inserted points s_n = t_{n+1}^r t_n^(1-r);
  ``query_sigmas``: where the model is evaluated, in order (t_n, then scale_time * s_n; t_0 is
  skipped with AFS). Both are float32 values, the precision at which :func:`solvers.step` computes
  them, so a run on the card evaluates the model exactly there;
* ``sigma_min``, ``sigma_max``, ``schedule``: the schedule it was made on; ``model``: dataset,
  model file, image shape, label dim, guidance and sigma range of the model;
* ``feature``: how the predictor's feature was fixed; ``provenance``: the predictor's path and
  sha256, its settings and the run's ``training_options.json`` when it has one.

The card's solver settings (solver, options, ``t_steps``, schedule, AFS) read as one
:class:`predictors.settings.SolverSettings` (:func:`card_solver_settings`).
"""

import json
import math
import os

import torch

import solver_utils
from dnnlib.util import read_settings_text
import solvers
from predictors.settings import SolverSettings
from torch_utils.misc import atomic_write

FORMAT = 'amed-solver-card'
VERSION = 1
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


class _QueryRecorder:
    """A stand-in denoiser that records where it is called (and answers 0)."""

    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma, cond=None):
        self.sigmas.append(float(sigma.reshape(-1)[0]))
        return torch.zeros_like(x)


def plain_queries(spec, t_steps, afs):
    """Where the built plain solver ``spec`` calls the model on ``t_steps``, in order, in float32 as
    the stepping core computes them (it runs the core on a recording stand-in model)."""
    recorder = _QueryRecorder()
    for _ in solvers.iterate(recorder, spec, torch.zeros(1, 1, 1, 1), [_f32(t) for t in t_steps], afs=afs):
        pass
    return recorder.sigmas


def is_schedule_card(card):
    """A card that carries a plain solver's schedule alone (no per-interval predictor values)."""
    return card.get('r') is None


# ----------------------------------------------------------------------------------------------
# Building, writing and reading cards.

def build_card(model, spec, t_steps, afs, r=None, scale_dir=None, scale_time=None, model_info=None, schedule=None,
               feature=None, provenance=None):
    """A card dict from a solver (from :func:`solvers.prepare`), its schedule and per-step values;
    ``r``, ``scale_dir`` and ``scale_time`` None: a schedule card of the plain solver."""
    t_list = [float(t) for t in t_steps]
    plain = r is None
    if plain:
        sigmas, queries = [_f32(t) for t in t_list], plain_queries(spec, t_list, afs)
    else:
        r, scale_dir, scale_time = ([_f32(v) for v in vals] for vals in (r, scale_dir, scale_time))
        sigmas, queries = schedule_points(t_list, r, scale_time, afs)
    calls = int(getattr(model, 'calls_per_eval', 1))
    info = dict(dataset_name=getattr(model, 'dataset_name', None), img_shape=list(model.img_shape),
                label_dim=int(model.label_dim), calls_per_eval=calls, sigma_min=float(model.sigma_min),
                sigma_max=float(model.sigma_max))
    info.update(model_info or {})
    return dict(format=FORMAT, version=VERSION, solver=spec.name, solver_options=solvers.options_of(spec), afs=bool(afs),
                num_steps=len(t_list), nfe=solvers.count_nfe(spec, len(t_list), afs, not plain,
                                                                   calls_per_eval=calls),
                evaluations=len(queries), sigma_min=t_list[-1], sigma_max=t_list[0], schedule=schedule or {},
                t_steps=t_list, r=r,
                scale_dir=scale_dir, scale_time=scale_time, sigmas=sigmas, query_sigmas=queries, model=info,
                feature=feature or {}, provenance=provenance or {})


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
            card = json.loads(read_settings_text(where, 'solver card'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'{where}: not a JSON solver card ({e})') from None
    if not isinstance(card, dict) or card.get('format') != FORMAT:
        raise ValueError(f'{where}: not an AMED solver card (no format tag {FORMAT!r})')
    if card.get('version') != VERSION:
        raise ValueError(f"{where}: unsupported solver card version {card.get('version')!r} (this code reads {VERSION})")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ValueError(f"{where}: the solver card lacks {', '.join(missing)}")
    plain = is_schedule_card(card)
    allowed = solvers.PLAIN if plain else solvers.STUDENTS
    if card['solver'] not in allowed:
        what = 'a plain solver' if plain else 'an AMED student'
        raise ValueError(f"{where}: solver {card['solver']!r} is not {what} ({', '.join(allowed)})")
    if not isinstance(card['solver_options'], dict):
        raise ValueError(f'{where}: solver_options must be a dict of the options of solver {card["solver"]!r}')
    if not isinstance(card['afs'], bool):
        raise ValueError(f"{where}: afs must be true or false, got {card['afs']!r}")
    for key in ('model', 'schedule'):
        if not isinstance(card.get(key, {}), dict):
            raise ValueError(f'{where}: {key} must be an object (a JSON dict), got {card[key]!r}')
    try:
        settings = card_solver_settings(card)
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from None
    t = card['t_steps']
    n = len(t) - 1 if isinstance(t, list) else -1
    if n < 1 or any(not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in t) \
            or any(b >= a for a, b in zip(t, t[1:])):
        raise ValueError(f'{where}: t_steps must be a descending list of at least 2 positive noise levels')
    if plain:
        if card['scale_dir'] is not None or card['scale_time'] is not None:
            raise ValueError(f'{where}: a schedule card (r null) has null scale_dir and scale_time too')
        spec, _ = settings.prepare(None)
        _check_points(card, where, [_f32(v) for v in t], plain_queries(spec, t, bool(card['afs'])))
        return card
    for key in ('r', 'scale_dir', 'scale_time'):
        if not isinstance(card[key], list) or len(card[key]) != n or \
                any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in card[key]):
            raise ValueError(f'{where}: {key} must hold {n} numbers, one per interval of t_steps')
    if any(not 0 < v <= 1 for v in card['r']):
        raise ValueError(f'{where}: every r must lie in (0, 1]')
    for key in ('scale_dir', 'scale_time'):
        if any(v <= 0 for v in card[key]):
            raise ValueError(f'{where}: every {key} must be positive (a factor near 1), got {min(card[key])}')
    _check_points(card, where, *schedule_points(t, card['r'], card['scale_time'], card['afs']))
    return card


def _check_points(card, where, sigmas, queries):
    for key, expected in (('sigmas', sigmas), ('query_sigmas', queries)):
        got = card[key]
        # 'not <=' so that NaN (for which every comparison is false) is refused too
        if not isinstance(got, list) or len(got) != len(expected) or \
                any(isinstance(a, bool) or not isinstance(a, (int, float)) or not abs(a - b) <= 1e-6 * abs(b)
                    for a, b in zip(got, expected)):
            raise ValueError(f'{where}: {key} do not follow from t_steps, r and scale_time')


def card_predictor(card):
    """The :class:`CardPredictor` of a card, or None for a schedule card (a plain solver)."""
    card = load_card(card)
    return None if is_schedule_card(card) else CardPredictor(card)


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


def card_solver_settings(card):
    """The card's solver settings (its solver, options, ``t_steps``, schedule and AFS); not validated
    as a card (:func:`load_card` does that)."""
    return SolverSettings.from_dict(dict(card['solver_options'], solver=card['solver'], t_steps=list(card['t_steps']),
                                         afs=bool(card['afs']), **{k: v for k, v in card.get('schedule', {}).items()
                                                                  if k in ('schedule_type', 'schedule_rho')}))


def card_settings(card):
    """The card as the settings dict of a predictor: its solver settings (:func:`card_solver_settings`)
    and the model it was made for (dataset_name, guidance, image shape, label dim)."""
    card = load_card(card)
    model = card.get('model', {})
    settings = card_solver_settings(card).to_dict()
    settings.update({k: model[k] for k in ('dataset_name', 'guidance_type', 'guidance_rate', 'img_shape', 'label_dim')
                     if k in model})
    return settings


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
