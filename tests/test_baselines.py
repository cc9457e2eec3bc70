"""The training-free baselines (ipndm_v, deis, unipc), explicit schedules and denoise_to_zero: convergence
orders on the exact analytic model, diffusers' schedulers as test-only oracles, hand computations of the
coefficients, and the official NFE counts."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sample
import solver_utils
import solvers
from models.toy import GaussianMixture
from tests.test_registry import measured_order
from tests.test_solvers import CountingModel, latents


@pytest.fixture(scope='module')
def gmm():
    return GaussianMixture(seed=0)


# ----------------------------------------------------------------------------------------------
# Convergence orders against the reference ODE solution.
#
# (solver, options, schedule, rho, step counts, theoretical order). ``poly3`` is the polynomial
# schedule with rho = 3: smoothly non-uniform in sigma, where iPNDM's fixed coefficients fall to
# order 2 and the variable-step ones keep theirs. Theory:
# * ipndm_v: exact variable-step AB2 at order 2; the official order-3 weights integrate linear
#   functions exactly on any grid and are AB3's on a uniform one (order 3); the official order-4
#   weights are not consistent on a non-uniform grid (their sum is not 1), order 2 on a smooth one.
# * deis: polynomial interpolation of k directions, integrated exactly: order k in every mode.
# * unipc: UniC raises the order of UniP by one: max_order p gives order p + 1 (the last step has no
#   corrector, which is a local error of order p + 1 at one step only).
# The orders each solver declares in the registry (uniform grids, log-SNR UniPC 1-2, DEIS logrho) are
# tested by tests/test_registry.py; these are the cases beyond them.
NO_LOF = dict(lower_order_final=False, thresholding=False)
ORDER_CASES = [
    ('ipndm', dict(max_order=3), 'polynomial', 3.0, (64, 128, 256), 2),
    ('ipndm', dict(max_order=4), 'polynomial', 3.0, (64, 128, 256), 2),
    ('ipndm_v', dict(max_order=1), 'polynomial', 3.0, (64, 128, 256), 1),
    ('ipndm_v', dict(max_order=2), 'polynomial', 3.0, (64, 128, 256), 2),
    ('ipndm_v', dict(max_order=3), 'polynomial', 3.0, (64, 128, 256), 3),
    ('ipndm_v', dict(max_order=4), 'polynomial', 3.0, (64, 128, 256), 2),
    ('deis', dict(max_order=1), 'polynomial', 3.0, (64, 128, 256), 1),
    ('deis', dict(max_order=2), 'polynomial', 3.0, (64, 128, 256), 2),
    ('deis', dict(max_order=3), 'polynomial', 3.0, (64, 128, 256), 3),
    ('deis', dict(max_order=4), 'polynomial', 3.0, (64, 128, 256), 4),
    ('deis', dict(max_order=3, deis_mode='rhoab'), 'polynomial', 3.0, (64, 128, 256), 3),
    ('deis', dict(max_order=4, deis_mode='rhoab'), 'polynomial', 3.0, (64, 128, 256), 4),
    ('unipc', dict(max_order=2, variant='bh1', **NO_LOF), 'logsnr', 1.0, (64, 128, 256), 3),
    ('unipc', dict(max_order=3, **NO_LOF), 'logsnr', 1.0, (32, 64, 128), 4),
    ('unipc', dict(max_order=3, predict_x0=False, lower_order_final=False), 'logsnr', 1.0, (32, 64, 128), 4),
]


@pytest.mark.parametrize('name,opts,schedule,rho,counts,order', ORDER_CASES)
def test_convergence_order(gmm, name, opts, schedule, rho, counts, order):
    slope, errors = measured_order(gmm, name, opts, schedule, rho, counts)
    print(f'{name} {opts} {schedule} rho={rho}: errors {errors}, slope {slope:.3f}')
    assert abs(slope - order) < 0.35, (errors, slope)


# ----------------------------------------------------------------------------------------------
# Coefficients by hand.

def test_ipndm_v_equals_ab_on_uniform_grid_and_ab2_on_any():
    h = -0.3
    assert solver_utils.ipndm_v_coefficients([h, h], 2) == pytest.approx(solver_utils.AB_COEFFICIENTS[2])
    assert solver_utils.ipndm_v_coefficients([h, h, h], 3) == pytest.approx(solver_utils.AB_COEFFICIENTS[3])
    # the official order-4 weights on a uniform grid (not AB4's 55, -59, 37, -9)
    assert [24 * w for w in solver_utils.ipndm_v_coefficients([h] * 4, 4)] == pytest.approx([57, -65, 43, -11])
    # AB2 with steps h and h1: integral of the line through (t - h1, d1), (t, d0) over [t, t + h]
    h, h1 = -0.5, -0.2
    w = solver_utils.ipndm_v_coefficients([h, h1], 2)
    assert w == pytest.approx([1 + h / (2 * h1), -h / (2 * h1)])


def test_deis_rhoab_is_lagrange_integral_by_hand():
    """rhoab with nodes a, b integrates the line through them over [a, t]: weights
    ((t - b)^2 - (a - b)^2) / (2 (a - b)) and (t - a)^2 / (2 (b - a))."""
    a, b, t = 1.0, 1.5, 0.6
    w = solver_utils.deis_coefficients([a, b], t, 'rhoab')
    assert w == pytest.approx([((t - b) ** 2 - (a - b) ** 2) / (2 * (a - b)), (t - a) ** 2 / (2 * (b - a))], rel=1e-12)
    assert solver_utils.deis_coefficients([a], t, 'tab') == pytest.approx([t - a], rel=1e-12)


def test_deis_tab_by_trapezoid_in_vp_time():
    """tAB weights: integral over VP time tau of L_j(tau) dsigma/dtau, here by a fine trapezoid rule
    in tau (the official construction) against the Gauss rule in log sigma."""
    sig = [0.8, 1.3, 2.2]
    to = 0.45
    beta_d, beta_min = solver_utils.vp_constants(*solver_utils.DEIS_VP_RANGE)
    tau_of = lambda s: solver_utils.vp_time(torch.tensor(s, dtype=torch.float64))  # noqa: E731
    taus = torch.linspace(float(tau_of(sig[0])), float(tau_of(to)), 200001, dtype=torch.float64)
    sigma = torch.sqrt(torch.expm1(beta_d * taus ** 2 / 2 + beta_min * taus))
    nodes = [float(tau_of(s)) for s in sig]
    unit = np.eye(len(nodes))
    basis = [torch.from_numpy(np.polyval(np.polyfit(nodes, unit[j], len(nodes) - 1), taus.numpy())) for j in range(3)]
    expected = [float(torch.trapezoid(b, sigma)) for b in basis]
    assert solver_utils.deis_coefficients(sig, to, 'tab') == pytest.approx(expected, rel=1e-8)


# ----------------------------------------------------------------------------------------------
# diffusers' schedulers as oracles on a VP model.

class VPEpsilon:
    """The analytic model as a discrete-time VP epsilon-prediction network for diffusers."""

    def __init__(self, model, alphas_cumprod):
        self.model, self.acp = model, alphas_cumprod.double()

    def __call__(self, x_vp, t):
        acp = self.acp[int(t)]
        sigma = float(((1 - acp) / acp).sqrt())
        x = x_vp.double() / float(acp.sqrt())
        d = (x - self.model(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))) / sigma
        return d.to(x_vp.dtype)


def diffusers_run(scheduler, model, steps, noise):
    scheduler.set_timesteps(steps)
    net = VPEpsilon(model, scheduler.alphas_cumprod)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    sigmas = scheduler.sigmas.double()
    return x.double() * float(torch.sqrt(1 + sigmas[-1] ** 2)), sigmas    # back to the VE form


def ours(model, spec, sigmas, noise):
    x = noise.double() * float(torch.sqrt(1 + sigmas[0] ** 2))   # the VP start x_T = noise in VE form
    for state, _ in solvers.iterate(model, spec, x, sigmas.tolist()):
        x = state.x
    return x


@pytest.mark.parametrize('order,variant,predict_x0', [(3, 'bh2', True), (2, 'bh1', True), (3, 'bh1', False),
                                                      (1, 'bh2', True)])
def test_unipc_equals_diffusers(gmm, order, variant, predict_x0):
    diffusers = pytest.importorskip('diffusers')
    sched = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant, predict_x0=predict_x0,
                                              lower_order_final=True, final_sigmas_type='sigma_min')
    noise = latents(2, seed=5, dtype=torch.float32)
    expected, sigmas = diffusers_run(sched, gmm, 8, noise)
    spec = solvers.make_solver('unipc', max_order=order, variant=variant, predict_x0=predict_x0, thresholding=False)
    got = ours(gmm, spec, sigmas, noise)
    assert ((got - expected).norm() / expected.norm()).item() < 2e-5


@pytest.mark.parametrize('order', [1, 2, 3])
def test_deis_logrho_equals_diffusers(gmm, order):
    diffusers = pytest.importorskip('diffusers')
    sched = diffusers.DEISMultistepScheduler(solver_order=order, lower_order_final=False)
    noise = latents(2, seed=6, dtype=torch.float32)
    expected, sigmas = diffusers_run(sched, gmm, 8, noise)
    spec = solvers.make_solver('deis', max_order=order, deis_mode='logrho')
    got = ours(gmm, spec, sigmas, noise)
    assert ((got - expected).norm() / expected.norm()).item() < 2e-5


# ----------------------------------------------------------------------------------------------
# NFE: the model calls made, count_nfe, and the official count.

def official_nfe(name, num_steps, afs, denoise_to_zero, max_order):
    """The official samplers' model calls, written out: one per step for the single-stage solvers
    (AFS saves the first); UniPC calls the model at the first point (AFS: not) and after each step
    that corrects: every step but the last, and the last too while it is still a warm-up step
    (num_steps - 1 < max_order)."""
    if name == 'unipc':
        nfe = (0 if afs else 1) + (num_steps - 2) + int(num_steps - 1 < max_order)
    else:
        nfe = num_steps - 1 - int(afs)
    return nfe + int(denoise_to_zero)


@pytest.mark.parametrize('name,max_order', [('ipndm_v', 4), ('ipndm_v', 2), ('deis', 3), ('deis', 4),
                                            ('unipc', 3), ('unipc', 2), ('unipc', 1)])
@pytest.mark.parametrize('num_steps', [2, 3, 4, 6])
@pytest.mark.parametrize('afs', [False, True])
@pytest.mark.parametrize('denoise_to_zero', [False, True])
def test_model_calls_equal_official_count(gmm, name, max_order, num_steps, afs, denoise_to_zero):
    model = CountingModel(gmm)
    spec = solvers.make_solver(name, max_order=max_order)
    t_steps = solver_utils.get_schedule(num_steps, 0.002, 80.0, 'logsnr')
    solvers.sample(model, latents(2, dtype=torch.float32), solver=spec, t_steps=t_steps, afs=afs,
                   denoise_to_zero=denoise_to_zero)
    assert model.calls == solvers.count_nfe(spec, num_steps, afs, denoise_to_zero=denoise_to_zero) \
        == official_nfe(name, num_steps, afs, denoise_to_zero, max_order)


def test_unipc_trajectory_holds_corrected_points(gmm):
    """The states a run yields are the corrected points (the official trajectory), and the model
    output carried to the next step is the one at the predicted point."""
    spec = solvers.make_solver('unipc', max_order=2, thresholding=False)
    t = solver_utils.get_schedule(5, 0.002, 80.0, 'logsnr').tolist()
    z = latents(1, seed=2)
    states = [s for s, _ in solvers.iterate(gmm, spec, z * t[0], t)]
    x0, x1 = z * t[0], states[0].x
    tc = lambda v: torch.full((1, 1, 1, 1), v, dtype=torch.float64)  # noqa: E731
    m0 = gmm(x0, torch.tensor([t[0]], dtype=torch.float64))
    pred = solver_utils.unipc_predict(x0, tc(t[1]), [m0], [tc(t[0])], 1)
    m1 = gmm(pred, torch.tensor([t[1]], dtype=torch.float64))
    corrected = solver_utils.unipc_correct(x0, tc(t[1]), [m0], [tc(t[0])], 1, m1)
    assert torch.allclose(x1, corrected, rtol=0, atol=1e-12)
    assert torch.equal(states[0].current[1], m1)


# ----------------------------------------------------------------------------------------------
# Command line: the new solvers, --t_steps and --denoise_to_zero.

@pytest.mark.parametrize('name', ['unipc', 'deis', 'ipndm_v'])
def test_sample_py_logsnr_afs(tmp_path, name):
    out = tmp_path / name
    res = CliRunner().invoke(sample.main, ['--dataset_name=toy', f'--solver={name}', '--num_steps=6',
                                           '--schedule_type=logsnr', '--afs=True', '--seeds=0-3', f'--outdir={out}',
                                           '--no-progress'])
    assert res.exit_code == 0, res.output
    assert f'with {name} (4 NFE' in res.output
    assert len(list(out.glob('*/*.png'))) == 4


def test_t_steps_file_and_list_and_denoise_to_zero(tmp_path, gmm):
    levels = [80.0, 10.0, 2.0, 0.5, 0.1, 0.002]
    path = tmp_path / 'sched.json'
    path.write_text(json.dumps(levels))
    outs = []
    for arg in (f'--t_steps={path}', '--t_steps=' + ','.join(map(str, levels))):
        out = tmp_path / f'o{len(outs)}'
        res = CliRunner().invoke(sample.main, ['--dataset_name=toy', '--solver=deis', arg, '--denoise_to_zero=True',
                                               '--seeds=0-1', f'--outdir={out}', '--no-progress', '--return_inters=True'])
        assert res.exit_code == 0, res.output
        assert '(6 NFE, 6 time points, explicit schedule)' in res.output
        outs.append(np.load(next(out.glob('*/000001.npz'))))
    assert np.array_equal(outs[0]['trajectory'], outs[1]['trajectory'])
    assert outs[0]['sigmas'].tolist() == levels + [0.0]
    res = CliRunner().invoke(sample.main, ['--dataset_name=toy', f'--t_steps={path}', '--num_steps=4',
                                           f'--outdir={tmp_path}/x'])
    assert res.exit_code != 0 and 'drop --num_steps' in res.output
    res = CliRunner().invoke(sample.main, ['--dataset_name=toy', '--t_steps=1,2,3', f'--outdir={tmp_path}/x'])
    assert res.exit_code != 0 and 'descending' in res.output
    assert not (tmp_path / 'x').exists()


def test_new_solvers_as_teachers(gmm):
    """Each new solver makes training targets (AMEDLoss teacher trajectories) close to the reference."""
    from training.loss import AMEDLoss
    z = latents(2, seed=4)
    exact = gmm.ode_solution(z * 80.0, 80.0, [0.002])[-1]
    for name in ('unipc', 'deis', 'ipndm_v'):
        loss = AMEDLoss(gmm, 'ipndm', name, num_steps=5, M=19, schedule_type='logsnr',
                        **(dict(thresholding=False) if name == 'unipc' else {}))
        targets = loss.teacher_targets(z)
        assert len(targets) == 5
        assert ((targets[-1] - exact).norm() / exact.norm()).item() < 2e-3, name
