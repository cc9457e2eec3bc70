"""Solvers and the AMED plugin against ground truth on the exact analytic model."""

import math

import numpy as np
import pytest
import torch

import solver_utils
import solvers
from models.toy import STEPS_PER_UNIT, GaussianMixture, IsotropicGaussian
from solvers import FixedPredictor, SolverState

STUDENT_CONFIGS = [
    ('amed', {}), ('euler', {}), ('dpm', {}),
    ('ipndm', dict(max_order=1)), ('ipndm', dict(max_order=2)), ('ipndm', dict(max_order=3)), ('ipndm', dict(max_order=4)),
    ('dpmpp', dict(max_order=1)), ('dpmpp', dict(max_order=2)), ('dpmpp', dict(max_order=3)),
    ('dpmpp', dict(max_order=3, predict_x0=False)), ('dpmpp', dict(max_order=3, lower_order_final=False)),
]


@pytest.fixture(scope='module')
def gmm():
    return GaussianMixture(seed=0)


class CountingModel(torch.nn.Module):
    """Wraps a denoiser and counts its calls (forwarding the interface attributes)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.sigma_min, self.sigma_max, self.feature_shape = inner.sigma_min, inner.sigma_max, inner.feature_shape

    def capture_feature(self):
        return self.inner.capture_feature()

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        return self.inner(x, sigma, cond)


class ConstantPredictor(torch.nn.Module):
    """A predictor that reads the feature (through the real hook) and returns per-sample values
    depending on it, so that batch mixing would show."""

    needs_feature = True

    def forward(self, feature, t_cur, t_next):
        assert feature.shape[1:] == (8, 8)
        z = feature.flatten(1).mean(1)
        r = torch.sigmoid(z * 3)
        return r, 1 + 0.01 * torch.tanh(z), 1 - 0.05 * torch.tanh(z)


def latents(b=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Convergence orders against the reference ODE solution.

# (solver, options, schedule, theoretical order). iPNDM's fixed coefficients are Adams-Bashforth
# only on a grid uniform in sigma (polynomial rho=1); DPM-Solver++ handles any grid (logsnr).
# The official 3rd-order multistep update (as DPM-Solver's and k-diffusion's) is only 2nd-order
# accurate; ``corrected_3m`` restores order 3 (see solver_utils.dpm_multistep_update).
NO_LOF = dict(lower_order_final=False)
ORDER_CASES = [
    ('euler', {}, 'polynomial', 1),
    ('heun', {}, 'polynomial', 2),
    ('dpm', {}, 'polynomial', 2),
    ('ipndm', dict(max_order=1), 'polynomial', 1),
    ('ipndm', dict(max_order=2), 'polynomial', 2),
    ('ipndm', dict(max_order=3), 'polynomial', 3),
    ('ipndm', dict(max_order=4), 'polynomial', 4),
    ('dpmpp', dict(max_order=1, thresholding=False), 'logsnr', 1),
    ('dpmpp', dict(max_order=2, thresholding=False, **NO_LOF), 'logsnr', 2),
    ('dpmpp', dict(max_order=3, thresholding=False, **NO_LOF), 'logsnr', 2),   # official 3M
    ('dpmpp', dict(max_order=3, thresholding=False, corrected_3m=True, **NO_LOF), 'logsnr', 3),
    ('dpmpp', dict(max_order=2, predict_x0=False, **NO_LOF), 'logsnr', 2),
    ('dpmpp', dict(max_order=3, predict_x0=False, **NO_LOF), 'logsnr', 2),    # official 3M
    ('dpmpp', dict(max_order=3, predict_x0=False, corrected_3m=True, **NO_LOF), 'logsnr', 3),
]
SIGMA_HI, SIGMA_LO = 2.0, 0.2


def run_with_exact_start(model, spec, z, t_list, exact_at):
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


@pytest.mark.parametrize('name,opts,schedule,order', ORDER_CASES)
def test_convergence_order(gmm, name, opts, schedule, order):
    z = latents(3, seed=1)
    x_hi = z * SIGMA_HI
    spec = solvers.make_solver(name, **opts)
    counts = [64, 128, 256]
    grids = [solver_utils.get_schedule(n + 1, SIGMA_LO, SIGMA_HI, schedule, 1.0).tolist() for n in counts]
    all_t = sorted({t for g in grids for t in g[:spec.history_size + 1]} | {SIGMA_LO}, reverse=True)
    sol = gmm.ode_solution(x_hi, SIGMA_HI, all_t)
    exact = {t: sol[j] for j, t in enumerate(all_t)}
    errors = []
    for g in grids:
        x = run_with_exact_start(gmm, spec, z, g, exact.__getitem__)
        errors.append(((x - exact[SIGMA_LO]).norm() / exact[SIGMA_LO].norm()).item())
    slope = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
    print(f'{name} {opts} {schedule}: errors {errors}, slope {slope:.3f}')
    assert abs(slope - order) < 0.3, (errors, slope)


def test_reference_ode_solution_is_accurate(gmm):
    """The reference solution from sigma_max to sigma_min agrees with itself at twice the steps."""
    z = latents(2, seed=3)
    a = gmm.ode_solution(z * 80.0, 80.0, [0.002])[-1]
    b = gmm.ode_solution(z * 80.0, 80.0, [0.002], steps_per_unit=2 * STEPS_PER_UNIT)[-1]
    assert ((a - b).norm() / b.norm()).item() < 1e-7


# ----------------------------------------------------------------------------------------------
# NFE accounting.

@pytest.mark.parametrize('name,opts', STUDENT_CONFIGS)
@pytest.mark.parametrize('with_predictor', [False, True])
@pytest.mark.parametrize('afs', [False, True])
def test_model_calls_match_nfe_formula(gmm, name, opts, with_predictor, afs):
    if name == 'amed' and not with_predictor:
        pytest.skip('amed needs a predictor')
    model = CountingModel(gmm)
    pred = ConstantPredictor() if with_predictor else None
    num_steps = 5
    solvers.sample(model, latents(2, dtype=torch.float32), solver=name, num_steps=num_steps, afs=afs,
                   predictor=pred, **opts)
    assert model.calls == solvers.count_nfe(name, num_steps, afs, with_predictor)
    if with_predictor:
        assert model.calls == 2 * (num_steps - 1) - int(afs)   # as the official code counts


def test_teacher_calls_and_denoise_to_zero(gmm):
    model = CountingModel(gmm)
    solvers.sample(model, latents(2, dtype=torch.float32), solver='heun', num_steps=6, denoise_to_zero=True)
    assert model.calls == solvers.count_nfe('heun', 6, denoise_to_zero=True) == 11


# ----------------------------------------------------------------------------------------------
# Batch invariance, dtypes, devices.

@pytest.mark.parametrize('name,opts', STUDENT_CONFIGS)
def test_image_independent_of_batch(gmm, name, opts):
    z = latents(7, seed=5, dtype=torch.float32)
    kw = dict(solver=name, num_steps=5, afs=True, predictor=ConstantPredictor(), **opts)
    full = solvers.sample(gmm, z, **kw)
    for b in (1, 2, 3):   # the official code mispredicts batches of 2 and 3
        part = solvers.sample(gmm, z[:b], **kw)
        assert (part - full[:b]).abs().max().item() <= 1e-6
    perm = torch.tensor([4, 0, 6, 2])
    mixed = solvers.sample(gmm, z[perm], **kw)
    assert (mixed - full[perm]).abs().max().item() <= 1e-6


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('name,opts', [('amed', {}), ('ipndm', dict(max_order=4)), ('dpmpp', dict(max_order=3))])
def test_dtypes(gmm, dtype, name, opts):
    x = solvers.sample(gmm, latents(2, dtype=dtype), solver=name, num_steps=4, afs=True,
                       predictor=ConstantPredictor(), **opts)
    assert x.dtype == dtype and torch.isfinite(x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_matches_cpu(gmm):
    z = latents(2, dtype=torch.float64)
    kw = dict(solver='dpmpp', num_steps=5, afs=True, predictor=ConstantPredictor())
    cpu = solvers.sample(gmm, z, **kw)
    gpu = solvers.sample(GaussianMixture(seed=0).cuda(), z.cuda(), **kw)
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-8


def test_return_inters(gmm):
    z = latents(2, dtype=torch.float32)
    traj = solvers.sample(gmm, z, solver='ipndm', num_steps=5, return_inters=True)
    assert traj.shape == (5, 2, 3, 32, 32)
    assert torch.equal(traj[0], z * 80.0)
    assert torch.equal(traj[-1], solvers.sample(gmm, z, solver='ipndm', num_steps=5))


def test_conditional_model(gmm):
    cond_model = GaussianMixture(seed=0, conditional=True)
    z = latents(2, dtype=torch.float32)
    labels = torch.tensor([1, 7])
    x = solvers.sample(cond_model, z, labels, solver='ipndm', num_steps=5, afs=True, predictor=ConstantPredictor())
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------
# Reductions.

def test_heun_equals_dpm_solver_2_with_r_one(gmm):
    z = latents(3, dtype=torch.float64)
    heun = solvers.sample(gmm, z, solver='heun', num_steps=6)
    dpm = solvers.sample(gmm, z, solver='dpm', num_steps=6, predictor=FixedPredictor(r=1.0))
    assert (heun - dpm).abs().max().item() < 1e-12


def test_plugin_r_half_on_dpm_equals_plain_dpm_solver_2(gmm):
    z = latents(3, dtype=torch.float64)
    plain = solvers.sample(gmm, z, solver='dpm', num_steps=6, afs=True)
    plugin = solvers.sample(gmm, z, solver='dpm', num_steps=6, afs=True, predictor=FixedPredictor(0.5))
    assert (plain - plugin).abs().max().item() < 1e-12


@pytest.mark.parametrize('name,opts', [('euler', {}), ('ipndm', dict(max_order=3)), ('dpmpp', dict(max_order=3))])
def test_plugin_r_half_equals_plain_solver_on_refined_grid(gmm, name, opts):
    z = latents(3, dtype=torch.float64)
    t = solver_utils.get_schedule(5, 0.002, 80.0, 'polynomial', 7.0)
    refined = [t[0].item()]
    for a, b in zip(t[:-1].tolist(), t[1:].tolist()):
        refined += [math.sqrt(a * b), b]
    plugin = solvers.sample(gmm, z, solver=name, t_steps=t, predictor=FixedPredictor(0.5), **opts)
    plain = solvers.sample(gmm, z, solver=name, t_steps=refined, **opts)
    # (dpmpp's lower_order_final counts the points of the refined grid, 2N-1, in both runs)
    assert (plain - plugin).abs().max().item() < 1e-10


def test_scales_act_as_documented():
    """scale_time a moves the query time to a*s; scale_dir c scales the final model terms."""
    model = IsotropicGaussian(mean=0.1, std=0.5)
    z = latents(2, dtype=torch.float64)
    t = [4.0, 1.0]
    r, c, a = 0.3, 1.02, 0.9
    x0 = z * 4.0
    out = solvers.sample(model, z, solver='amed', t_steps=t, predictor=FixedPredictor(r, c, a))
    s = 1.0 ** r * 4.0 ** (1 - r)
    d0 = (x0 - model(x0, torch.full((2,), 4.0, dtype=torch.float64))) / 4.0
    y = x0 + (s - 4.0) * d0
    ds = (y - model(y, torch.full((2,), a * s, dtype=torch.float64))) / s
    assert torch.allclose(out, x0 + c * (1.0 - 4.0) * ds, rtol=0, atol=1e-12)


def test_thresholding_switch(gmm):
    z = latents(2, dtype=torch.float64)
    on = solvers.sample(gmm, z, solver='dpmpp', num_steps=5)
    off = solvers.sample(gmm, z, solver='dpmpp', num_steps=5, thresholding=False)
    explicit = solvers.sample(gmm, z, solver='dpmpp', num_steps=5, thresholding=True)
    assert torch.equal(on, explicit) and not torch.equal(on, off)


def test_dynamic_threshold_formula():
    x = torch.linspace(-3, 3, 1000, dtype=torch.float64).reshape(2, 500)[:, torch.randperm(500)]
    out = solver_utils.dynamic_threshold(x.reshape(2, 1, 5, 100))
    for row, o in zip(x, out):
        s = max(torch.quantile(row.abs(), 0.995).item(), 1.0)
        assert torch.allclose(o.flatten(), row.clamp(-s, s) / s)
    small = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    assert torch.equal(solver_utils.dynamic_threshold(small), small)


# ----------------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize('kwargs,word', [
    (dict(solver='rk45'), 'solver'),
    (dict(solver='euler', schedule_type='karras'), 'schedule_type'),
    (dict(solver='ipndm', max_order=5), 'max_order'),
    (dict(solver='ipndm', max_order=0), 'max_order'),
    (dict(solver='dpmpp', max_order=4), 'max_order'),
    (dict(solver='euler', max_order=2), 'max_order'),
    (dict(solver='euler', predict_x0=False), 'predict_x0'),
    (dict(solver='euler', num_steps=1), 'num_steps'),
    (dict(solver='euler', sigma_min=5.0, sigma_max=1.0), 'sigma_min'),
    (dict(solver='heun', predictor=FixedPredictor()), 'predictor'),
    (dict(solver='amed'), 'predictor'),
])
def test_bad_input_names_the_option(gmm, kwargs, word):
    with pytest.raises(ValueError, match=word):
        solvers.sample(gmm, latents(1, dtype=torch.float32), **kwargs)


def test_feature_hook_removed_also_on_error(gmm):
    class Failing(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.sigma_min, self.sigma_max, self.feature_shape = inner.sigma_min, inner.sigma_max, inner.feature_shape

        def capture_feature(self):
            return self.inner.capture_feature()

        def forward(self, x, sigma, cond=None):
            self.inner(x, sigma, cond)
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        solvers.sample(Failing(gmm), latents(1, dtype=torch.float32), solver='amed', num_steps=3,
                       predictor=ConstantPredictor())
    assert len(gmm.feature_module._forward_hooks) == 0


def test_afs_step_feeds_zero_feature(gmm):
    seen = []

    class Recorder(ConstantPredictor):
        def forward(self, feature, t_cur, t_next):
            seen.append(feature.clone())
            return super().forward(feature, t_cur, t_next)

    solvers.sample(gmm, latents(2, dtype=torch.float32), solver='amed', num_steps=4, afs=True, predictor=Recorder())
    assert len(seen) == 3 and torch.equal(seen[0], torch.zeros(2, 8, 8))
    assert not torch.equal(seen[1], torch.zeros(2, 8, 8))
