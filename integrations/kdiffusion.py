"""AMED as a k-diffusion sampler: ``sample_amed(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)``.

``model`` is any k-diffusion denoiser ``model(x, sigma, **extra_args) -> D(x; sigma)`` (the
``k_diffusion.external`` wrappers, ComfyUI's model inside ``KSAMPLER``, ...); ``x`` is the noise
already scaled to ``sigmas[0]``. The sampler adapts the model to the project's denoiser interface
(:class:`KDiffusionDenoiser`) and steps with :func:`solvers.iterate` / :func:`solvers.step`, the
code that sampling and training use; it holds no stepping logic of its own.

What drives the AMED plugin, one of:

* ``card``: a solver card (path or dict, :mod:`integrations.card`). ``sigmas`` are then the card's
  ``t_steps`` (:func:`integrations.card.kdiffusion_sigmas`) or its full ``sigmas`` with the inserted
  points, each with or without a trailing 0; the solver and its options come from the card.
* ``predictor``: an AMED predictor, dynamic. A path, run folder or experiment number carries its
  solver options; a predictor object takes them as keyword arguments (``solver``, ``afs``,
  ``max_order``, ...; dynamic thresholding is off unless ``thresholding=True``). A feature-reading
  predictor needs ``feature_module``, the module of the wrapped network whose output (B, C, 8, 8)
  it reads (hooked for each call at t_n, the hook is always removed); ``feature_fn`` reduces that
  output to (B, 8, 8) (default: the channel mean; pass one that picks the conditional half when the
  model runs classifier-free guidance on a doubled batch).

k-diffusion conventions: ``callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'})`` once per
interval with the state at sigmas[i] and D there (from AFS on an AFS step), and ``disable`` turns
the progress bar off. **A trailing 0 in sigmas** is k-diffusion's last step: an Euler step from
sigma_{N-1} to 0, which lands on D(x; sigma_{N-1}) (one more model call, not counted in a card's
NFE; ``solvers.sample(..., denoise_to_zero=True)`` does the same). Without it the run ends at
sigma_{N-1}, as ``solvers.sample``.
"""

import torch
from tqdm.auto import tqdm

import solvers
from models.base import Denoiser
from predictors import load_predictor
from predictors.card import CardPredictor, card_solver_settings, load_card


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
    """The card's t_steps when ``grid`` (trailing 0 removed) is its t_steps or its full sigmas."""
    values = [float(v) for v in grid]
    for key in ('t_steps', 'sigmas'):
        ref = card[key]
        if len(values) == len(ref) and all(abs(a - b) <= 1e-6 * b for a, b in zip(values, ref)):
            return list(card['t_steps'])
    raise ValueError(f"sigmas do not match the solver card: pass its t_steps {card['t_steps']} or its sigmas "
                     f"(integrations.card.kdiffusion_sigmas), optionally with a trailing 0")


def _solver_kwargs(settings):
    """The solver, its options and AFS of a :class:`~predictors.settings.SolverSettings` (the schedule
    comes from ``sigmas``)."""
    return dict(settings.solver_options, solver=settings.solver, afs=settings.afs)


def _predictor_and_options(card, predictor, options, device):
    """(predictor, solver options, card or None) from the sampler's arguments."""
    given = {k: v for k, v in options.items() if v is not None}
    if (card is None) == (predictor is None):
        raise ValueError('sample_amed needs either a solver card or a predictor')
    if card is not None:
        if given:
            raise ValueError(f'{next(iter(given))} comes from the solver card; drop it')
        card = load_card(card)
        return CardPredictor(card), _solver_kwargs(card_solver_settings(card)), card
    if isinstance(predictor, (str, int)):
        if given:
            raise ValueError(f'{next(iter(given))} comes from the predictor {predictor!r}; drop it')
        loaded = load_predictor(predictor, device=device)
        if loaded.source['kind'] == 'card':
            return loaded.predictor, _solver_kwargs(loaded.solver), loaded.predictor.card
        return loaded.predictor, _solver_kwargs(loaded.solver), None
    if given.get('solver') is None:
        raise ValueError('a predictor object needs solver= (and the solver options it was trained with)')
    takes_thresholding = 'thresholding' in solvers.solver_class(given['solver']).options
    defaults = dict(afs=False, thresholding=False if takes_thresholding else None)
    return predictor, dict(defaults, **given), None


def sample_amed(model, x, sigmas, extra_args=None, callback=None, disable=None, card=None, predictor=None,
                feature_module=None, feature_fn=None, solver=None, afs=None, max_order=None, predict_x0=None,
                lower_order_final=None, thresholding=None):
    """Sample with AMED from ``x`` (noise scaled to sigmas[0]) along ``sigmas``; see the module docstring.

    Returns the sample at sigmas[-1] (the Euler step to 0 included when sigmas end with 0)."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError('sigmas must be a 1-D list of at least 2 noise levels')
    to_zero = float(sigmas[-1]) == 0
    grid = sigmas[:-1] if to_zero else sigmas
    options = dict(solver=solver, afs=afs, max_order=max_order, predict_x0=predict_x0,
                   lower_order_final=lower_order_final, thresholding=thresholding)
    predictor, options, card = _predictor_and_options(card, predictor, options, x.device)
    t_steps = _card_grid(card, grid) if card is not None else [float(v) for v in grid]
    if getattr(predictor, 'needs_feature', True) and feature_module is None:
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
