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
* ``num_inference_steps`` must be the card's number of U-Net calls (``num_steps``): a pipeline
  passes its own default (50) when it is left out, so pass ``pipe.scheduler.num_steps``.
  ``timesteps=`` / ``sigmas=`` are accepted (so the pipelines' signature checks pass) and must be the
  card's own timesteps / sigmas (its full ``sigmas`` or its ``t_steps``, optionally with a trailing 0).
  Anything else is one clear ValueError: the schedule lives in the card.
* img2img (``strength`` < 1): the pipeline starts at a later step (``set_begin_index``) and noises the
  image to that step's level (``add_noise``). The step must start one of the card's intervals; the run
  is then the card's remaining intervals, the multistep history starting anew and AFS off (as the
  k-diffusion sampler runs a tail of the card). A strength that would start inside an interval is one
  clear ValueError that lists the strengths that work.
* diffusers' conventions: ``sigmas`` (the noise level of the latent the pipeline holds before each
  step, then the last level), ``step_index``, ``begin_index``, ``add_noise`` and ``_compatibles``.
* ``prediction_type``: ``epsilon`` (D = x - sigma eps) or ``v_prediction`` (SD 2.x-style networks:
  D = x / (1 + sigma^2) - sigma v / sqrt(1 + sigma^2)).
* The config keeps :func:`config_card` of the card under the private key ``_amed_solver_card``: what
  sampling needs, the model's description without its file, and as provenance the sha256 of the full
  card and of its predictor (no local paths, no training options; the full card stays its own file).
  ``save_pretrained`` / ``from_pretrained`` keep it; a private key is what diffusers' other schedulers
  pass over without a warning (``DPMSolverMultistepScheduler.from_config(amed.config)``) and keep
  for the way back.
* A dynamic (feature-reading) predictor is not offered here: the pipeline fixes one timestep per
  U-Net call for the whole batch before its loop starts, while a predictor chooses s per sample
  after the call at t_n. Export a card, or sample dynamically with sample.py or the k-diffusion
  sampler (integrations/kdiffusion.py).
"""

import hashlib
import json
import math

import torch
from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput

import solvers
from models.base import Denoiser
from models.latent import DiscreteEpsDenoiser

from predictors.card import card_predictor, card_solver_settings, is_schedule_card, load_card

#: The config key of the card: private (a leading ``_``), so that diffusers' other schedulers loading
#: this config (``DPMSolverMultistepScheduler.from_config(amed.config)``) pass it over silently and
#: keep it for the way back.
CONFIG_KEY = '_amed_solver_card'
#: What sampling reads from a card; the config keeps these, the model's description without its file,
#: and a provenance digest (hashes), never local paths or training options.
SAMPLING_KEYS = ('format', 'version', 'solver', 'solver_options', 'afs', 'num_steps', 'nfe', 'evaluations',
                 'sigma_min', 'sigma_max', 'schedule', 't_steps', 'r', 'scale_dir', 'scale_time', 'sigmas',
                 'query_sigmas', 'feature')
MODEL_KEYS = ('dataset_name', 'img_shape', 'label_dim', 'calls_per_eval', 'sigma_min', 'sigma_max', 'guidance_type',
              'guidance_rate')
PREDICTION_TYPES = ('epsilon', 'v_prediction')


def card_digest(card):
    """sha256 of the card's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(card, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def config_card(card):
    """The card as the scheduler config keeps it: what sampling needs, and as provenance the sha256 of
    the full card and of its predictor (no paths, settings or training options). Still a valid card."""
    card = load_card(card)
    out = {k: card[k] for k in SAMPLING_KEYS if k in card}
    out['model'] = {k: v for k, v in card.get('model', {}).items() if k in MODEL_KEYS}
    provenance = card.get('provenance') or {}
    out['provenance'] = provenance if set(provenance) <= {'card_sha256', 'predictor_sha256'} else dict(
        card_sha256=card_digest(card), predictor_sha256=provenance.get('predictor_sha256'))
    return out


class _Query(Exception):
    """Raised by the replayed model at the first evaluation it has no output for."""

    def __init__(self, x, sigma):
        super().__init__('pending model evaluation')
        self.x, self.sigma = x, sigma


class _Replay:
    """A denoiser answering the solver's calls from recorded (sigma, model output) pairs, in order, in
    the VE form of models/latent.py: D = x - sigma eps for an epsilon network, D = x / (1 + sigma^2) -
    sigma v / sqrt(1 + sigma^2) for a v-prediction network (v = alpha eps - sigma_vp x_0 at the VP
    point x / sqrt(1 + sigma^2)). ``latent``: the networks are latent models (dynamic thresholding off
    unless the card asks for it)."""

    latent = True
    feature_shape = Denoiser.feature_shape

    def __init__(self, outputs, prediction_type='epsilon'):
        self.outputs, self.calls, self.prediction_type = outputs, 0, prediction_type

    def __call__(self, x, sigma, cond=None):
        if self.calls == len(self.outputs):
            raise _Query(x, sigma)
        expected, out = self.outputs[self.calls]
        self.calls += 1
        if not torch.allclose(sigma.float().cpu(), expected.expand(sigma.shape), rtol=1e-5, atol=0):
            raise RuntimeError(f'AMEDScheduler: the solver queried sigma {float(sigma[0]):g}, the card says '
                               f'{float(expected):g}')
        s = expected.to(x.device, x.dtype)
        out = out.to(x.dtype)
        if self.prediction_type == 'v_prediction':
            return x / (1 + s * s) - s / (1 + s * s).sqrt() * out
        return x - s * out


def _close(values, reference):
    values = [float(v) for v in values]
    return len(values) == len(reference) and all(abs(a - b) <= 1e-4 * max(abs(b), 1e-3) for a, b in zip(values, reference))


class AMEDScheduler(SchedulerMixin, ConfigMixin):
    """Runs an AMED solver card in a diffusers pipeline (see the module docstring).

    Args:
        card: the solver card (a path or the card dict); the config keeps :func:`config_card` of it.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the model's
            noise schedule, as in DDPMScheduler's config (``from_config(pipe.scheduler.config)``
            takes them from the pipeline).
        prediction_type: ``epsilon`` or ``v_prediction`` (SD 2.x-style networks).
    """

    order = 1
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    ignore_for_config = ['card']

    @register_to_config
    def __init__(self, card=None, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule='scaled_linear', trained_betas=None, prediction_type='epsilon'):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"AMEDScheduler runs {' and '.join(PREDICTION_TYPES)} networks, not "
                             f"prediction_type={prediction_type!r}")
        if card is not None:
            card = config_card(card)
            self.register_to_config(**{CONFIG_KEY: card})
        ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas)
        self.maps = DiscreteEpsDenoiser(ddpm.alphas_cumprod)
        self.timesteps = self.sigmas = None
        self.num_inference_steps = None
        self._card = None
        self._index, self._begin_index, self._started = 0, None, False
        if card is not None:
            self._use(card)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config reading, with the card taken from ``card=`` or else the config's card."""
        card = kwargs.pop('card', None)
        if card is None:   # ``card``: where configs saved before the private key kept it
            card = config_dict.get(CONFIG_KEY, config_dict.get('card'))
        config_dict = {k: v for k, v in config_dict.items() if k != 'card'}
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        hidden.pop(CONFIG_KEY, None)    # the card in use is registered by __init__
        if card is not None:
            init_dict['card'] = card
        return init_dict, unused, hidden

    # -- the card ---------------------------------------------------------------------------

    def _use(self, card):
        model = card.get('model', {})
        for key in ('sigma_min', 'sigma_max'):
            theirs, ours = model.get(key), getattr(self.maps, key)
            if theirs is not None and not math.isclose(theirs, ours, rel_tol=1e-4):
                raise ValueError(f"the solver card was made for a model with {key} {theirs:g}; this scheduler's "
                                 f"noise schedule has {ours:g}")
        plain = is_schedule_card(card)
        cls = solvers.solver_class(card['solver'])
        if plain and (cls.two_stage or cls.corrector):
            raise ValueError(f"AMEDScheduler runs schedule cards of single-stage solvers without a corrector, not "
                             f"{card['solver']!r}: sample this card with sample.py or the k-diffusion sampler")
        self._card = card
        self._predictor = card_predictor(card)
        self._spec, t_steps = card_solver_settings(card).prepare(_Replay([]), self._predictor)
        self._t_steps = t_steps.tolist()
        self.query_sigmas = torch.tensor(card['query_sigmas'], dtype=torch.float32)
        self._timesteps = self.maps.timestep(self.query_sigmas.double()).float()
        # Where each pipeline step starts: the interval n whose first evaluation it is (None for the
        # evaluation at an inserted point), and the noise level of the latent the pipeline holds there.
        # A schedule card evaluates once per interval; with AFS its first step also runs interval 0.
        self._starts, levels = {}, []
        afs = bool(card['afs'])
        for n in range(len(self._t_steps) - 1):
            if not (afs and n == 0):
                self._starts[len(levels)] = n
                levels.append(self._t_steps[n])
            if not plain:
                levels.append(card['sigmas'][2 * n + 1])
        if afs:
            self._starts[0] = 0
            levels[0] = self._t_steps[0]   # the AFS step starts from the noise at t_0
        self._levels = torch.tensor(levels + [self._t_steps[-1]], dtype=torch.float32)

    def _require_card(self):
        if self._card is None:
            raise ValueError('AMEDScheduler needs a solver card: AMEDScheduler.from_config(config, card=...)')
        return self._card

    @property
    def card(self):
        """The card in use (as the config keeps it: :func:`config_card`)."""
        return self._require_card()

    @property
    def num_steps(self):
        """Pipeline steps (U-Net calls) of the card."""
        return len(self._require_card()['query_sigmas'])

    @property
    def init_noise_sigma(self):
        return float(self._require_card()['t_steps'][0])

    @property
    def step_index(self):
        """The index of the next pipeline step (None before the first step), as diffusers' schedulers."""
        return self._index if self._started else None

    @property
    def begin_index(self):
        """The first pipeline step (img2img: set by the pipeline through :meth:`set_begin_index`)."""
        return self._begin_index

    # -- the diffusers scheduler interface ----------------------------------------------------

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """Set the card's timesteps (see the module docstring for the accepted arguments)."""
        card = self._require_card()
        n = len(card['query_sigmas'])
        if num_inference_steps is not None and int(num_inference_steps) != n:
            raise ValueError(f"the solver card runs {n} U-Net steps (NFE {card['nfe']}), not num_inference_steps="
                             f"{num_inference_steps}: pass num_inference_steps={n} (pipe.scheduler.num_steps); "
                             f"pipelines pass their own default (50) when it is left out")
        if timesteps is not None and not _close(timesteps, self._timesteps.tolist()):
            raise ValueError(f'timesteps= must be the solver card\'s own ({[round(t, 3) for t in self._timesteps.tolist()]})')
        if sigmas is not None:
            given = [float(s) for s in sigmas]
            given = given[:-1] if given and given[-1] == 0 else given
            if not (_close(given, card['sigmas']) or _close(given, card['t_steps'])):
                raise ValueError('sigmas= must be the solver card\'s sigmas or t_steps (optionally with a trailing 0)')
        self.num_inference_steps = n
        self.timesteps = self._timesteps.to(device)
        self.sigmas = self._levels.to(device)
        self._begin_index = None
        self._begin(0)

    def _begin(self, index):
        self._index, self._started, self._state, self._outputs, self._returned = index, False, None, [], None
        n = self._starts[index]
        self._run_steps = self._t_steps[n:]
        self._afs = bool(self._card['afs']) and n == 0

    def set_begin_index(self, begin_index=0):
        """Start at pipeline step ``begin_index`` (img2img, ``strength`` < 1): the card's intervals from
        the one this step starts, from the noised image (:meth:`add_noise`), with the multistep history
        starting anew and AFS off. The step must start an interval of the card (one clear error else)."""
        if self.timesteps is None:
            raise ValueError('call set_timesteps before set_begin_index')
        k, n = int(begin_index), self.num_inference_steps
        if k not in self._starts:
            ok = ', '.join(f'{(n - j) / n:.3g}' for j in sorted(self._starts, reverse=True) if j > 0)
            raise ValueError(f'img2img would start at pipeline step {k} of the solver card\'s {n}, inside one of its '
                             f'intervals (strength {(n - k) / n:.3g}): choose a strength that starts on an interval '
                             f'({ok}, or 1)')
        self._begin_index = k
        self._begin(k)

    def add_noise(self, original_samples, noise, timesteps):
        """``original_samples + sigma noise`` at the noise level of the pipeline step of ``timesteps``:
        the begin index's when one is set (img2img), else the step each timestep is."""
        if self.timesteps is None:
            raise ValueError('call set_timesteps before add_noise')
        if self._begin_index is not None:   # img2img's noising, or inpainting's after a step
            index = [self._index] * len(timesteps)
        else:
            index = []
            for t in torch.as_tensor(timesteps).reshape(-1).tolist():
                match = (self._timesteps - t).abs().argmin()
                if not abs(float(self._timesteps[match]) - t) <= 1e-3:
                    raise ValueError(f'timestep {t:g} is none of the solver card\'s timesteps')
                index.append(int(match))
        sigma = self._levels[index].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sigma.reshape(-1, *[1] * (original_samples.ndim - 1))

    def _query_point(self, sample):
        """The point the solver queries next, from the interval's start ``sample``."""
        try:
            self._advance(self._replay(list(self._outputs)), self._state_at(sample))
        except _Query as q:
            return q.x
        raise RuntimeError('AMEDScheduler: the interval needs no further model evaluation')

    def _advance(self, replay, state):
        """Step from ``state`` until the recorded outputs are used up: an interval that needs no model
        call (a schedule card's AFS step) is followed by the next one."""
        state, _ = solvers.step(replay, self._spec, state, self._run_steps, None, self._predictor, self._afs)
        while replay.calls < len(replay.outputs) or (replay.calls == 0 and state.i < len(self._run_steps) - 1):
            state, _ = solvers.step(replay, self._spec, state, self._run_steps, None, self._predictor, self._afs)
        return state

    def _replay(self, outputs):
        return _Replay(outputs, self.config.prediction_type)

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
        if not self._started and self._afs:
            sample = self._query_point(sample).to(sample.dtype)
        return sample / (sigma ** 2 + 1).sqrt().to(sample.dtype)

    def step(self, model_output, timestep, sample, return_dict=True):
        """Record the (guided) model output at this step's query point and advance.

        ``sample`` is the pipeline's latent: the point returned by the previous step (the initial
        noise, or the noised image, at the first step). Returns the next point the U-Net is to be
        evaluated at, or the final sample after the last step."""
        self._check_running()
        state = self._state_at(sample)
        self._outputs.append((self.query_sigmas[self._index], model_output.float()))
        self._index += 1
        self._started = True
        try:
            new_state = self._advance(self._replay(self._outputs), state)
        except _Query as q:
            self._state, prev = state, q.x
        else:
            self._state, self._outputs, prev = new_state, [], new_state.x
        prev = self._returned = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self):
        return self.config.num_train_timesteps
