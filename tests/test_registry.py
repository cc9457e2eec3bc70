"""The common test of every registered solver (solvers.REGISTRY): registering a solver is what
tests it. For each solver and each value of each of its options: the model calls match its NFE
rule, an image does not depend on its batch, its settings survive the settings value's dict; and
each convergence order the solver declares (``Solver.orders``) holds against the exact ODE
solution of the analytic model."""

import json

import numpy as np
import pytest
import torch

import solver_utils
import solvers
from models.toy import GaussianMixture
from predictors.settings import SolverSettings
from solvers import SolverState

from tests.test_solvers import ConstantPredictor, CountingModel, latents


def option_values(cls, option):
    """The values of ``option`` worth trying on solver class ``cls``."""
    if option == 'max_order':
        return list(range(1, cls.max_order_limit + 1))
    if getattr(option, 'type', bool) is bool:
        return [True, False]
    return [option.default]


def configs(cls):
    """The solver's configurations: its defaults, then each value of each option alone."""
    return [{}] + [{opt: v} for opt in cls.options for v in option_values(cls, opt)]


CONFIGS = [(name, opts) for name, cls in solvers.REGISTRY.items() for opts in configs(cls)]
ORDERS = [(name, opts, schedule, order) for name, cls in solvers.REGISTRY.items() for opts, schedule, order in cls.orders]


def config_id(value):
    return ','.join(f'{k}={v}' for k, v in value.items()) or 'defaults' if isinstance(value, dict) else str(value)


@pytest.fixture(scope='module')
def gmm():
    return GaussianMixture(seed=0)


@pytest.mark.parametrize('name,opts', CONFIGS, ids=config_id)
class TestRegisteredSolver:

    def test_model_calls_match_nfe_rule(self, gmm, name, opts):
        cls = solvers.REGISTRY[name]
        cases = [(p, afs) for p in ([False] if not cls.student else [True] if cls.needs_predictor else [False, True])
                 for afs in (False, True)]
        for with_predictor, afs in cases:
            model = CountingModel(gmm)
            solvers.sample(model, latents(2, dtype=torch.float32), solver=name, num_steps=5, afs=afs,
                           predictor=ConstantPredictor() if with_predictor else None, **opts)
            assert model.calls == solvers.count_nfe(name, 5, afs, with_predictor), (with_predictor, afs)
            if with_predictor:
                assert model.calls == 2 * (5 - 1) - int(afs)

    def test_image_independent_of_batch(self, gmm, name, opts):
        cls = solvers.REGISTRY[name]
        z = latents(7, seed=5, dtype=torch.float32)
        kw = dict(solver=name, num_steps=5, afs=True, predictor=ConstantPredictor() if cls.student else None, **opts)
        full = solvers.sample(gmm, z, **kw)
        for b in (1, 2, 3):   # the official code mispredicts batches of 2 and 3
            assert (solvers.sample(gmm, z[:b], **kw) - full[:b]).abs().max().item() <= 1e-6
        perm = torch.tensor([4, 0, 6, 2])
        assert (solvers.sample(gmm, z[perm], **kw) - full[perm]).abs().max().item() <= 1e-6

    def test_settings_round_trip(self, name, opts):
        settings = SolverSettings(name, num_steps=5, options=opts, schedule_type='logsnr', afs=True)
        back = SolverSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
        assert back == settings and all(back.solver_options[k] == v for k, v in opts.items())
        spec, _ = settings.prepare(gmm_model(), None if not solvers.REGISTRY[name].needs_predictor else
                                   solvers.FixedPredictor())
        assert all(solvers.options_of(spec)[k] == v for k, v in opts.items())


def gmm_model():
    return GaussianMixture(seed=0)


SIGMA_HI, SIGMA_LO = 2.0, 0.2


def run_with_exact_start(model, spec, t_list, exact_at):
    """Solve on grid ``t_list`` starting from the exact solution, with the multistep history
    filled from exact values (as convergence theory for multistep methods assumes)."""
    k = spec.history_size + 1
    hist = []
    for j in range(k - 1):
        xj = exact_at(t_list[j])
        tj = torch.full((xj.shape[0], 1, 1, 1), t_list[j], dtype=xj.dtype)
        dj = model(xj, tj.reshape(-1))
        hist.insert(0, (tj, spec.output(xj, dj, (xj - dj) / tj)))
    state = SolverState(exact_at(t_list[k - 1]), k - 1, tuple(hist))
    while state.i < len(t_list) - 1:
        state, _ = solvers.step(model, spec, state, t_list, None)
    return state.x


def measured_order(model, name, opts, schedule, rho=1.0, counts=(64, 128, 256)):
    """The fitted slope of log error against log step count, each run started from the exact
    solution, and the errors themselves."""
    z = latents(3, seed=1)
    spec = solvers.make_solver(name, **opts)
    grids = [solver_utils.get_schedule(n + 1, SIGMA_LO, SIGMA_HI, schedule, rho).tolist() for n in counts]
    all_t = sorted({t for g in grids for t in g[:spec.history_size + 1]} | {SIGMA_LO}, reverse=True)
    sol = model.ode_solution(z * SIGMA_HI, SIGMA_HI, all_t)
    exact = {t: sol[j] for j, t in enumerate(all_t)}
    errors = [((run_with_exact_start(model, spec, g, exact.__getitem__) - exact[SIGMA_LO]).norm()
               / exact[SIGMA_LO].norm()).item() for g in grids]
    return -np.polyfit(np.log(counts), np.log(errors), 1)[0], errors


@pytest.mark.parametrize('name,opts,schedule,order', ORDERS, ids=config_id)
def test_declared_convergence_order(gmm, name, opts, schedule, order):
    slope, errors = measured_order(gmm, name, opts, schedule)
    print(f'{name} {opts} {schedule}: errors {errors}, slope {slope:.3f}')
    assert abs(slope - order) < 0.3, (errors, slope)


def test_every_registered_solver_is_covered():
    assert {n for n, _ in CONFIGS} == set(solvers.REGISTRY)
    assert all(cls.orders or cls.needs_predictor for cls in solvers.REGISTRY.values()), \
        'declare the convergence order of a solver that runs without a predictor'
