"""Our solvers against an independent implementation (k-diffusion) on the same sigmas."""

import pytest
import torch

import solver_utils
import solvers
from models.toy import GaussianMixture
from tests.peers import k_diffusion_sampling


@pytest.fixture(scope='module')
def kd():
    return k_diffusion_sampling()


@pytest.fixture(scope='module')
def gmm():
    return GaussianMixture(seed=0)


def k_model(model):
    return lambda x, sigma, **kw: model(x, sigma)


@pytest.mark.parametrize('schedule', [('polynomial', 7.0), ('logsnr', 1.0), ('time_uniform', 1.0)])
@pytest.mark.parametrize('ours,theirs,opts', [
    ('euler', 'sample_euler', {}),
    ('heun', 'sample_heun', {}),
    ('dpmpp', 'sample_dpmpp_2m', dict(max_order=2, lower_order_final=False, thresholding=False)),
])
def test_agrees_with_k_diffusion(kd, gmm, schedule, ours, theirs, opts):
    t = solver_utils.get_schedule(8, 0.002, 80.0, *schedule)
    z = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x_ours = solvers.sample(gmm, z, solver=ours, t_steps=t, **opts)
    x_theirs = getattr(kd, theirs)(k_model(gmm), z * t[0].item(), t.to(torch.float32), disable=True)
    rel = ((x_ours - x_theirs).norm() / x_theirs.norm()).item()
    assert rel < 1e-5, rel
