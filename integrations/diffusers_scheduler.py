"""A diffusers scheduler that runs a solver card: ``AMEDScheduler`` (public diffusers APIs only).

Needs the optional ``latent`` extra (diffusers; tested against the pinned 0.42.1; it uses
``SchedulerMixin``, ``ConfigMixin``, ``register_to_config``, ``SchedulerOutput`` and
``DDPMScheduler``'s beta schedules, all public for many releases)::

    from integrations.diffusers_scheduler import AMEDScheduler
    pipe.scheduler = AMEDScheduler.from_config(pipe.scheduler.config, card='card.json')
    image = pipe(prompt, num_inference_steps=pipe.scheduler.num_steps).images[0]

**Every scheduler step is one (guided) U-Net call, including the AMED plugin's intermediate
evaluation.** The card's ``query_sigmas`` (t_n, then scale_time * s_n; t_0 is skipped with AFS)
become the pipeline's timesteps, so a card with NFE 5 runs 5 pipeline steps. ``step`` records each
model output and replays :func:`solvers.step` of the current interval against the outputs it has:
while the interval still needs an evaluation, the step stops there and its input point is returned
as ``prev_sample`` (the pipeline then evaluates the U-Net at it); once it has both, the interval is
complete and ``prev_sample`` is the sample at t_{n+1}. So the stepping is the project's own
(identical to ``sample.py --card``), and the scheduler only keeps the solver state and the outputs
of the interval in progress.

Conventions:

* Timesteps are **continuous** (the U-Net takes float timesteps): T(sigma) = 1000 t(sigma) - 1 through
  the model's own alphas_cumprod maps (models/latent.py), as sample.py does. The official plugin
  rounds them to integers. ``scale_model_input`` gives the U-Net x / sqrt(sigma^2 + 1) of the queried
  point; on an AFS card's first step that point is the analytical first step's intermediate point,
  computed from the sample (the first U-Net call is already at s_0).
* scale_time as in training and sample.py: the model is evaluated at a * s on the point reached
  at s (input scaled for a * s), and D = x - a s eps. The official plugin instead feeds the latent
  scaled for s at the timestep of a * s and uses eps unscaled; with scale_time = 1 the two agree.
* ``num_inference_steps`` must be the card's number of U-Net calls (``num_steps``) or omitted;
  ``timesteps=`` / ``sigmas=`` are accepted (so the pipelines' signature checks pass) and must be the
  card's own timesteps / sigmas (its full ``sigmas`` or its ``t_steps``, optionally with a trailing 0).
  Anything else is one clear ValueError: the schedule lives in the card.
* The card is part of the config: ``save_pretrained`` / ``from_pretrained`` keep it.
* A dynamic (feature-reading) predictor is not offered here: the pipeline fixes one timestep per
  U-Net call for the whole batch before its loop starts, while a predictor chooses s per sample
  after the call at t_n. Export a card, or sample dynamically with sample.py or the k-diffusion
  sampler (integrations/kdiffusion.py).
"""

import math

import torch
from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

import solvers
from models.base import Denoiser
from models.latent import DiscreteEpsDenoiser

from predictors.card import CardPredictor, card_solver_settings, load_card


class _Query(Exception):
    """Raised by the replayed model at the first evaluation it has no output for."""

    def __init__(self, x, sigma):
        super().__init__('pending model evaluation')
        self.x, self.sigma = x, sigma


class _Replay:
    """A denoiser answering the solver's calls from recorded (sigma, eps) pairs, in order:
    D = x - sigma eps (the VE form of an epsilon network, as models/latent.py). ``latent``: the
    networks are latent models (dynamic thresholding off unless the card asks for it)."""

    latent = True
    feature_shape = Denoiser.feature_shape

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, 0

    def __call__(self, x, sigma, cond=None):
        if self.calls == len(self.outputs):
            raise _Query(x, sigma)
        expected, eps = self.outputs[self.calls]
        self.calls += 1
        if not torch.allclose(sigma.float().cpu(), expected.expand(sigma.shape), rtol=1e-5, atol=0):
            raise RuntimeError(f'AMEDScheduler: the solver queried sigma {float(sigma[0]):g}, the card says '
                               f'{float(expected):g}')
        return x - expected.to(x.device, x.dtype) * eps.to(x.dtype)


def _close(values, reference):
    values = [float(v) for v in values]
    return len(values) == len(reference) and all(abs(a - b) <= 1e-4 * max(abs(b), 1e-3) for a, b in zip(values, reference))


class AMEDScheduler(SchedulerMixin, ConfigMixin):
    """Runs an AMED solver card in a diffusers pipeline (see the module docstring).

    Args:
        card: the solver card (a path or the card dict; stored in the config as the dict).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the model's
            noise schedule, as in DDPMScheduler's config (``from_config(pipe.scheduler.config)``
            takes them from the pipeline).
        prediction_type: must be ``epsilon`` (the networks the cards are made for).
    """

    order = 1

    @register_to_config
    def __init__(self, card=None, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule='scaled_linear', trained_betas=None, prediction_type='epsilon'):
        if prediction_type != 'epsilon':
            raise ValueError(f"AMEDScheduler runs epsilon-prediction networks, not prediction_type={prediction_type!r}")
        if card is not None:
            card = load_card(card)
            self.register_to_config(card=card)
        ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas)
        self.maps = DiscreteEpsDenoiser(ddpm.alphas_cumprod)
        self.timesteps = None
        self.num_inference_steps = None
        self._card = None
        if card is not None:
            self._use(card)

    # -- the card ---------------------------------------------------------------------------

    def _use(self, card):
        model = card.get('model', {})
        for key in ('sigma_min', 'sigma_max'):
            theirs, ours = model.get(key), getattr(self.maps, key)
            if theirs is not None and not math.isclose(theirs, ours, rel_tol=1e-4):
                raise ValueError(f"the solver card was made for a model with {key} {theirs:g}; this scheduler's "
                                 f"noise schedule has {ours:g}")
        self._card = card
        self._predictor = CardPredictor(card)
        self._spec, t_steps = card_solver_settings(card).prepare(_Replay([]), self._predictor)
        self._t_steps = t_steps.tolist()
        self.query_sigmas = torch.tensor(card['query_sigmas'], dtype=torch.float32)
        self._timesteps = self.maps.timestep(self.query_sigmas.double()).float()

    def _require_card(self):
        if self._card is None:
            raise ValueError('AMEDScheduler needs a solver card: AMEDScheduler.from_config(config, card=...)')
        return self._card

    @property
    def num_steps(self):
        """Pipeline steps (U-Net calls) of the card."""
        return len(self._require_card()['query_sigmas'])

    @property
    def init_noise_sigma(self):
        return float(self._require_card()['t_steps'][0])

    # -- the diffusers scheduler interface ----------------------------------------------------

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """Set the card's timesteps (see the module docstring for the accepted arguments)."""
        card = self._require_card()
        n = len(card['query_sigmas'])
        if num_inference_steps is not None and int(num_inference_steps) != n:
            raise ValueError(f"the solver card runs {n} U-Net steps (NFE {card['nfe']}): pass num_inference_steps={n} "
                             f"or leave it out, not {num_inference_steps}")
        if timesteps is not None and not _close(timesteps, self._timesteps.tolist()):
            raise ValueError(f'timesteps= must be the solver card\'s own ({[round(t, 3) for t in self._timesteps.tolist()]})')
        if sigmas is not None:
            given = [float(s) for s in sigmas]
            given = given[:-1] if given and given[-1] == 0 else given
            if not (_close(given, card['sigmas']) or _close(given, card['t_steps'])):
                raise ValueError('sigmas= must be the solver card\'s sigmas or t_steps (optionally with a trailing 0)')
        self.num_inference_steps = n
        self.timesteps = self._timesteps.to(device)
        self._index, self._state, self._outputs, self._returned = 0, None, [], None

    def _query_point(self, sample):
        """The point the solver queries next, from the interval's start ``sample``."""
        try:
            solvers.step(_Replay(list(self._outputs)), self._spec, self._state_at(sample), self._t_steps, None,
                         self._predictor, bool(self._card['afs']))
        except _Query as q:
            return q.x
        raise RuntimeError('AMEDScheduler: the interval needs no further model evaluation')

    def _state_at(self, sample):
        """The solver state at the start of the current interval. The solver works in float32 (as
        sample.py does with fp16 networks): the pipeline's latent replaces the kept float32 state only
        when it is not the point this scheduler returned (a callback changed it)."""
        if self._state is not None and self._outputs:
            return self._state
        keep = self._state is not None and self._returned is not None and torch.equal(sample, self._returned)
        x = self._state.x if keep else sample.float()
        return solvers.SolverState(x) if self._state is None else solvers.SolverState(x, self._state.i,
                                                                                       self._state.history)

    def _check_running(self):
        if self.timesteps is None:
            raise ValueError('call set_timesteps before stepping the AMEDScheduler')
        if self._index >= self.num_inference_steps:
            raise ValueError('the AMEDScheduler has run all steps of its card: call set_timesteps again')

    def scale_model_input(self, sample, timestep=None):
        """The U-Net input of this step: the queried point x / sqrt(sigma^2 + 1)."""
        self._check_running()
        sigma = self.query_sigmas[self._index].to(sample.device)
        if self._index == 0 and self._card['afs']:
            sample = self._query_point(sample).to(sample.dtype)
        return sample / (sigma ** 2 + 1).sqrt().to(sample.dtype)

    def step(self, model_output, timestep, sample, return_dict=True):
        """Record the (guided) noise prediction ``model_output`` at this step's query point and advance.

        ``sample`` is the pipeline's latent: the point returned by the previous step (the initial
        noise at the first step). Returns the next point the U-Net is to be evaluated at, or the
        final sample after the last step."""
        self._check_running()
        state = self._state_at(sample)
        self._outputs.append((self.query_sigmas[self._index], model_output.float()))
        self._index += 1
        try:
            new_state, _ = solvers.step(_Replay(self._outputs), self._spec, state, self._t_steps, None,
                                        self._predictor, bool(self._card['afs']))
        except _Query as q:
            self._state, prev = state, q.x
        else:
            self._state, self._outputs, prev = new_state, [], new_state.x
        prev = self._returned = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self):
        return self.config.num_train_timesteps
