"""One value for a run's solver settings: :class:`SolverSettings`.

The solver and its options (the keys its class in :mod:`solvers` declares), the schedule (type,
rho and sigma range, or an explicit ``t_steps``) and AFS. It is validated once, when built, and
written and read through one versioned pair, :meth:`SolverSettings.to_dict` and
:meth:`SolverSettings.from_dict`. Snapshots, training_options.json, solver cards and sample
manifests store it; the published-pickle reader fills it from the official attributes.

:meth:`~SolverSettings.to_dict` gives a flat dict (``settings_version``, ``solver``, ``num_steps``,
the schedule keys, ``afs``, ``t_steps`` when explicit, and every option of the solver by name), so
it merges into a predictor's settings beside the model's keys (``dataset_name``, ...).
:meth:`~SolverSettings.from_dict` reads that, and the unversioned dicts of older files: the flat
settings of snapshots and cards (options at the top level, those not given absent) and the
``{name, options, afs, t_steps}`` entry of sample manifests.
"""

import dataclasses
import math
from typing import Optional

import solver_utils
import solvers

VERSION = 2          # 1: the unversioned dicts of older code (read by from_dict)
VERSION_KEY = 'settings_version'
_SCHEDULE_DEFAULTS = dict(schedule_type=solver_utils.SCHEDULE_TYPE, schedule_rho=solver_utils.SCHEDULE_RHO,
                          sigma_min=None, sigma_max=None)


@dataclasses.dataclass(frozen=True)
class SolverSettings:
    """A run's solver settings, validated when built (ValueError naming the bad field).

    ``options``: the solver's options as ``(name, value)`` pairs in the order of its class's
    ``options`` (every option, None = the solver's default); pass a dict, it is normalised.
    ``t_steps``: an explicit schedule (then ``num_steps`` is its length and the schedule keys are
    not used: they are reset to their defaults). ``sigma_min``/``sigma_max`` None: the model's."""

    solver: str
    num_steps: int = 4
    options: tuple = ()
    schedule_type: str = solver_utils.SCHEDULE_TYPE
    schedule_rho: float = solver_utils.SCHEDULE_RHO
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    t_steps: Optional[tuple] = None
    afs: bool = False

    def __post_init__(self):
        cls = solvers.solver_class(self.solver)
        given = dict(self.options)
        unknown = [k for k in given if k not in cls.options]
        if unknown:
            k = unknown[0]
            where = f'an option of {solvers.takers(k)} only' if k in solvers.OPTIONS else 'not a solver option'
            raise ValueError(f"{k} is {where}, not of solver {self.solver!r}")
        solvers.make_solver(self.solver, **given)     # checks every value
        set_ = lambda k, v: object.__setattr__(self, k, v)   # noqa: E731 (frozen: normalise once)
        set_('options', tuple((str(k), given.get(k)) for k in cls.options))
        if self.schedule_type not in solver_utils.SCHEDULES:
            raise ValueError(f"unknown schedule_type {self.schedule_type!r} "
                             f"(choose one of {', '.join(solver_utils.SCHEDULES)})")
        rho = self.schedule_rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
            raise ValueError(f'schedule_rho must be a positive number, got {rho!r}')
        set_('schedule_rho', float(rho))
        for key in ('sigma_min', 'sigma_max'):
            v = getattr(self, key)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise ValueError(f'{key} must be a positive number, got {v!r}')
                set_(key, float(v))
        if self.t_steps is not None:
            t = tuple(float(v) for v in solvers.check_t_steps(self.t_steps).tolist())
            set_('t_steps', t)
            set_('num_steps', len(t))
            for key in ('schedule_type', 'schedule_rho', 'sigma_min', 'sigma_max'):
                set_(key, _SCHEDULE_DEFAULTS[key])
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, float)) or \
                int(self.num_steps) != self.num_steps or not 2 <= self.num_steps <= solver_utils.MAX_TIME_POINTS:
            raise ValueError(f'num_steps must be an integer >= 2 and at most {solver_utils.MAX_TIME_POINTS}, '
                             f'got {self.num_steps!r}')
        set_('num_steps', int(self.num_steps))
        if not isinstance(self.afs, (bool, int)) or self.afs not in (0, 1):   # a string 'no' would read as true
            raise ValueError(f'afs must be true or false, got {self.afs!r}')
        set_('afs', bool(self.afs))

    # -- reading it ---------------------------------------------------------------------------

    #: Every key of :meth:`to_dict` (and keyword of :meth:`from_dict`) but the version.
    KEYS = ('solver', 'num_steps', *_SCHEDULE_DEFAULTS, 'afs', 't_steps', *solvers.OPTIONS)
    #: The keys an explicit ``t_steps`` replaces.
    SCHEDULE_KEYS = ('num_steps', *_SCHEDULE_DEFAULTS)

    @property
    def solver_options(self):
        """The solver's options as a dict (None = the solver's default)."""
        return dict(self.options)

    def sample_kwargs(self):
        """These settings as the keyword arguments of :func:`solvers.sample` (defaults left out)."""
        kw = dict(solver=self.solver, num_steps=self.num_steps, afs=self.afs, t_steps=self.t_steps and list(self.t_steps))
        if self.t_steps is None:
            kw.update({k: getattr(self, k) for k in _SCHEDULE_DEFAULTS})
        return {k: v for k, v in dict(kw, **dict(self.options)).items() if v is not None}

    def prepare(self, model, predictor=None):
        """(built solver, float64 schedule) for ``model``: :func:`solvers.prepare` of these settings."""
        kw = self.sample_kwargs()
        kw.pop('afs')
        return solvers.prepare(model, predictor=predictor, **kw)

    def nfe(self, with_predictor, calls_per_eval=1):
        """Model evaluations of one run (:func:`solvers.count_nfe`)."""
        spec = solvers.make_solver(self.solver, **self.solver_options)    # UniPC's count depends on max_order
        return solvers.count_nfe(spec, self.num_steps, self.afs, with_predictor, calls_per_eval=calls_per_eval)

    def replace(self, **changes):
        """A copy with ``changes`` (validated again); ``options`` may be a dict of some options."""
        if 'options' in changes:
            changes['options'] = dict(self.options, **dict(changes['options']))
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolved(cls, spec, t_steps, afs):
        """The settings of a built solver ``spec`` on its schedule ``t_steps``: every option as the
        solver resolved it and the explicit schedule (what a manifest records)."""
        return cls(spec.name, options=solvers.options_of(spec), t_steps=tuple(float(t) for t in t_steps), afs=afs)

    # -- one versioned pair ---------------------------------------------------------------------

    def to_dict(self):
        """Plain JSON data (see the module docstring); :meth:`from_dict` reads it back."""
        d = {VERSION_KEY: VERSION, 'solver': self.solver, 'num_steps': self.num_steps}
        if self.t_steps is None:
            d.update({k: getattr(self, k) for k in _SCHEDULE_DEFAULTS})
        else:
            d['t_steps'] = list(self.t_steps)
        d['afs'] = self.afs
        d.update(self.options)
        return d

    @classmethod
    def from_dict(cls, d):
        """Settings from a dict of :meth:`to_dict` or of older files (see the module docstring);
        other keys (dataset_name, ...) are ignored. ValueError (one line) when it is not valid."""
        if not isinstance(d, dict):
            raise ValueError(f'solver settings must be a dict, got {type(d).__name__}')
        version = d.get(VERSION_KEY, 1)
        if version not in (1, VERSION):
            raise ValueError(f'unsupported solver settings version {version!r} (this code reads 1-{VERSION})')
        if version == 1 and 'name' in d and isinstance(d.get('options'), dict):     # a manifest's entry
            d = dict(d['options'], solver=d['name'], afs=d.get('afs', False), t_steps=d.get('t_steps'))
        if 'solver' not in d:
            raise ValueError('the solver settings name no solver')
        opts = solvers.solver_class(d['solver']).options
        foreign = [k for k in solvers.OPTIONS if k not in opts and d.get(k) is not None]
        opts = (*opts, *foreign[:1])        # refused with the message of the constructor
        kw = {k: d[k] for k in ('num_steps', 'afs', *_SCHEDULE_DEFAULTS) if d.get(k) is not None}
        return cls(d['solver'], options={k: d.get(k) for k in opts}, t_steps=d.get('t_steps'), **kw)
