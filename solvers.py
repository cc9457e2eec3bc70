"""ODE solvers for the probability-flow ODE, the AMED plugin, and the one stepping core.

All control flow over time lives here. A sampling run is a loop of :func:`step` calls; each call
advances one interval [t_n, t_{n+1}] of the schedule and takes and returns an explicit
:class:`SolverState` (the current x, the grid index, and the history of model outputs that the
multistep solvers need). Training calls the very same :func:`step`, so a trained predictor
samples exactly as it was trained.

Solvers (``name``: what it is; students can be driven by an AMED predictor):

* ``amed``   AMED-Solver: mean direction at the predicted intermediate time (student only).
* ``euler``  Euler (DDIM in VE form).
* ``ipndm``  iPNDM: Adams-Bashforth with uniform-step coefficients, ``max_order`` 1-4 (default 4).
* ``ipndm_v`` iPNDM_v: Adams-Bashforth with the official variable-step coefficients, ``max_order`` 1-4.
* ``deis``   DEIS: the direction extrapolated by a polynomial in VP time (``deis_mode='tab'``), in
             sigma (``rhoab``) or in log sigma (``logrho``), integrated over sigma; ``max_order`` 1-4.
* ``dpm``    DPM-Solver-2 in sigma space (intermediate time at r = 1/2 without a predictor).
* ``dpmpp``  multistep DPM-Solver++ (``predict_x0=True``) or DPM-Solver (``predict_x0=False``),
             ``max_order`` 1-3 (default 3), ``lower_order_final``; dynamic thresholding of the
             data prediction is on by default in data-prediction mode (``thresholding``);
             ``corrected_3m`` makes the order-3 update third-order accurate (off = official).
* ``unipc``  UniPC (``variant`` bh1/bh2), ``max_order`` 1-3 (default 3), ``predict_x0``,
             ``lower_order_final``, ``thresholding`` as dpmpp; teacher only. Its corrector reuses the
             model output at the next point, which the next step takes instead of calling the model.
* ``heun``   EDM's Heun (2nd order), teacher only (= the ``dpm`` rule with r = 1).

Each solver is a class whose facts (student or teacher, multistep or two-stage, its options, its
NFE rule, its official name) are class data; :data:`REGISTRY` lists them, and everything else reads
it. Adding a solver means adding a class here and naming it in :data:`REGISTRY`.

The AMED plugin (paper Sec. 4, the official code): per interval the predictor reads the 8x8
feature of the model call at t_n and returns (r, c, a); the solver steps to the intermediate
time s = t_{n+1}^r t_n^(1-r), queries the model at a*s (the direction is still divided by s),
and scales the model terms of the final update to t_{n+1} by c. This logic exists once
(:func:`step`); each solver only says how it moves from one time to another:

* single-stage solvers (euler, ipndm, dpmpp) move with their own update, so with a predictor
  they run on the grid refined by the s points; the step leaving s is scaled by c;
* two-stage solvers (amed, dpm, heun) take an Euler step to s and then combine the directions
  d_n and d_s over the whole interval.
"""

import dataclasses
import sys
from typing import Optional

import torch
import torch.utils.checkpoint

import solver_utils
from torch_utils import distributed as dist

# ----------------------------------------------------------------------------------------------
# Solver definitions: how each solver moves between two times, and its facts as class data.

class Option(str):
    """A solver option: its name (the string itself, so ``'max_order' in cls.options`` works), its
    value ``type`` (int, bool or float), a ``help`` line and its ``default`` (a value, or a phrase
    when the default depends on something else). The CLIs build their options from these
    (:mod:`cli`); a plain string is an option without help."""

    def __new__(cls, name, type=bool, help='', default=None):
        self = super().__new__(cls, name)
        self.type, self.help, self.default = type, help, default
        return self

    def __getnewargs__(self):
        return str(self), self.type, self.help, self.default


class Solver:
    """Base class: a single-stage, one-step solver (Euler's rule). Each subclass declares its facts
    once, as class data, and every other place (the CLIs' choice lists, the loss, NFE counting,
    the legacy mapping, the validation messages) reads them from :data:`REGISTRY`:

    * ``name``: the solver's name in every CLI and file.
    * ``student``: it can be driven by an AMED predictor; ``teacher``: it can make training targets.
    * ``needs_predictor``: it is defined only with a predictor (AMED-Solver).
    * ``two_stage``: it evaluates the model at an intermediate time of every interval even without
      a predictor (r fixed at ``fixed_r``); its NFE is 2 per interval (see :meth:`evals_per_interval`).
    * ``multistep``: it carries previous model outputs across intervals (``history_size`` of them).
    * ``corrector``: after some steps (:meth:`corrects`) it evaluates the model at the point it
      reached and corrects that point with the output (UniPC); the next step reuses the output
      instead of calling the model, so the correction costs no extra call except after the last step.
    * ``options``: the keyword options its constructor takes (:class:`Option`: name, type, help
      and default; a tuple type lists the choices); ``max_order_limit``: the highest ``max_order``.
    * ``legacy_name``: the sampler function of the official ``solvers_amed`` module.
    * ``orders``: its declared convergence orders, ``(options, schedule, order)`` triples: with
      these options on this schedule (rho 1) the global error falls as h^order. The common test
      of every registered solver (tests/test_registry.py) checks them against the exact ODE
      solution of the analytic model.
    """

    name = None
    student = True
    teacher = True
    needs_predictor = False
    two_stage = False
    multistep = False
    corrector = False
    fixed_r = None
    options = ()
    max_order_limit = None
    legacy_name = None
    history_size = 0
    orders = ()

    @classmethod
    def build(cls, latent=False, **options):
        """An instance with ``options`` (already checked against :attr:`options`); ``latent``: the
        model works on latents (only solvers whose defaults depend on it look at it)."""
        return cls(**options)

    @classmethod
    def evals_per_interval(cls, with_predictor=False):
        """Model evaluations of one interval: 2 with a predictor or for a two-stage solver, else 1."""
        return 2 if (with_predictor or cls.two_stage) else 1

    def output(self, x, denoised, d):
        """The model output this solver works with: the direction d by default."""
        return d

    def order(self, history, step_cur, total_points):
        return 1

    def advance(self, x, t_from, t_to, m, history, order, scale):
        """Move x from t_from to t_to with current output m and previous ``history``
        (newest first, tuples (sigma, output)); ``scale`` multiplies the model terms."""
        return x + scale * (t_to - t_from) * m

    def corrects(self, step_cur, total_points):
        """Whether the step landing on grid point ``step_cur`` (1-based, of ``total_points``) ends
        with a corrector, i.e. one model call at that point (:func:`step` and :func:`count_nfe` ask this)."""
        return False

    def correct(self, x, t_from, t_to, m, history, order, m_to):  # corrector solvers only
        """The corrected point at t_to, from the step's start (x, m, ``history``) and the model
        output ``m_to`` at the predicted point."""
        raise NotImplementedError

    def combine(self, x, t_cur, t_next, d_cur, d_mid, r, scale):  # two-stage solvers only
        raise NotImplementedError


def _order(cls, max_order):
    """``max_order`` of a multistep solver class, default its limit; ValueError when out of range."""
    order = cls.max_order_limit if max_order is None else max_order
    if int(order) != order or not 1 <= order <= cls.max_order_limit:
        raise ValueError(f'max_order={max_order} is out of range for {cls.name} (1-{cls.max_order_limit})')
    return int(order)


class Euler(Solver):
    name = 'euler'
    legacy_name = 'euler_sampler'
    orders = (({}, 'polynomial', 1),)


class IPNDM(Solver):
    """iPNDM: Adams-Bashforth with uniform-step coefficients."""

    name = 'ipndm'
    multistep = True
    options = (Option('max_order', int, 'multistep order 1-4', 4),)
    max_order_limit = 4
    legacy_name = 'ipndm_sampler'
    # Its fixed coefficients are Adams-Bashforth only on a grid uniform in sigma (polynomial, rho 1).
    orders = tuple((dict(max_order=k), 'polynomial', k) for k in range(1, 5))

    def __init__(self, max_order=None):
        self.max_order = _order(type(self), max_order)
        self.history_size = self.max_order - 1

    def order(self, history, step_cur, total_points):
        return min(self.max_order, len(history) + 1)

    def advance(self, x, t_from, t_to, m, history, order, scale):
        d = solver_utils.adams_bashforth([m] + [h[1] for h in history], order)
        return x + scale * (t_to - t_from) * d


def _sigmas(t_from, history, order):
    """The noise levels of the current point and the ``order - 1`` newest history entries."""
    return [t_from] + [h[0] for h in history[:order - 1]]


def _combination(weights, outputs):
    out = weights[0] * outputs[0]
    for w, m in zip(weights[1:], outputs[1:]):
        out = out + w * m
    return out


class IPNDMv(IPNDM):
    """iPNDM_v: Adams-Bashforth whose coefficients follow the actual step sizes, with the official
    formulas (:func:`solver_utils.ipndm_v_coefficients`)."""

    name = 'ipndm_v'
    legacy_name = 'ipndm_v_sampler'
    # On a uniform grid its order 1-3 coefficients are iPNDM's (the official order-4 weights are
    # not AB4's); tests/test_baselines.py measures them on non-uniform grids.
    orders = tuple((dict(max_order=k), 'polynomial', k) for k in range(1, 4))

    def advance(self, x, t_from, t_to, m, history, order, scale):
        sig = [t_to] + _sigmas(t_from, history, order)
        steps = [a - b for a, b in zip(sig[:-1], sig[1:])]
        weights = solver_utils.ipndm_v_coefficients(steps, order)
        return x + scale * (t_to - t_from) * _combination(weights, [m] + [h[1] for h in history])


class DEIS(IPNDM):
    """DEIS: the newest ``order`` directions interpolated by a polynomial in VP time (``tab``), sigma
    (``rhoab``) or log sigma (``logrho``), integrated exactly over the step
    (:func:`solver_utils.deis_coefficients`); the coefficients come from the noise levels the run
    actually visits, whichever schedule (or refined grid) they belong to."""

    name = 'deis'
    options = (Option('max_order', int, 'multistep order 1-4', 4),
               Option('deis_mode', solver_utils.DEIS_MODES, 'interpolate the direction in VP time (tab), sigma '
                      '(rhoab) or log sigma (logrho, as diffusers)', 'tab'))
    legacy_name = 'deis_sampler'
    # Order k in every mode (tests/test_baselines.py measures each mode and order on non-uniform grids).
    orders = ((dict(max_order=3, deis_mode='logrho'), 'logsnr', 3),)

    def __init__(self, max_order=None, deis_mode='tab'):
        super().__init__(max_order)
        if deis_mode not in solver_utils.DEIS_MODES:
            raise ValueError(f"unknown deis_mode {deis_mode!r} (choose one of {', '.join(solver_utils.DEIS_MODES)})")
        self.deis_mode = deis_mode

    def advance(self, x, t_from, t_to, m, history, order, scale):
        weights = solver_utils.deis_coefficients(_sigmas(t_from, history, order), t_to, self.deis_mode)
        return x + scale * _combination(weights, [m] + [h[1] for h in history])


class _Exponential(Solver):
    """Multistep exponential integrators in data (``predict_x0``) or noise prediction with the
    DPM-Solver order rule (warm-up, ``lower_order_final``). ``thresholding`` defaults to
    ``predict_x0``, and to off on latent models (``latent``: dynamic thresholding, made for pixels
    in [-1, 1], would shrink latents)."""

    multistep = True
    max_order_limit = 3

    @classmethod
    def build(cls, latent=False, **options):
        return cls(latent=latent, **options)

    def __init__(self, max_order=None, predict_x0=True, lower_order_final=True, thresholding=None, latent=False):
        self.max_order = _order(type(self), max_order)
        self.predict_x0 = bool(predict_x0)
        self.lower_order_final = bool(lower_order_final)
        if thresholding is None:
            thresholding = self.predict_x0 and not latent
        self.thresholding = bool(thresholding)
        self.history_size = self.max_order - 1

    def output(self, x, denoised, d):
        if not self.predict_x0:
            return d
        return solver_utils.dynamic_threshold(denoised) if self.thresholding else denoised

    def order(self, history, step_cur, total_points):
        order = solver_utils.dpm_multistep_order(step_cur, total_points, self.max_order, self.lower_order_final)
        return min(order, len(history) + 1)


class DPMpp(_Exponential):
    """Multistep DPM-Solver++ (``predict_x0``) or DPM-Solver."""

    name = 'dpmpp'
    options = (Option('max_order', int, 'multistep order 1-3', 3),
               Option('predict_x0', bool, 'data prediction (DPM-Solver++; False: noise prediction, DPM-Solver)', True),
               Option('lower_order_final', bool, 'lower orders on the last steps', True),
               Option('thresholding', bool, 'dynamic thresholding of the data prediction',
                      'predict_x0 on pixel models, False on latent models'),
               Option('corrected_3m', bool, 'third-order-accurate order-3 update', 'False, the official update'))
    legacy_name = 'dpm_pp_sampler'
    # Any grid (logsnr here). The official order-3 update (as DPM-Solver's and k-diffusion's) is only
    # second-order accurate; corrected_3m restores order 3 (solver_utils.dpm_multistep_update).
    orders = ((dict(max_order=1, thresholding=False), 'logsnr', 1),
              (dict(max_order=2, thresholding=False, lower_order_final=False), 'logsnr', 2),
              (dict(max_order=3, thresholding=False, lower_order_final=False), 'logsnr', 2),
              (dict(max_order=3, thresholding=False, lower_order_final=False, corrected_3m=True), 'logsnr', 3),
              (dict(max_order=2, predict_x0=False, lower_order_final=False), 'logsnr', 2),
              (dict(max_order=3, predict_x0=False, lower_order_final=False), 'logsnr', 2),
              (dict(max_order=3, predict_x0=False, lower_order_final=False, corrected_3m=True), 'logsnr', 3))

    def __init__(self, max_order=None, predict_x0=True, lower_order_final=True, thresholding=None, corrected_3m=False,
                 latent=False):
        super().__init__(max_order, predict_x0, lower_order_final, thresholding, latent)
        self.corrected_3m = bool(corrected_3m)

    def advance(self, x, t_from, t_to, m, history, order, scale):
        outputs = [m] + [h[1] for h in history]
        sigmas = [t_from] + [h[0] for h in history]
        return solver_utils.dpm_multistep_update(x, t_to, outputs, sigmas, order, self.predict_x0, scale,
                                                 self.corrected_3m)


class UniPC(_Exponential):
    """UniPC: the UniP predictor of the current order, then (:meth:`corrects`: every step but the
    last, and every warm-up step) one model call at the predicted point and the UniC corrector with
    it. The output at the predicted point is what the next step starts from, as the official code."""

    name = 'unipc'
    student = False
    corrector = True
    # UniC raises UniP's order by one (tests/test_baselines.py measures order 3 too, on fewer steps).
    orders = tuple((dict(max_order=k, lower_order_final=False, thresholding=False), 'logsnr', k + 1) for k in (1, 2))
    options = (Option('max_order', int, 'multistep order 1-3', 3),
               Option('predict_x0', bool, 'data prediction (False: noise prediction)', True),
               Option('lower_order_final', bool, 'lower orders on the last steps', True),
               Option('thresholding', bool, 'dynamic thresholding of the data prediction',
                      'predict_x0 on pixel models, False on latent models'),
               Option('variant', solver_utils.UNIPC_VARIANTS, 'B(h) = h (bh1) or e^h - 1 (bh2)', 'bh2'))
    legacy_name = 'unipc_sampler'

    def __init__(self, max_order=None, predict_x0=True, lower_order_final=True, thresholding=None, variant='bh2',
                 latent=False):
        super().__init__(max_order, predict_x0, lower_order_final, thresholding, latent)
        if variant not in solver_utils.UNIPC_VARIANTS:
            raise ValueError(f"unknown variant {variant!r} (choose one of {', '.join(solver_utils.UNIPC_VARIANTS)})")
        self.variant = variant

    def corrects(self, step_cur, total_points):
        return step_cur < self.max_order or step_cur != total_points - 1

    def advance(self, x, t_from, t_to, m, history, order, scale):
        return solver_utils.unipc_predict(x, t_to, [m] + [h[1] for h in history], _sigmas(t_from, history, order),
                                          order, self.predict_x0, self.variant)

    def correct(self, x, t_from, t_to, m, history, order, m_to):
        return solver_utils.unipc_correct(x, t_to, [m] + [h[1] for h in history], _sigmas(t_from, history, order),
                                          order, m_to, self.predict_x0, self.variant)


class TwoStage(Solver):
    """Euler step to s = t_next^r t_cur^(1-r), then the DPM-Solver-2 combination of d_cur and d_mid
    over the whole interval, weights 1/(2r) and 1 - 1/(2r)."""

    two_stage = True

    def combine(self, x, t_cur, t_next, d_cur, d_mid, r, scale):
        w = 1 / (2 * r)
        return x + scale * (t_next - t_cur) * (w * d_mid + (1 - w) * d_cur)


class AMED(TwoStage):
    """AMED-Solver: the mean direction d_mid at the predicted intermediate time (student only)."""

    name = 'amed'
    teacher = False
    needs_predictor = True
    legacy_name = 'amed_sampler'

    def combine(self, x, t_cur, t_next, d_cur, d_mid, r, scale):
        return x + scale * (t_next - t_cur) * d_mid


class DPM2(TwoStage):
    """DPM-Solver-2 in sigma space, r = 1/2 without a predictor."""

    name = 'dpm'
    fixed_r = 0.5
    legacy_name = 'dpm_2_sampler'
    orders = (({}, 'polynomial', 2),)


class Heun(TwoStage):
    """EDM's Heun (2nd order; the DPM-Solver-2 rule with r = 1), teacher only."""

    name = 'heun'
    student = False
    fixed_r = 1.0
    legacy_name = 'heun_sampler'
    orders = (({}, 'polynomial', 2),)


#: Every solver, by name: the one list of solvers and of their kinds.
REGISTRY = {cls.name: cls for cls in (AMED, Euler, IPNDM, IPNDMv, DEIS, DPM2, DPMpp, UniPC, Heun)}
SOLVERS = tuple(REGISTRY)
STUDENTS = tuple(n for n, c in REGISTRY.items() if c.student)
TEACHERS = tuple(n for n, c in REGISTRY.items() if c.teacher)
PLAIN = tuple(n for n, c in REGISTRY.items() if not c.needs_predictor)     # usable without a predictor
OPTIONS = tuple(dict.fromkeys(opt for c in REGISTRY.values() for opt in c.options))


def option_declarations(name):
    """(solver class, :class:`Option`) of every registered solver that takes option ``name``."""
    return [(cls, opt) for cls in REGISTRY.values() for opt in cls.options if opt == name]


def option_type(name):
    """The value type of solver option ``name`` from its :class:`Option` data (a tuple lists the
    choices of a string option; a plain-string option is a bool)."""
    declared = option_declarations(name)
    if not declared:
        raise KeyError(f'no solver takes the option {name!r}')
    return getattr(declared[0][1], 'type', bool)


def solver_class(name, role='solver'):
    """The registered class of ``name``; ValueError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown {role} {name!r} (choose one of {', '.join(SOLVERS)})")
    return REGISTRY[name]


def takers(option):
    """The names of the solvers that take ``option``, as a phrase ('ipndm and dpmpp')."""
    names = [n for n, c in REGISTRY.items() if option in c.options]
    return ' and '.join(names)


def make_solver(name, latent=False, **options):
    """Build a solver by name with its ``options`` (None = the solver's default), validating them:
    ValueError naming an unknown solver, an option the solver does not take, or a bad value.
    ``latent``: the model works on latents (see :class:`DPMpp`)."""
    cls = solver_class(name)
    given = {k: v for k, v in options.items() if v is not None}
    for opt in given:
        if opt not in OPTIONS:
            raise TypeError(f'make_solver() got an unknown option {opt!r}')
        if opt not in cls.options:
            raise ValueError(f"{opt} is an option of {takers(opt)} only, not of solver {name!r}")
    return cls.build(latent, **given)


def options_of(solver):
    """The options of a built ``solver`` as a dict (the inverse of :func:`make_solver`)."""
    return {opt: getattr(solver, opt) for opt in type(solver).options}


def count_nfe(solver, num_steps, afs=False, with_predictor=False, denoise_to_zero=False, calls_per_eval=1):
    """Number of model evaluations of one sampling run of ``solver`` (a name, built with its default
    options, or a built :class:`Solver`) over ``num_steps`` points.

    Each interval costs :meth:`Solver.evals_per_interval` (2 with an AMED predictor or for a
    two-stage solver, else 1), minus one for the whole run with AFS (the official code). A corrector
    solver (UniPC) makes its call at the end of the interval instead, when :meth:`Solver.corrects`
    says so, the same rule :func:`step` follows, and the next interval reuses that output: the run
    costs one call at the first point (none with AFS) plus one per correcting step, which is the
    official count. ``denoise_to_zero`` adds the final denoising call; ``calls_per_eval`` is 2 under
    classifier-free guidance."""
    spec = make_solver(solver) if isinstance(solver, str) else solver
    if spec.corrector and not with_predictor:
        intervals = range(1, num_steps)
        nfe = 1 - int(bool(afs)) + sum(1 for k in intervals if spec.corrects(k, num_steps))
    else:
        per_interval = type(spec).evals_per_interval(with_predictor)
        nfe = per_interval * (num_steps - 1) - int(bool(afs))
    return (nfe + int(bool(denoise_to_zero))) * calls_per_eval


# ----------------------------------------------------------------------------------------------
# Predictors.

class FixedPredictor:
    """A predictor that returns the same (r, scale_dir, scale_time) for every sample and
    interval. Useful for ablations and tests: r = 0.5 with both scales 1 turns the plugin into
    the plain solver on the grid refined by geometric midpoints."""

    needs_feature = False

    def __init__(self, r=0.5, scale_dir=1.0, scale_time=1.0):
        if not 0 < r <= 1:
            raise ValueError(f'r must be in (0, 1], got {r}')
        self.r, self.scale_dir, self.scale_time = float(r), float(scale_dir), float(scale_time)

    def __call__(self, feature, t_cur, t_next):
        ones = torch.ones(feature.shape[0], dtype=torch.float64, device=feature.device)
        return ones * self.r, ones * self.scale_dir, ones * self.scale_time


def _predict(predictor, feature, t_cur, t_next, x):
    """Call the predictor and return (r, c, a) as (B,1,1,1) tensors of x's dtype."""
    out = predictor(feature, t_cur, t_next)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ValueError('an AMED predictor must return the triple (r, scale_dir, scale_time)')
    b = x.shape[0]
    return tuple(v.reshape(b, 1, 1, 1).to(x.dtype) for v in out)


# ----------------------------------------------------------------------------------------------
# The stepping core.

@dataclasses.dataclass(frozen=True)
class SolverState:
    """Everything a solver carries between intervals.

    ``x``: the current sample at t_steps[i]; ``i``: grid index; ``history``: previous
    (sigma, output) pairs, newest first, sigma as a (B,1,1,1) tensor (multistep solvers);
    ``current``: (denoised, output) of the model call a corrector made at this point (the previous
    step's), which this step takes instead of calling the model, or None."""
    x: torch.Tensor
    i: int = 0
    history: tuple = ()
    current: Optional[tuple] = None

    def detach(self):
        current = None if self.current is None else tuple(v.detach() for v in self.current)
        return SolverState(self.x.detach(), self.i, tuple((s.detach(), m.detach()) for s, m in self.history), current)


@dataclasses.dataclass
class StepInfo:
    """What one step did: the predictor outputs (None without predictor), the model calls, and
    the data prediction D(x; t_cur) at the start of the interval (from AFS at an AFS step)."""
    r: Optional[torch.Tensor] = None
    scale_dir: Optional[torch.Tensor] = None
    scale_time: Optional[torch.Tensor] = None
    nfe: int = 0
    denoised: Optional[torch.Tensor] = None


def _col(v, x):
    """A (B,1,1,1) tensor of x's dtype and device from a float or per-sample tensor."""
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


def _denoise(model, x, sigma_query, cond, capture=False):
    """D(x; sigma_query) cast to x's dtype, plus the 8x8 AMED feature when ``capture``."""
    sigma = sigma_query.reshape(x.shape[0])
    if capture:
        with model.capture_feature() as holder:
            denoised = model(x, sigma, cond)
        if 'feature' not in holder:
            raise RuntimeError(f'{type(model).__name__}: the feature module was not called')
        return denoised.to(x.dtype), holder['feature']
    return model(x, sigma, cond).to(x.dtype), None


def _push(history, entry, size):
    return ((entry,) + tuple(history))[:size]


def step(model, solver, state, t_steps, cond=None, predictor=None, afs=False):
    """Advance ``state`` by one interval [t_steps[i], t_steps[i+1]] and return (new state, StepInfo).

    ``t_steps`` is the student's whole schedule (a list of floats): its length fixes the order
    rule of dpmpp. ``afs`` replaces the first model call of the run (i == 0) by the analytical
    first step; the predictor then reads a zero feature, as the official code. With a
    ``predictor`` the AMED plugin is applied (see the module docstring).
    """
    i, x = state.i, state.x
    t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
    total = len(t_steps)
    info = StepInfo()
    tc = _col(t_cur, x)

    # The evaluation at t_cur: the model (hooked for the predictor's feature) or AFS.
    want_feature = predictor is not None and getattr(predictor, 'needs_feature', True)
    feature = None
    if state.current is not None:       # evaluated by the previous step's corrector
        denoised, m_cur = state.current
    else:
        if afs and i == 0:
            d_cur = solver_utils.afs_direction(x, tc)
            denoised = x - tc * d_cur
        else:
            denoised, feature = _denoise(model, x, tc, cond, capture=want_feature)
            d_cur = (x - denoised) / tc
            info.nfe += 1
        m_cur = solver.output(x, denoised, d_cur)
    info.denoised = denoised
    if predictor is not None and feature is None:   # AFS step or a feature-free predictor
        feature = torch.zeros(x.shape[0], *model.feature_shape, device=x.device)

    # Plain single-stage step, with the corrector's model call at t_next where the solver has one.
    if predictor is None and not solver.two_stage:
        order = solver.order(state.history, i + 1, total)
        tn = _col(t_next, x)
        x_next = solver.advance(x, tc, tn, m_cur, state.history, order, 1.0)
        history = _push(state.history, (tc, m_cur), solver.history_size)
        current = None
        if solver.corrects(i + 1, total):
            denoised_next, _ = _denoise(model, x_next, tn, cond)
            info.nfe += 1
            m_next = solver.output(x_next, denoised_next, (x_next - denoised_next) / tn)
            x_next = solver.correct(x, tc, tn, m_cur, state.history, order, m_next)
            current = (denoised_next, m_next)
        return SolverState(x_next, i + 1, history, current), info

    # Intermediate time s and the scales: predicted, or fixed for plain two-stage solvers.
    if predictor is None:
        r, c, a = solver.fixed_r, 1.0, 1.0
        s = _col(solver_utils.intermediate_time(t_cur, t_next, r), x)
    else:
        r, c, a = _predict(predictor, feature, t_cur, t_next, x)
        info.r, info.scale_dir, info.scale_time = r, c, a
        s = solver_utils.intermediate_time(t_cur, t_next, r)
    tn = _col(t_next, x)

    if solver.two_stage:
        y = x + (s - tc) * d_cur
        denoised_mid, _ = _denoise(model, y, a * s, cond)
        info.nfe += 1
        d_mid = (y - denoised_mid) / s
        x_next = solver.combine(x, tc, tn, d_cur, d_mid, r, c)
        return SolverState(x_next, i + 1, ()), info

    # Single-stage solver on the grid refined by s: t_cur -> s -> t_next (points 2i+1, 2i+2 of 2N-1).
    refined_total = 2 * total - 1
    order = solver.order(state.history, 2 * i + 1, refined_total)
    y = solver.advance(x, tc, s, m_cur, state.history, order, 1.0)
    history = _push(state.history, (tc, m_cur), solver.history_size)
    denoised_mid, _ = _denoise(model, y, a * s, cond)
    info.nfe += 1
    m_mid = solver.output(y, denoised_mid, (y - denoised_mid) / s)
    order = solver.order(history, 2 * i + 2, refined_total)
    x_next = solver.advance(y, s, tn, m_mid, history, order, c)
    history = _push(history, (s, m_mid), solver.history_size)
    return SolverState(x_next, i + 1, history), info


# ----------------------------------------------------------------------------------------------
# Whole runs.

def check_predictor(solver, predictor):
    """ValueError when the built ``solver`` cannot run with (or without) ``predictor``."""
    if predictor is not None and not solver.student:
        raise ValueError(f"solver {solver.name!r} is a teacher only and takes no AMED predictor")
    if predictor is None and solver.needs_predictor:
        raise ValueError(f"solver {solver.name!r} needs an AMED predictor (with r fixed at 0.5 it equals 'dpm')")


def get_model_schedule(model, num_steps, sigma_min=None, sigma_max=None, schedule_type=solver_utils.SCHEDULE_TYPE,
                       schedule_rho=solver_utils.SCHEDULE_RHO):
    """The schedule for ``model`` (validated by :func:`solver_utils.get_schedule`): the sigma range
    defaults to the model's, and the ``discrete`` schedule uses the model's sigma<->t maps."""
    sigma_min = model.sigma_min if sigma_min is None else sigma_min
    sigma_max = model.sigma_max if sigma_max is None else sigma_max
    return solver_utils.get_schedule(num_steps, sigma_min, sigma_max, schedule_type, schedule_rho,
                                     sigma_to_t=getattr(model, 'sigma_to_t', None),
                                     t_to_sigma=getattr(model, 't_to_sigma', None))


def check_t_steps(t_steps):
    """An explicit schedule as a float64 tensor; ValueError unless it descends over >= 2 positive levels."""
    t_steps = torch.as_tensor(t_steps, dtype=torch.float64)
    if t_steps.ndim != 1 or len(t_steps) < 2 or not bool((t_steps[1:] < t_steps[:-1]).all()) or t_steps[-1] <= 0:
        raise ValueError('t_steps must be a descending list of at least 2 positive noise levels')
    return t_steps


def warn_sigma_range(model, t_steps):
    """Print one warning line to stderr (rank 0) when the schedule ``t_steps`` leaves the noise range
    the model was trained on (``model.sigma_min``..``model.sigma_max``): the model's outputs there
    are extrapolation. Returns the line, or None."""
    lo, hi = float(t_steps[-1]), float(t_steps[0])
    tol = 1e-9
    if hi <= model.sigma_max * (1 + tol) and lo >= model.sigma_min * (1 - tol):
        return None
    line = (f'Warning: the schedule spans sigma {lo:g}..{hi:g}, outside the model\'s trained range '
            f'{model.sigma_min:g}..{model.sigma_max:g} (--sigma_min/--sigma_max)')
    dist.print0(line, file=sys.stderr)
    return line


def prepare(model, solver='euler', num_steps=4, sigma_min=None, sigma_max=None,
            schedule_type=solver_utils.SCHEDULE_TYPE, schedule_rho=solver_utils.SCHEDULE_RHO, predictor=None,
            t_steps=None, **options):
    """Validate a run's options once (ValueError naming the bad one) and return (solver, schedule):
    the built solver (:func:`make_solver` with ``options``, e.g. ``max_order``) and the float64
    schedule (``t_steps`` if given, else :func:`get_model_schedule`). Pass both to :func:`sample`
    or :func:`iterate`; they check nothing again."""
    spec = make_solver(solver, latent=getattr(model, 'latent', False), **options)
    check_predictor(spec, predictor)
    if t_steps is None:
        t_steps = get_model_schedule(model, num_steps, sigma_min, sigma_max, schedule_type, schedule_rho)
    else:
        t_steps = check_t_steps(t_steps)
    return spec, t_steps


def iterate(model, solver, x, t_steps, cond=None, predictor=None, afs=False, checkpointing=False,
            detach_state=False):
    """Run the built ``solver`` (from :func:`prepare`) over the whole schedule ``t_steps`` from ``x`` at
    ``t_steps[0]`` (already scaled to that noise level), yielding ``(state, info)`` after every
    interval: the one loop over time that sampling, training and the integrations share.

    For training through the whole run: ``checkpointing`` recomputes each step in the backward
    pass instead of keeping its activations (torch.utils.checkpoint, non-reentrant; only while
    gradients are enabled); ``detach_state`` cuts the graph between steps."""
    t_list = [float(t) for t in t_steps]
    state = SolverState(x)
    checkpointing = checkpointing and torch.is_grad_enabled()
    for _ in range(len(t_list) - 1):
        if checkpointing:
            state, info = torch.utils.checkpoint.checkpoint(step, model, solver, state, t_list, cond, predictor, afs,
                                                            use_reentrant=False)
        else:
            state, info = step(model, solver, state, t_list, cond, predictor, afs)
        yield state, info
        if detach_state:
            state = state.detach()


def denoise(model, x, sigma, cond=None):
    """The final denoising call x <- D(x; sigma) (``denoise_to_zero``; k-diffusion's Euler step
    from sigma to 0, which lands exactly on D)."""
    return _denoise(model, x, _col(sigma, x), cond)[0]


def sample(model, latents, cond=None, *, solver='euler', t_steps=None, afs=False, predictor=None,
           denoise_to_zero=False, return_inters=False, **options):
    """Solve the probability-flow ODE from unit-variance ``latents`` (x_0 = latents * sigma_max).

    Args:
        model: a denoiser ``model(x, sigma, cond) -> D(x; sigma)`` with ``sigma_min``/``sigma_max``
            attributes (see models/base.py); ``capture_feature()`` is needed with a learned predictor.
        latents: (B, C, H, W) standard normal noise; any float dtype and device.
        cond: conditioning passed through to the model (class labels, text embeddings).
        solver: a built :class:`Solver` with its schedule ``t_steps`` (from :func:`prepare`; nothing
            is checked again), or a solver name (one of :data:`SOLVERS`), validated by :func:`prepare`
            together with ``options``:

            * ``num_steps``: time points N of the schedule (N-1 intervals; default 4);
            * ``sigma_min``, ``sigma_max``: noise range (default: the model's);
            * ``schedule_type``, ``schedule_rho``: polynomial | logsnr | time_uniform | discrete, and
              its exponent (defaults :data:`solver_utils.SCHEDULE_TYPE`, :data:`solver_utils.SCHEDULE_RHO`);
            * the solver's own options (``Solver.options``): ``max_order`` (iPNDM, iPNDM_v, DEIS 1-4,
              DPM-Solver++ and UniPC 1-3), ``predict_x0``, ``lower_order_final``, ``thresholding``
              (default predict_x0 on pixel models, off on latent models) for DPM-Solver++ and UniPC,
              ``corrected_3m`` (third-order-accurate 3M update; off: the official, second-order
              update) for DPM-Solver++, ``variant`` (bh1, bh2) for UniPC, ``deis_mode`` (tab, rhoab,
              logrho) for DEIS.
        t_steps: an explicit descending schedule (overrides num_steps and the schedule options).
        afs: analytical first step (saves the first model call).
        predictor: an AMED predictor ``(feature (B,8,8), t_cur, t_next) -> (r, scale_dir, scale_time)``
            (each of shape (B,) or (B,1)), e.g. :class:`FixedPredictor` or the trained network.
        denoise_to_zero: finish with one extra call x <- D(x; sigma_min).
        return_inters: return the trajectory at the N grid points (N, B, C, H, W) (plus the
            denoised output last when ``denoise_to_zero``) instead of the final sample.
    """
    if isinstance(solver, Solver):
        if t_steps is None or options:
            raise ValueError('a built solver is sampled with its schedule t_steps and no further options')
        spec = solver
    else:
        spec, t_steps = prepare(model, solver, predictor=predictor, t_steps=t_steps, **options)
    t_list = [float(t) for t in t_steps]
    x = latents * t_list[0]
    inters = [x]
    for state, _ in iterate(model, spec, x, t_list, cond, predictor, afs):
        x = state.x
        if return_inters:
            inters.append(x)
    if denoise_to_zero:
        x = denoise(model, x, t_list[-1], cond)
        if return_inters:
            inters.append(x)
    return torch.stack(inters) if return_inters else x
