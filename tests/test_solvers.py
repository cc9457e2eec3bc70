"""Solvers and the AMED plugin against ground truth on the exact analytic model."""

import math

import pytest
import torch

import solver_utils
import solvers
from models.toy import STEPS_PER_UNIT, GaussianMixture, IsotropicGaussian
from solvers import FixedPredictor


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
# Convergence orders, NFE counts and batch invariance of every solver: tests/test_registry.py.

def test_reference_ode_solution_is_accurate(gmm):
    """The reference solution from sigma_max to sigma_min agrees with itself at twice the steps."""
    z = latents(2, seed=3)
    a = gmm.ode_solution(z * 80.0, 80.0, [0.002])[-1]
    b = gmm.ode_solution(z * 80.0, 80.0, [0.002], steps_per_unit=2 * STEPS_PER_UNIT)[-1]
    assert ((a - b).norm() / b.norm()).item() < 1e-7


def test_teacher_calls_and_denoise_to_zero(gmm):
    model = CountingModel(gmm)
    solvers.sample(model, latents(2, dtype=torch.float32), solver='heun', num_steps=6, denoise_to_zero=True)
    assert model.calls == solvers.count_nfe('heun', 6, denoise_to_zero=True) == 11


# ----------------------------------------------------------------------------------------------
# Batch invariance, dtypes, devices.

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


def test_conditional_model_follows_its_labels(gmm):
    """On the class-conditional mixture a sample follows its own label's ODE: with the AMED plugin
    (its feature read through the hook) it lands near the exact solution for that label and far
    from the solution for another label from the same noise; relabelling moves it there."""
    cond_model = GaussianMixture(seed=0, conditional=True)
    z = latents(2, dtype=torch.float64)
    labels, others = torch.tensor([1, 7]), torch.tensor([4, 2])
    kw = dict(solver='ipndm', num_steps=7, afs=True, predictor=ConstantPredictor())

    def exact(cond):
        return cond_model.ode_solution_from_noise(z, cond_model.sigma_max, [cond_model.sigma_min], cond=cond)[-1]

    def rms(a, b):
        return (a - b).flatten(1).square().mean(1).sqrt()

    x, y = solvers.sample(cond_model, z, labels, **kw), solvers.sample(cond_model, z, others, **kw)
    own, other = exact(labels), exact(others)
    assert (rms(x, own) < 0.2 * rms(own, other)).all(), (rms(x, own), rms(own, other))
    assert (rms(y, other) < 0.2 * rms(own, other)).all()


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
