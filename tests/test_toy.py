"""Tests of the exact analytic models (models/toy.py): the built-in natural-spectrum Gaussian mixture
and the isotropic Gaussian, against dense linear algebra and closed forms."""

import math

import pytest
import torch

from models.toy import STEPS_PER_UNIT, GaussianMixture, IsotropicGaussian, build


@pytest.fixture(autouse=True)
def single_thread():
    """Run these tests on one thread. The ODE tests make thousands of denoiser calls on tiny batches;
    with several threads each small FFT or matmul pays for thread hand-offs, which become stalls of
    milliseconds when another process shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def edm_sigmas(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's polynomial schedule, descending, without the final 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def noisy_samples(model, sigmas, seed=0, labels=None):
    """x = x0 + sigma n with exact x0, one sigma per sample (float64)."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    x0 = model.sample(len(sigmas), g, labels=labels)
    return x0 + sigmas[:, None, None, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64), sigmas


# -- dense reference ---------------------------------------------------------------------------

def dense_dft(n):
    j = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * j[:, None] * j[None, :] / n) / math.sqrt(n)


def dense_covariances(model):
    """C_k = blockdiag_c(F^H diag(P_k,c) F) as dense real matrices (K, d, d), d = C*H*W (row-major)."""
    K, C, H, W = model.mu.shape
    F2 = torch.kron(dense_dft(H), dense_dft(W))  # the 2-D unitary DFT on row-major pixels
    covs = []
    for k in range(K):
        blocks = [F2.conj().T @ torch.diag(model.P[k, c].reshape(-1).to(torch.complex128)) @ F2 for c in range(C)]
        cov = torch.block_diag(*blocks)
        assert cov.imag.abs().max() < 1e-12
        covs.append(cov.real)
    return torch.stack(covs)


def dense_denoiser(model, x, sigma, labels=None):
    """Brute-force E[x0 | x] with dense Gaussians: posterior means and exact log-densities."""
    K = model.mu.shape[0]
    mu, covs = model.mu.reshape(K, -1), dense_covariances(model)
    eye = torch.eye(mu.shape[1], dtype=torch.float64)
    out = []
    for b in range(x.shape[0]):
        xb, s2 = x[b].reshape(-1), float(sigma[b]) ** 2
        means, log_p = [], []
        for k in range(K):
            cov_noisy = covs[k] + s2 * eye
            means.append(mu[k] + covs[k] @ torch.linalg.solve(cov_noisy, xb - mu[k]))
            log_p.append(torch.distributions.MultivariateNormal(mu[k], covariance_matrix=cov_noisy).log_prob(xb))
        if labels is None:
            w = torch.softmax(torch.stack(log_p) + math.log(1 / K), dim=0)
        else:
            w = torch.nn.functional.one_hot(torch.as_tensor(labels[b]), K).to(torch.float64)
        out.append(w @ torch.stack(means))
    return torch.stack(out).reshape(x.shape)


# -- construction --------------------------------------------------------------------------------

def test_deterministic_from_seed():
    a, b, c = GaussianMixture(seed=0), GaussianMixture(seed=0), GaussianMixture(seed=1)
    assert torch.equal(a.mu, b.mu) and torch.equal(a.P, b.P)
    assert not torch.equal(a.mu, c.mu) and not torch.equal(a.P, c.P)
    assert a.mu.shape == (10, 3, 32, 32) and a.mu.dtype == torch.float64
    assert a.mu.abs().max() <= 0.5 + 1e-12  # smooth means at scale 0.5
    per_pixel_var = a.P.mean(dim=(2, 3))  # (K, C)
    assert 0.06 - 1e-9 <= per_pixel_var.min() and per_pixel_var.max() <= 0.14 + 1e-9
    assert 0.09 < per_pixel_var.mean() < 0.11
    assert torch.equal(a.P, a.P.flip(-1, -2).roll((1, 1), dims=(-2, -1)))  # P(-f) = P(f)


def test_build_and_attributes():
    model, cond_model = build('toy'), build('toy_cond')
    assert model.label_dim == 0 and cond_model.label_dim == 10
    assert model.img_shape == (3, 32, 32) and model.sigma_min == 0.002 and model.sigma_max == 80
    assert isinstance(model.feature_module, torch.nn.Identity)
    assert 'feature_module' in dict(model.named_children())
    with pytest.raises(ValueError, match='unknown'):
        build('cifar10')


def test_buffers_stay_float64():
    model = GaussianMixture(resolution=8).float()
    assert model.mu.dtype == torch.float64 and model.P.dtype == torch.float64
    x, sigma = noisy_samples(model, [0.5, 2.0])
    assert model(x.float(), sigma.float()).dtype == torch.float32
    assert model(x, sigma).dtype == torch.float64


# -- the exact denoiser --------------------------------------------------------------------------

@pytest.mark.parametrize('resolution,channels', [(4, 3), (5, 1)])
def test_denoiser_matches_dense_computation(resolution, channels):
    model = GaussianMixture(num_components=4, seed=3, resolution=resolution, channels=channels)
    x, sigma = noisy_samples(model, [0.002, 0.1, 0.5, 1.0, 3.0, 80.0, 1.0])
    expected = dense_denoiser(model, x, sigma)
    torch.testing.assert_close(model(x, sigma), expected, atol=1e-10, rtol=0)
    # the per-sample path taken when sigma requires grad agrees too
    torch.testing.assert_close(model(x, sigma.clone().requires_grad_()).detach(), expected, atol=1e-10, rtol=0)
    # and a single shared sigma
    shared = dense_denoiser(model, x, torch.full((7,), 0.7, dtype=torch.float64))
    torch.testing.assert_close(model(x, 0.7), shared, atol=1e-10, rtol=0)


def test_conditional_matches_dense_computation():
    model = GaussianMixture(num_components=4, seed=5, resolution=4, conditional=True)
    labels = torch.tensor([0, 3, 1, 2, 3])
    x, sigma = noisy_samples(model, [0.01, 0.3, 1.0, 5.0, 80.0], labels=labels)
    torch.testing.assert_close(model(x, sigma, labels), dense_denoiser(model, x, sigma, labels), atol=1e-10, rtol=0)


def test_denoiser_limits():
    model = build('toy')
    g = torch.Generator().manual_seed(1)
    x0 = model.sample(4, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # sigma -> infinity: the posterior is the prior, D -> the mixture mean
    big = 1e6
    torch.testing.assert_close(model(x0 + big * noise, big), model.mu.mean(0).expand_as(x0), atol=1e-4, rtol=0)
    # sigma -> 0: D(x0 + sigma n) -> x0
    tiny = 1e-5
    assert (model(x0 + tiny * noise, tiny) - x0).abs().max() < 10 * tiny
    assert (model(x0, 0.0) - x0).abs().max() < 1e-12  # sigma = 0: D(x) = x


def test_samples_and_tweedie():
    model = build('toy')
    g = torch.Generator().manual_seed(2)
    n = 2000
    x0 = model.sample(n, g)
    assert x0.shape == (n, 3, 32, 32) and x0.dtype == torch.float64
    prior_mean = model.mu.mean(0)
    # the mean of exact samples is the mean of the mu_k (standard error ~0.01 per pixel)
    assert (x0.mean(0) - prior_mean).abs().max() < 0.06
    # Tweedie: E[D(x0 + sigma n; sigma)] = E[x0]
    for sigma in (0.5, 5.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        assert (model(x, sigma).mean(0) - prior_mean).abs().max() < 0.06
    # per-component covariance: pixel variance of component-0 samples is mean_f P_0(f)
    x0_k = model.sample(400, g, labels=torch.zeros(400, dtype=torch.long))
    torch.testing.assert_close(x0_k.var(0).mean((1, 2)), model.P[0].mean((1, 2)), rtol=0.05, atol=0)


def test_batch_invariance_float32():
    model = build('toy')
    x, _ = noisy_samples(model, [1.0] * 7, seed=4)
    x = x.float()
    for sigma in (0.05, 1.0, 20.0):
        full = model(x, torch.full((7,), sigma))
        for i in range(7):
            assert (model(x[i:i + 1], torch.tensor([sigma])) - full[i:i + 1]).abs().max() <= 1e-6


def test_per_sample_sigma():
    model = build('toy')
    x, sigma = noisy_samples(model, [0.01, 0.3, 2.0, 2.0, 15.0, 80.0, 0.3], seed=5)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        xs, ss = x.to(dtype), sigma.to(dtype)
        full = model(xs, ss)
        separate = torch.cat([model(xs[i:i + 1], ss[i]) for i in range(len(ss))])
        assert (full - separate).abs().max() <= tol
    # float32 agrees with float64 to float32 accuracy
    assert (model(x.float(), sigma.float()).double() - model(x, sigma)).abs().max() < 2e-6
    with pytest.raises(ValueError, match='sigma'):
        model(x, torch.ones(3))


def test_gradients():
    model = GaussianMixture(num_components=3, seed=1, resolution=4, channels=1)
    x, sigma = noisy_samples(model, [0.3, 1.0, 2.0])
    x.requires_grad_()
    torch.autograd.gradcheck(lambda x: model(x, sigma), (x,))  # grouped path (sigma without grad)
    sigma.requires_grad_()
    torch.autograd.gradcheck(lambda x, sigma: model(x, sigma), (x, sigma))
    model32 = build('toy')
    x32 = torch.randn(2, 3, 32, 32, requires_grad=True)
    s32 = torch.tensor([0.5, 3.0], requires_grad=True)
    model32(x32, s32).square().sum().backward()
    assert torch.isfinite(x32.grad).all() and torch.isfinite(s32.grad).all()


def test_feature_capture():
    model = build('toy')
    x, sigma = noisy_samples(model, [0.5, 1.0, 4.0], seed=6)
    x = x.float()
    with model.capture_feature() as holder:
        denoised = model(x, sigma.float())
    assert holder['feature'].shape == (3, 8, 8)
    expected = torch.nn.functional.avg_pool2d(denoised, 4).mean(dim=1)
    torch.testing.assert_close(holder['feature'], expected)
    assert not model.feature_module._forward_hooks  # the hook is removed


# -- conditioning --------------------------------------------------------------------------------

def test_conditional_labels_and_errors():
    model = build('toy_cond')
    labels = torch.tensor([0, 9, 4])
    x, sigma = noisy_samples(model, [0.2, 1.0, 10.0], labels=labels)
    by_int = model(x, sigma, labels)
    by_one_hot = model(x, sigma, torch.nn.functional.one_hot(labels, 10).float())
    assert torch.equal(by_int, by_one_hot)
    with pytest.raises(ValueError, match='needs cond'):
        model(x, sigma)
    with pytest.raises(ValueError, match='one-hot'):
        model(x, sigma, torch.full((3, 10), 0.1))
    with pytest.raises(ValueError, match='labels'):
        model(x, sigma, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError):
        model(x, sigma, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='cond=None'):
        build('toy')(x, sigma, labels)

    class Rnd:  # the interface of EDM's StackedRandomGenerator.randint
        def __init__(self):
            self.generator = torch.Generator().manual_seed(0)

        def randint(self, high, size, device):
            return torch.randint(high, size, generator=self.generator, device=device)

    drawn = model.sample_cond(Rnd(), 5)
    assert drawn.shape == (5,) and drawn.dtype == torch.long and 0 <= drawn.min() and drawn.max() < 10
    assert build('toy').sample_cond(Rnd(), 5) is None


# -- the reference ODE solution ------------------------------------------------------------------

def test_ode_solution_isotropic_closed_form():
    model = IsotropicGaussian(mean=0.3, std=0.5, resolution=8)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    sigmas = torch.cat([edm_sigmas(), torch.zeros(1)])
    solution = model.ode_solution_from_noise(latents, 80.0, sigmas)
    assert solution.shape == (19, 4, 3, 8, 8) and solution.dtype == torch.float64
    for i, sigma in enumerate(sigmas.tolist()):
        exact = model.exact_solution(latents * 80.0, 80.0, sigma)
        assert ((solution[i] - exact).norm() / exact.norm()).item() < 1e-8
    torch.testing.assert_close(solution[0], latents * 80.0, atol=0, rtol=0)  # sigmas[0] == sigma_start


def test_ode_solution_single_component_closed_form():
    """One stationary Gaussian: x(sigma) = mu + F^H sqrt((P + sigma^2) / (P + sigma0^2)) F(x(sigma0) - mu)."""
    model = GaussianMixture(num_components=1, seed=2, resolution=8)
    g = torch.Generator().manual_seed(1)
    x_start = 80.0 * torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    sigmas = [80.0, 10.0, 1.0, 0.05, 0.002, 0.0]
    solution = model.ode_solution(x_start, 80.0, sigmas)
    spectrum = torch.fft.fft2(x_start - model.mu[0], norm='ortho')
    for i, sigma in enumerate(sigmas):
        ratio = torch.sqrt((model.P[0] + sigma ** 2) / (model.P[0] + 80.0 ** 2))
        exact = model.mu[0] + torch.fft.ifft2(ratio * spectrum, norm='ortho').real
        assert ((solution[i] - exact).norm() / exact.norm()).item() < 1e-8


def test_ode_solution_mixture_self_consistent():
    """Halving the RK4 step changes the reference solution by < 1e-7 (relative L2), sigma 80 -> 0."""
    model = build('toy')
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    sigmas = [80.0, 5.0, 0.5, 0.002, 0.0]
    coarse = model.ode_solution_from_noise(latents, 80.0, sigmas)
    fine = model.ode_solution_from_noise(latents, 80.0, sigmas, steps_per_unit=2 * STEPS_PER_UNIT)
    rel = (coarse - fine).flatten(2).norm(dim=2) / fine.flatten(2).norm(dim=2)
    assert rel.max().item() < 1e-7


def test_ode_solution_arguments():
    model = IsotropicGaussian(resolution=4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert model.ode_solution(x, 1.0, []).shape == (0, 2, 3, 4, 4)
    with pytest.raises(ValueError, match='non-increasing'):
        model.ode_solution(x, 1.0, [0.5, 0.7])
    with pytest.raises(ValueError, match='non-increasing'):
        model.ode_solution(x, 1.0, [2.0])
    out = model.ode_solution(x, 1.0, torch.tensor([0.0, 0.0]))  # repeated 0 targets
    exact = model.exact_solution(x, 1.0, 0.0)
    assert ((out[0] - exact).norm() / exact.norm()).item() < 1e-9
    torch.testing.assert_close(out[1], out[0], atol=0, rtol=0)
