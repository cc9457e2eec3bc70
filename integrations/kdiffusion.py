"""AMED as a k-diffusion sampler: ``sample_amed(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)``.

``model`` is any k-diffusion denoiser ``model(x, sigma, **extra_args) -> D(x; sigma)`` (the
``k_diffusion.external`` wrappers, ComfyUI's model inside ``KSAMPLER``, ...); ``x`` is the noise
already scaled to ``sigmas[0]``. The sampler adapts the model to the project's denoiser interface
(:class:`KDiffusionDenoiser`) and steps with :func:`solvers.iterate` / :func:`solvers.step`, the
code that sampling and training use; it holds no stepping logic of its own.

What drives the AMED plugin, one of:

* ``card``: a solver card (path or dict, :mod:`integrations.card`). ``sigmas`` are then the card's
  ``t_steps`` (:func:`integrations.card.kdiffusion_sigmas`) or its full ``sigmas`` with the inserted
  points, each with or without a trailing 0; the solver and its options come from the card. A
  **tail** of its ``t_steps`` (:func:`integrations.card.tail_steps`) runs the card's last intervals
  from a noised image (img2img, ComfyUI's ``denoise`` < 1): the multistep history starts anew there
  and AFS is off (its first-step guess holds only for pure noise).
* ``predictor``: an AMED predictor, dynamic. A path, run folder or experiment number carries its
  solver options; a predictor object takes them as keyword arguments (``solver``, ``afs``,
  ``max_order``, ...; dynamic thresholding is off unless ``thresholding=True``). A feature-reading
  predictor needs ``feature_module``, the module of the wrapped network whose output (B, C, 8, 8)
  it reads (hooked for each call at t_n, the hook is always removed); ``feature_fn`` reduces that
  output to (B, 8, 8) (default: the channel mean; pass one that picks the conditional half when the
  model runs classifier-free guidance on a doubled batch). A predictor given by path, run folder or
  number knows its training schedule: ``sigmas`` that are not those noise levels are refused with
  one line saying what it was trained on and what it got (``foreign_sigmas='warn'`` runs them with a
  warning). A predictor object carries no such record and is not checked.

k-diffusion conventions: ``callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'})`` once per
interval with the state at sigmas[i] and D there (from AFS on an AFS step), and ``disable`` turns
the progress bar off. **A trailing 0 in sigmas** is k-diffusion's last step: an Euler step from
sigma_{N-1} to 0, which lands on D(x; sigma_{N-1}) (one more model call, not counted in a card's
NFE; ``solvers.sample(..., denoise_to_zero=True)`` does the same). Without it the run ends at
sigma_{N-1}, as ``solvers.sample``.
"""

import warnings

import torch
from tqdm.auto import tqdm

import solver_utils
import solvers
from models.base import Denoiser
from predictors import load_predictor
from predictors.card import card_predictor, card_solver_settings, load_card


class KDiffusionDenoiser(Denoiser):
    """A k-diffusion denoiser ``model(x, sigma, **extra_args)`` behind :class:`models.base.Denoiser`
    (``cond`` is unused: the conditioning travels in ``extra_args``)."""

    def __init__(self, model, extra_args=None, feature_module=None, feature_fn=None):
        super().__init__()
        self.inner = model
        self.extra_args = dict(extra_args or {})
        if feature_module is not None:
            self.feature_module = feature_module
        self.feature_fn = feature_fn

    def forward(self, x, sigma, cond=None):
        return self.inner(x, sigma, **self.extra_args)

    def amed_feature(self, activation):
        return super().amed_feature(activation) if self.feature_fn is None else self.feature_fn(activation)


def _card_grid(card, grid):
    """The card's t_steps when ``grid`` (trailing 0 removed) is its t_steps or its full sigmas, or a
    tail of its t_steps (img2img, ComfyUI's denoise < 1: :func:`integrations.card.tail_steps`).
    Returns (t_steps, whole run)."""
    values = [float(v) for v in grid]
    for key in ('t_steps', 'sigmas'):
        ref = card[key]
        if len(values) == len(ref) and _same(values, ref):
            return list(card['t_steps']), True
    t = card['t_steps']
    if 2 <= len(values) < len(t) and _same(values, t[-len(values):]):
        return list(t[-len(values):]), False
    raise ValueError(f"sigmas do not match the solver card: pass its t_steps {card['t_steps']}, a tail of them, or "
                     f"its sigmas (integrations.card.kdiffusion_sigmas), optionally with a trailing 0")


def _same(values, reference):
    return all(abs(a - b) <= 1e-6 * b for a, b in zip(values, reference))


def trained_schedule(settings):
    """(description, noise levels or None) of the schedule a predictor was trained on, from its
    :class:`~predictors.settings.SolverSettings`: the levels when they can be computed without the
    model (not the ``discrete`` schedule, which needs the model's time maps), else None and only the
    count and range are known."""
    n, kind, rho = settings.num_steps, settings.schedule_type, settings.schedule_rho
    lo, hi = settings.sigma_min, settings.sigma_max
    if settings.t_steps is not None:
        levels = list(settings.t_steps)
        lo, hi = levels[-1], levels[0]
        return f'{n} explicit noise levels from {hi:g} to {lo:g}', levels
    if lo is not None and hi is not None and kind != 'discrete':
        levels = solver_utils.get_schedule(n, lo, hi, kind, rho).tolist()
    else:
        levels = None
    where = f' from {hi:g} to {lo:g}' if lo is not None and hi is not None else ''
    shape = f' (rho {rho:g})' if rho is not None and kind != 'logsnr' else ''   # logsnr takes no rho
    return f'{n} {kind}{shape} noise levels{where}', levels


def check_trained_schedule(settings, t_steps, strict=True):
    """Refuse (ValueError, ``strict``) or warn (one line) when ``t_steps`` are not the noise levels the
    predictor with ``settings`` was trained on: a predictor has learned its (r, scale_dir,
    scale_time) for its own intervals only. Returns True when they match."""
    what, levels = trained_schedule(settings)
    t = [float(v) for v in t_steps]
    n, lo, hi = settings.num_steps, settings.sigma_min, settings.sigma_max
    if levels is not None:
        ok = len(t) == len(levels) and all(abs(a - b) <= 1e-5 * b for a, b in zip(t, levels))
    else:
        ok = (n is None or len(t) == int(n)) and all(
            ref is None or abs(v - ref) <= 1e-5 * ref for v, ref in ((t[0], hi), (t[-1], lo)))
    if not ok:
        message = (f'the predictor was trained on {what}; these sigmas are {len(t)} levels from {t[0]:g} to '
                   f'{t[-1]:g} (pass its own schedule, or export a solver card)')
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    return ok


def _solver_kwargs(settings):
    """The solver, its options and AFS of a :class:`~predictors.settings.SolverSettings` (the schedule
    comes from ``sigmas``)."""
    return dict(settings.solver_options, solver=settings.solver, afs=settings.afs)


def _predictor_and_options(card, predictor, options, device):
    """(predictor, solver options, card or None, the predictor's settings or None) from the sampler's
    arguments."""
    given = {k: v for k, v in options.items() if v is not None}
    if (card is None) == (predictor is None):
        raise ValueError('sample_amed needs either a solver card or a predictor')
    if card is not None:
        if given:
            raise ValueError(f'{next(iter(given))} comes from the solver card; drop it')
        card = load_card(card)
        return card_predictor(card), _solver_kwargs(card_solver_settings(card)), card, None
    if isinstance(predictor, (str, int)):
        if given:
            raise ValueError(f'{next(iter(given))} comes from the predictor {predictor!r}; drop it')
        loaded = load_predictor(predictor, device=device)
        if loaded.source['kind'] == 'card':
            return loaded.predictor, _solver_kwargs(loaded.solver), loaded.predictor.card, None
        return loaded.predictor, _solver_kwargs(loaded.solver), None, loaded.solver
    if given.get('solver') is None:
        raise ValueError('a predictor object needs solver= (and the solver options it was trained with)')
    takes_thresholding = 'thresholding' in solvers.solver_class(given['solver']).options
    defaults = dict(afs=False, thresholding=False if takes_thresholding else None)
    return predictor, dict(defaults, **given), None, None


def sample_amed(model, x, sigmas, extra_args=None, callback=None, disable=None, card=None, predictor=None,
                feature_module=None, feature_fn=None, solver=None, afs=None, foreign_sigmas='error', **solver_options):
    """Sample with AMED from ``x`` (noise scaled to sigmas[0]) along ``sigmas``; see the module docstring.
    ``solver_options``: the options of ``solver`` (``solvers.REGISTRY[solver].options``, e.g.
    ``max_order``), for a predictor object only.

    Returns the sample at sigmas[-1] (the Euler step to 0 included when sigmas end with 0)."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError('sigmas must be a 1-D list of at least 2 noise levels')
    to_zero = float(sigmas[-1]) == 0
    grid = sigmas[:-1] if to_zero else sigmas
    unknown = set(solver_options) - set(solvers.OPTIONS)
    if unknown:
        raise TypeError(f"sample_amed() got unknown solver option(s) {', '.join(sorted(unknown))}")
    options = dict(solver_options, solver=solver, afs=afs)
    if foreign_sigmas not in ('error', 'warn'):
        raise ValueError(f"foreign_sigmas must be 'error' or 'warn', not {foreign_sigmas!r}")
    predictor, options, card, settings = _predictor_and_options(card, predictor, options, x.device)
    if card is not None:
        t_steps, whole = _card_grid(card, grid)
        if not whole:
            options['afs'] = False   # a tail starts from a noised image: AFS's guess holds only for pure noise
    else:
        t_steps = [float(v) for v in grid]
        if settings is not None:
            check_trained_schedule(settings, t_steps, strict=foreign_sigmas == 'error')
    if predictor is not None and getattr(predictor, 'needs_feature', True) and feature_module is None:
        raise ValueError('this predictor reads the model feature: pass feature_module (the module of the '
                         'network whose (B, C, 8, 8) output it reads), or use a solver card')
    denoiser = KDiffusionDenoiser(model, extra_args, feature_module, feature_fn)
    afs = bool(options.pop('afs'))
    spec, t_steps = solvers.prepare(denoiser, predictor=predictor, t_steps=t_steps, **options)
    bar = tqdm(total=len(sigmas) - 1, disable=disable)
    try:
        for i, (state, info) in enumerate(solvers.iterate(denoiser, spec, x, t_steps, None, predictor, afs)):
            if callback is not None:
                callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': info.denoised})
            x = state.x
            bar.update()
        if to_zero:
            denoised = solvers.denoise(denoiser, x, t_steps[-1])
            if callback is not None:
                i = len(t_steps) - 1
                callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
            x = denoised
            bar.update()
    finally:
        bar.close()
    return x
