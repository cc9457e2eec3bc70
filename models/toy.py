"""Exact analytic models: the codebase's built-in, no-download model and ground truth for solver tests.

Two denoisers whose D(x; sigma), data samples and probability-flow ODE solution are known exactly:

* :class:`GaussianMixture` (``build('toy')``, ``build('toy_cond')``): K stationary Gaussians over
  3x32x32 images with smooth coloured shapes as means and a natural-image power spectrum as
  covariance (a "natural spectrum" mixture, which reproduces the solver ordering
  seen on real image models). Its exact denoiser is a per-component Wiener filter in Fourier space.
* :class:`IsotropicGaussian`: data N(m, s^2 I), whose ODE solution has a closed form; used to check
  the reference ODE integrator itself.

Notation (EDM): x = x0 + sigma * n with n ~ N(0, I); D(x; sigma) = E[x0 | x]; the probability-flow ODE
is dx/dsigma = (x - D(x; sigma)) / sigma. F is the unitary 2-D DFT (``torch.fft.fft2(., norm='ortho')``)
over each channel with periodic boundary, F^H its inverse, and f the frequency in cycles per image.

The reference ODE solution (:func:`solve_pf_ode`) is classical RK4 in lambda = log(sigma),
dx/dlambda = x - D(x; e^lambda), with uniform lambda steps that land exactly on every requested sigma.
"""

import math

import torch

from .base import Denoiser

FEATURE_RES = 8  # spatial size of the AMED predictor's feature map

#: Default RK4 steps per unit of lambda = log(sigma) for the reference ODE solution (about 680 steps,
#: 2,700 denoiser calls, for sigma 80 -> 0.002). Its accuracy is measured in :func:`solve_pf_ode`:
#: relative L2 error <= 2e-8 on the default mixture, against a required 1e-6.
STEPS_PER_UNIT = 64


def _sigma_batch(sigma, batch_size, dtype, device):
    """Noise level(s) as a tensor of shape (B,): accepts a python float, a 0-dim, (1,) or (B,) tensor."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, batch_size)):
        raise ValueError(f'sigma must be a scalar or have shape ({batch_size},), got {tuple(sigma.shape)}')
    return sigma.reshape(-1).expand(batch_size)


def solve_pf_ode(denoiser, x_start, sigma_start, sigmas, cond=None, steps_per_unit=STEPS_PER_UNIT):
    """Reference solution of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    Integrates from ``x_start`` at ``sigma_start`` through every value of the non-increasing
    ``sigmas`` and returns the states there, shape (len(sigmas), B, C, H, W), float64.

    Method: classical RK4 in lambda = log(sigma), where dx/dlambda = x - D(x; e^lambda). The lambda
    interval between consecutive targets is split into ceil(|dlambda| * steps_per_unit) equal substeps,
    so every requested sigma is hit exactly. A target sigma = 0 (lambda = -inf) is reached by
    integrating down to ``denoiser.sigma_min`` and then applying ``denoiser.flow_to_zero``, the exact
    remaining flow (see the denoiser classes). Runs in float64 under ``torch.no_grad()``.

    Stability: for one Gaussian the Jacobian of x - D has eigenvalues sigma^2 / (P + sigma^2) in
    [0, 1]; for a mixture, between-component directions can add negative eigenvalues while the
    responsibilities are undecided (neighbouring trajectories separate, choosing components); the
    measurements below show clean fourth-order convergence regardless.

    Accuracy (measured on ``build('toy')``, float64, from latents * 80 at sigma 80 through the 18
    sigmas of EDM's rho=7 schedule 80 -> 0.002 and then 0; error = the Richardson estimate of the
    relative L2 error per sample and sigma, 16/15 * |x_n - x_2n| / |x_2n|, for n steps per unit):
    the error falls 16-fold per halving of the step (fourth order), and at n = 64 (the default) its
    maximum is 2.1e-9 over 8 samples (seed 123; 3.3e-8 at n = 32, 4.6e-7 at n = 16) and 1.7e-8 over
    64 samples (seed 7; median 1.9e-9; 2.3e-7 at n = 32); 2.0e-9 over 8 samples of ``build('toy_cond')``.
    The flow to 0 is applied at sigma = 0.002, where every trajectory measured had responsibilities
    one-hot to machine precision (already below 1e-14 away from one-hot at sigma = 0.2).

    Args:
        denoiser: an analytic denoiser (``model(x, sigma, cond)``) with ``flow_to_zero``.
        x_start: (B, C, H, W) state at ``sigma_start``.
        sigma_start: python float or 0-dim tensor.
        sigmas: list or 1-D tensor of non-increasing targets, each <= sigma_start (0 allowed).
        cond: passed to the denoiser unchanged.
        steps_per_unit: RK4 steps per unit of lambda.
    """
    sigma_cur = float(sigma_start)
    targets = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).tolist()
    if sigma_cur <= 0:
        raise ValueError(f'sigma_start must be positive, got {sigma_cur}')
    if any(t < 0 for t in targets) or any(b > a for a, b in zip([sigma_cur] + targets, targets)):
        raise ValueError(f'sigmas must be non-negative, non-increasing and <= sigma_start={sigma_cur}, got {targets}')
    x = x_start.detach().to(torch.float64)
    batch_size = x.shape[0]

    def velocity(x, lam):  # dx/dlambda
        sigma = torch.full((batch_size,), math.exp(lam), dtype=torch.float64, device=x.device)
        return x - denoiser(x, sigma, cond)

    def integrate(x, sigma_from, sigma_to):  # RK4, uniform steps in lambda
        lam, lam_to = math.log(sigma_from), math.log(sigma_to)
        num_steps = math.ceil((lam - lam_to) * steps_per_unit - 1e-9)
        if num_steps <= 0:
            return x
        h = (lam_to - lam) / num_steps
        for i in range(num_steps):
            lam_i = lam + i * h
            k1 = velocity(x, lam_i)
            k2 = velocity(x + 0.5 * h * k1, lam_i + 0.5 * h)
            k3 = velocity(x + 0.5 * h * k2, lam_i + 0.5 * h)
            k4 = velocity(x + h * k3, lam_i + h)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    out = []
    with torch.no_grad():
        for target in targets:
            if sigma_cur > 0 and target > 0:
                x = integrate(x, sigma_cur, target)
            elif sigma_cur > 0:  # target == 0: integrate to sigma_min, then the exact tail
                sigma_tail = min(sigma_cur, denoiser.sigma_min)
                x = integrate(x, sigma_cur, sigma_tail)
                x = denoiser.flow_to_zero(x, sigma_tail, cond).to(torch.float64)
            sigma_cur = target
            out.append(x)
    if not out:
        return x.new_zeros((0,) + tuple(x.shape))
    return torch.stack(out)


class ReferenceODE:
    """Mixin of the denoisers whose probability-flow ODE solution the evaluation measures against:
    :func:`solve_pf_ode` at the class's ``steps_per_unit`` (its default accuracy)."""

    steps_per_unit = STEPS_PER_UNIT

    def ode_solution(self, x_start, sigma_start, sigmas, cond=None, steps_per_unit=None):
        """Reference probability-flow ODE solution at each of ``sigmas``: see :func:`solve_pf_ode`.

        Returns a float64 tensor of shape (len(sigmas), B, C, H, W).
        """
        return solve_pf_ode(self, x_start, sigma_start, sigmas, cond=cond,
                            steps_per_unit=steps_per_unit or self.steps_per_unit)

    def ode_solution_from_noise(self, latents, sigma_max, sigmas, cond=None, steps_per_unit=None):
        """As the solvers start: x(sigma_max) = latents * sigma_max, with unit Gaussian ``latents``."""
        x_start = latents.to(torch.float64) * float(sigma_max)
        return self.ode_solution(x_start, sigma_max, sigmas, cond=cond, steps_per_unit=steps_per_unit)


class AnalyticDenoiser(ReferenceODE, Denoiser):
    """Shared parts of the exact models: float64 buffers, the AMED feature, the reference ODE.

    AMED feature: ``feature_module`` is an ``Identity`` that forward calls on the denoised image
    average-pooled to 8x8, D(x; sigma) -> (B, C, 8, 8) (4x4 mean pooling at 32x32; adaptive pooling
    at other resolutions). Its output is discarded by forward; the hook of
    ``Denoiser.capture_feature`` reads it, and the predictor's (B, 8, 8) feature is its channel mean,
    i.e. the 8x8 average-pooled, channel-averaged D(x; sigma).
    """

    def _emit_feature(self, denoised):
        """Call ``feature_module`` on the 8x8 average-pooled D (output discarded; a hook reads it)."""
        size = denoised.shape[-1]
        if size % FEATURE_RES == 0 and denoised.shape[-2] == size:
            pooled = torch.nn.functional.avg_pool2d(denoised, size // FEATURE_RES)
        else:
            pooled = torch.nn.functional.adaptive_avg_pool2d(denoised, FEATURE_RES)
        self.feature_module(pooled)

    def _compute_dtype(self, x):
        """float64 for float64 input, float32 otherwise (FFTs in half precision are not supported on CPU)."""
        if not x.is_floating_point():
            raise ValueError(f'x must be a floating-point tensor, got {x.dtype}')
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _check_shape(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != self.img_shape:
            raise ValueError(f'x must have shape (B, {", ".join(map(str, self.img_shape))}), got {tuple(x.shape)}')

    def _apply(self, fn, recurse=True):
        """Buffers follow the module's device but stay float64 (``.float()``, ``.to(dtype)`` do not
        touch them), so the ground truth never loses precision; forward casts to x's dtype."""
        originals = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in originals.items():
            if old is not None and old.dtype == torch.float64:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def flow_to_zero(self, x, sigma, cond=None):  # pragma: no cover - abstract
        """Exact probability-flow map from noise level ``sigma`` to sigma = 0."""
        raise NotImplementedError



class IsotropicGaussian(AnalyticDenoiser):
    """Data N(m, s^2 I): D(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m), exact ODE solution in closed form.

    Useful to check ODE integrators: x(sigma) = m + (x(sigma0) - m) sqrt(sigma^2 + s^2) / sqrt(sigma0^2 + s^2).

    Args:
        mean: m, a scalar or a tensor broadcastable to (channels, resolution, resolution).
        std: s > 0.
        resolution, channels: image shape.
    """

    def __init__(self, mean=0.0, std=0.5, resolution=32, channels=3):
        super().__init__()
        if std <= 0:
            raise ValueError(f'std must be positive, got {std}')
        self.img_resolution = int(resolution)
        self.img_channels = int(channels)
        self.std = float(std)
        m = torch.as_tensor(mean, dtype=torch.float64).expand(self.img_shape).clone()
        self.register_buffer('mean', m)
        self.feature_module = torch.nn.Identity()

    def forward(self, x, sigma, cond=None):
        """D(x; sigma) = m + s^2 / (s^2 + sigma^2) (x - m); ``cond`` must be None."""
        if cond is not None:
            raise ValueError('IsotropicGaussian is unconditional: cond must be None')
        self._check_shape(x)
        dtype = self._compute_dtype(x)
        sigma = _sigma_batch(sigma, x.shape[0], dtype, x.device).reshape(-1, 1, 1, 1)
        m = self.mean.to(dtype)
        s2 = self.std ** 2
        denoised = m + s2 / (s2 + sigma ** 2) * (x.to(dtype) - m)
        self._emit_feature(denoised)
        return denoised.to(x.dtype)

    def exact_solution(self, x, sigma0, sigma):
        """Closed-form ODE solution: the state at ``sigma`` of the trajectory through ``x`` at ``sigma0``.

        ``sigma0`` and ``sigma`` are scalars or (B,) tensors; sigma = 0 is allowed. Returns float64.
        """
        x = x.to(torch.float64)
        sigma0 = _sigma_batch(sigma0, x.shape[0], torch.float64, x.device).reshape(-1, 1, 1, 1)
        sigma = _sigma_batch(sigma, x.shape[0], torch.float64, x.device).reshape(-1, 1, 1, 1)
        s2 = self.std ** 2
        return self.mean + (x - self.mean) * torch.sqrt((sigma ** 2 + s2) / (sigma0 ** 2 + s2))

    def flow_to_zero(self, x, sigma, cond=None):
        return self.exact_solution(x, sigma, 0.0)

    def sample(self, n, generator=None):
        """Exact data samples x0 ~ N(m, s^2 I), (n, C, H, W) float64."""
        noise = torch.randn((n,) + self.img_shape, generator=generator, dtype=torch.float64, device=self.mean.device)
        return self.mean + self.std * noise


# ----------------------------------------------------------------------------------------------
# The natural-spectrum Gaussian mixture.

SHAPES = ('disc', 'square', 'stripes', 'blob', 'ring', 'horizon')


def natural_spectrum(resolution, f0=1.0):
    """p(f) = 1 / (|f|^2 + f0^2) on the DFT grid (f in cycles per image), scaled to mean 1.

    The mean of the spectrum over frequencies is the per-pixel variance of the stationary Gaussian
    F^H diag(p) F, so this spectrum has unit per-pixel variance. Symmetric: p(-f) = p(f).
    """
    f = torch.fft.fftfreq(resolution, d=1.0 / resolution, dtype=torch.float64)
    p = 1.0 / (f[:, None] ** 2 + f[None, :] ** 2 + f0 ** 2)
    return p / p.mean()


def _uniform(generator, low, high, *shape):
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _shape_mask(kind, generator, u, v, edge):
    """Soft mask in [0, 1] of one smooth shape at a random place; u, v are pixel-centre coordinates in (0, 1)."""
    cx, cy = _uniform(generator, 0.3, 0.7, 2).tolist()
    theta = _uniform(generator, 0.0, math.pi, 1).item()
    du, dv = u - cx, v - cy
    a = du * math.cos(theta) + dv * math.sin(theta)  # rotated coordinates
    b = -du * math.sin(theta) + dv * math.cos(theta)
    r = torch.sqrt(du ** 2 + dv ** 2)
    if kind == 'disc':
        radius = _uniform(generator, 0.15, 0.3, 1).item()
        return torch.sigmoid((radius - r) / edge)
    if kind == 'square':
        half = _uniform(generator, 0.12, 0.25, 1).item()
        return torch.sigmoid((half - torch.maximum(a.abs(), b.abs())) / edge)
    if kind == 'stripes':
        period = _uniform(generator, 0.2, 0.4, 1).item()
        return torch.sigmoid(torch.cos(2 * math.pi * a / period) / 0.3)
    if kind == 'blob':  # union of three Gaussian bumps
        centres = _uniform(generator, -0.15, 0.15, 3, 2)
        widths = _uniform(generator, 0.07, 0.14, 3)
        outside = torch.ones_like(u)
        for (ou, ov), w in zip(centres.tolist(), widths.tolist()):
            outside = outside * (1 - torch.exp(-((du - ou) ** 2 + (dv - ov) ** 2) / (2 * w ** 2)))
        return 1 - outside
    if kind == 'ring':
        radius = _uniform(generator, 0.18, 0.3, 1).item()
        thickness = _uniform(generator, 0.04, 0.08, 1).item()
        return torch.sigmoid((thickness - (r - radius).abs()) / edge)
    if kind == 'horizon':  # a soft straight boundary through (cx, cy)
        return torch.sigmoid(b / (3 * edge))
    raise ValueError(f'unknown shape {kind!r}')


def smooth_means(num_components, resolution, channels, mean_scale, generator):
    """Component means mu_k (K, C, H, W), float64: a coloured background with a gentle linear gradient
    plus a blurred shape (``SHAPES`` in turn) of another colour; values within about +-mean_scale."""
    t = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    v, u = torch.meshgrid(t, t, indexing='ij')  # v: row (down), u: column (right)
    edge = 0.8 / resolution  # soft-edge width: the sigmoid goes 12% -> 88% over about 3 pixels
    means = []
    for k in range(num_components):
        background = _uniform(generator, -1, 1, channels)
        while True:  # a foreground colour clearly different from the background
            foreground = _uniform(generator, -1, 1, channels)
            if (foreground - background).norm() >= 0.8:
                break
        gradient = _uniform(generator, -0.6, 0.6, channels, 2)
        bg = background[:, None, None] + gradient[:, :1, None] * (u - 0.5) + gradient[:, 1:, None] * (v - 0.5)
        bg = bg.clamp(-1, 1)
        mask = _shape_mask(SHAPES[k % len(SHAPES)], generator, u, v, edge)
        means.append(mean_scale * (bg + (foreground[:, None, None] - bg) * mask))
    return torch.stack(means)


def _planes(spectrum):
    """Complex (N, C, H, Wr) -> real and imaginary planes (N, 2, C*H*Wr), contiguous."""
    return torch.view_as_real(spectrum).flatten(1, 3).transpose(1, 2).contiguous()


class GaussianMixture(AnalyticDenoiser):
    """Mixture of K stationary Gaussians with a natural-image power spectrum, with exact denoiser.

    Data: p(x0) = sum_k pi_k N(x0; mu_k, C_k), pi_k = 1/K, where per channel c
    C_k = F^H diag(P_k) F with P_k,c(f) = pixel_var * a_k,c * p(f), p(f) proportional to
    1 / (|f|^2 + f0^2) (f0 = 1 cycle per image) scaled to mean 1 (:func:`natural_spectrum`), and an
    amplitude a_k,c ~ U(0.6, 1.4) per component and channel, so that responsibilities depend on the
    spectrum as well as the mean. The per-pixel variance is pixel_var * a_k,c (about 0.1). The means
    mu_k are smooth coloured shapes (:func:`smooth_means`). All of it comes from ``seed``.

    Exact denoiser, with x = x0 + sigma n and R_k = F(x - mu_k):
        E[x0 | x, k] = mu_k + F^H [P_k / (P_k + sigma^2) * R_k]             (Wiener filter)
        log p(x | k) = -1/2 sum_f |R_k,f|^2 / (P_k,f + sigma^2) - 1/2 sum_f log(P_k,f + sigma^2) + const
        w_k = softmax_k(log p(x | k) + log pi_k),  D(x; sigma) = sum_k w_k E[x0 | x, k].
    Computed with one real FFT and one inverse per sample (the half spectrum, its sums over f
    weighted to count every full-spectrum frequency once), since sum_k w_k E[x0 | x, k] =
    F^H[sum_k w_k (M_k + g_k (F(x) - M_k))] with M_k = F(mu_k), g_k the Wiener gain. The FFTs run in
    the input dtype (float64 for float64 input, float32 otherwise; the output has the input dtype);
    the per-frequency algebra (log-likelihoods, responsibilities, gains) runs in float64 as matrix
    products against (K, Fh) tensors, once per distinct sigma in the batch, so it is cheap and
    accurate: float32 output is within ~5e-7 of the float64 one at every sigma. Nothing is reduced
    across the batch, so a sample's output does not depend on its batch (beyond rounding).
    Differentiable w.r.t. x and sigma (per-sample sigma with grad takes a per-sample path).

    Conditional model (``conditional=True``, label_dim = K): ``cond`` is class labels (B,) (integer)
    or one-hot (B, K) (float); D is the Wiener filter of that single component (responsibility one-hot).

    AMED feature: see :class:`AnalyticDenoiser` (8x8 average-pooled D, channel mean).

    Args:
        num_components: K.
        seed: integer seed of the means and spectrum amplitudes.
        resolution, channels: image shape (C, resolution, resolution).
        conditional: class-conditional on the component.
        pixel_var: the per-pixel variance scale of the spectrum.
        mean_scale: amplitude of the means (values within about +-mean_scale).
    """

    f0 = 1.0  # knee of the spectrum, cycles per image

    def __init__(self, num_components=10, seed=0, resolution=32, channels=3, conditional=False,
                 pixel_var=0.1, mean_scale=0.5):
        super().__init__()
        self.num_components = int(num_components)
        self.seed = int(seed)
        self.img_resolution = int(resolution)
        self.img_channels = int(channels)
        self.conditional = bool(conditional)
        self.label_dim = self.num_components if self.conditional else 0
        generator = torch.Generator().manual_seed(self.seed)
        mu = smooth_means(self.num_components, self.img_resolution, self.img_channels, mean_scale, generator)
        amplitude = _uniform(generator, 0.6, 1.4, self.num_components, self.img_channels)
        P = pixel_var * amplitude[:, :, None, None] * natural_spectrum(self.img_resolution, self.f0)
        self.register_buffer('mu', mu)  # (K, C, H, W)
        self.register_buffer('P', P)  # (K, C, H, W), full DFT grid
        self.feature_module = torch.nn.Identity()

    # -- conditioning ---------------------------------------------------------------------------

    def _labels(self, cond, batch_size, device):
        """Validate ``cond`` and return component labels (B,) long, or None for the mixture."""
        if not self.conditional:
            if cond is not None:
                raise ValueError('unconditional GaussianMixture takes cond=None; '
                                 'build it with conditional=True to use labels')
            return None
        if cond is None:
            raise ValueError(f'conditional GaussianMixture needs cond: labels (B,) or one-hot '
                             f'(B, {self.num_components}), got None')
        cond = torch.as_tensor(cond, device=device)
        if cond.is_floating_point():
            if cond.shape != (batch_size, self.num_components):
                raise ValueError(f'one-hot cond must have shape ({batch_size}, {self.num_components}), '
                                 f'got {tuple(cond.shape)}')
            labels = cond.argmax(dim=1)
            if not torch.equal(cond, torch.nn.functional.one_hot(labels, self.num_components).to(cond.dtype)):
                raise ValueError('float cond must be one-hot (exactly one 1 per row, zeros elsewhere)')
            return labels
        if cond.dtype == torch.bool or cond.is_complex() or cond.shape != (batch_size,):
            raise ValueError(f'label cond must be an integer tensor of shape ({batch_size},), '
                             f'got {cond.dtype} {tuple(cond.shape)}')
        if bool(((cond < 0) | (cond >= self.num_components)).any()):
            raise ValueError(f'labels must lie in [0, {self.num_components}), got {cond.tolist()}')
        return cond.long()

    def sample_cond(self, rnd, batch_size, training=False):
        """Labels (B,) drawn as ``rnd.randint(K, size=[batch_size], device=...)``, None if unconditional.

        ``rnd`` is any object with ``randint(high, size=..., device=...)`` like ``torch.randint`` without
        its generator argument (e.g. EDM's per-seed ``StackedRandomGenerator``).
        """
        if not self.conditional:
            return None
        return rnd.randint(self.label_dim, size=[batch_size], device=self.mu.device)

    # -- the exact filter -----------------------------------------------------------------------

    def _half_spectrum(self):
        """float64 constants on the real-FFT half spectrum, flattened over (C, H, W//2 + 1) to Fh entries:
        M = F(mu_k) as planes of real and imaginary parts (K, 2, Fh), |M|^2 (K, Fh), P_k (K, Fh), and
        count (Fh,): how many full-spectrum frequencies each entry stands for (2: itself and its mirror
        image; 1 for column 0 and, for even W, column W/2, which are their own mirror images). Cached;
        recomputed when mu or P move or change."""
        key = (self.mu.device, self.mu.data_ptr(), self.mu._version, self.P.data_ptr(), self.P._version)
        if getattr(self, '_half_spectrum_key', None) != key:
            K, C, H, W = self.mu.shape
            Wr = W // 2 + 1
            M = _planes(torch.fft.rfft2(self.mu, norm='ortho'))
            count = torch.full((C, H, Wr), 2.0, dtype=torch.float64, device=M.device)
            count[..., 0] = 1
            if W % 2 == 0:
                count[..., -1] = 1
            P = self.P[..., :Wr].reshape(K, -1)
            self._half_spectrum_value = (M, M.square().sum(dim=-2), P, count.reshape(-1))
            self._half_spectrum_key = key
        return self._half_spectrum_value

    @staticmethod
    def _gains(P, s2, power):
        """g = (P / (P + sigma^2))^power and 1 - g, both without cancellation (power 1 or 1/2)."""
        var = P + s2
        if power == 1:
            return P / var, s2 / var
        if power == 0.5:
            gain = torch.sqrt(P / var)
            return gain, (s2 / var) / (1 + gain)
        raise ValueError(f'power must be 1 or 0.5, got {power}')

    @classmethod
    def _mixture_posterior(cls, X, s2, spectrum, power):
        """Responsibilities and filtered spectrum, in float64, for G groups of n samples each, the
        samples of group g sharing the noise level sigma_g.

        X: F(x) on the half spectrum as real and imaginary planes (G, n, 2, Fh); s2: sigma_g^2 (G,);
        spectrum: ``_half_spectrum()``. Returns w (G, n, K), A = sum_k w_k g_k (G, n, Fh) and
        R = sum_k w_k (1 - g_k) M_k (G, n, 2, Fh), where g_k = (P_k / (P_k + sigma^2))^power, so that
        the filtered spectrum is sum_k w_k [M_k + g_k (X - M_k)] = A X + R. The sums over f of
        log p(x | k) = -1/2 sum_f [|X_f - M_k,f|^2 / (P_k,f + sigma^2) + log(P_k,f + sigma^2)] + const
        are expanded (|X - M|^2 = |X|^2 - 2 Re(conj(X) M) + |M|^2) into matrix products, so the
        sigma-dependent tensors are (G, K, Fh), never (G, n, K, Fh); the log term is shifted by the
        k-independent sum_f log(Pbar_f + sigma^2), Pbar = mean_k P_k, which cancels in the softmax and
        keeps its terms small.
        """
        M, M2, P, count = spectrum
        s2 = s2[:, None, None]
        u = count / (P + s2)  # quadratic-form weights (G, K, Fh), counting mirror frequencies
        quad = X.square().sum(dim=-2) @ u.mT - 2 * X.flatten(-2) @ (u[:, :, None, :] * M).flatten(-2).mT \
            + (u * M2).sum(dim=-1)[:, None, :]  # sum_f u_k,f |X_f - M_k,f|^2, (G, n, K)
        Pbar = P.mean(dim=0)
        log_det = (torch.log1p((P - Pbar) / (Pbar + s2)) @ count)[:, None, :]  # (G, 1, K)
        w = torch.softmax(-0.5 * (quad + log_det), dim=-1)  # uniform pi_k cancels
        gain, rest = cls._gains(P, s2, power)
        return w, w @ gain, (w @ (rest[:, :, None, :] * M).flatten(-2)).unflatten(-1, (2, -1))

    def _filter(self, x, sigma, labels, power):
        """sum_k w_k [mu_k + F^H ((P_k / (P_k + sigma^2))^power F(x - mu_k))], and w (B, K) float64.

        power = 1 gives D(x; sigma), power = 1/2 the flow to sigma = 0 (``flow_to_zero``); w_k are the
        responsibilities, or one-hot at ``labels`` if given. The two FFTs run in the compute dtype;
        the per-frequency algebra runs in float64, on (K, Fh) tensors once per distinct sigma in the
        batch (once per sample when sigma requires grad, so that each sample's sigma gets its own
        gradient). Samples share nothing but their sigma values, so a sample's output does not depend
        on its batch beyond rounding.
        """
        self._check_shape(x)
        dtype = self._compute_dtype(x)
        B, C, H, W = x.shape
        sigma = _sigma_batch(sigma, B, torch.float64, x.device)
        X = _planes(torch.fft.rfft2(x.to(dtype), norm='ortho'))  # F(x) as (B, 2, Fh), compute dtype
        spectrum = self._half_spectrum()
        M, _, P, _ = spectrum
        if labels is not None:  # a single component per sample
            A, rest = self._gains(P[labels], sigma[:, None].square(), power)
            R = rest[:, None, :] * M[labels]
            w = torch.nn.functional.one_hot(labels, self.num_components).to(torch.float64)
        elif not sigma.requires_grad and bool((sigma == sigma[0]).all()):  # the usual case: one sigma
            w, A, R = self._mixture_posterior(X.to(torch.float64)[None], sigma[:1].square(), spectrum, power)
            w, A, R = w[0], A[0], R[0]
        else:
            # Group the samples by sigma (each sample alone when sigma requires grad), and the groups
            # by size: one batched call per group size.
            if sigma.requires_grad:
                group_of = torch.arange(B, device=x.device)
            else:
                group_of = torch.unique(sigma, return_inverse=True)[1]
            groups = torch.argsort(group_of, stable=True).split(torch.bincount(group_of).tolist())
            X64 = X.to(torch.float64)
            w, A, R = X64.new_empty((B, self.num_components)), X64.new_empty((B, X.shape[-1])), torch.empty_like(X64)
            for size in sorted({len(g) for g in groups}):
                idx = torch.stack([g for g in groups if len(g) == size])  # (G, size)
                parts = self._mixture_posterior(X64[idx], sigma[idx[:, 0]].square(), spectrum, power)
                w, A, R = (old.index_put((idx.reshape(-1),), new.flatten(0, 1)) for old, new in zip((w, A, R), parts))
        Y = X * A.to(dtype)[:, None, :] + R.to(dtype)  # sum_k w_k [M_k + g_k (X - M_k)]
        Y = torch.complex(Y[:, 0], Y[:, 1]).reshape(B, C, H, W // 2 + 1)
        return torch.fft.irfft2(Y, s=(H, W), norm='ortho'), w

    def responsibilities(self, x, sigma):
        """Posterior component probabilities w_k = p(k | x; sigma) under the mixture, (B, K) float64."""
        return self._filter(x, sigma, None, 1)[1]

    def forward(self, x, sigma, cond=None):
        """Exact D(x; sigma) = E[x0 | x] for x (B, C, H, W), sigma (B,) or scalar; see the class docstring."""
        labels = self._labels(cond, x.shape[0], x.device)
        denoised, _ = self._filter(x, sigma, labels, power=1)
        self._emit_feature(denoised)
        return denoised.to(x.dtype)

    def flow_to_zero(self, x, sigma, cond=None):
        """Map x at noise level sigma to sigma = 0 along the probability-flow ODE.

        For one Gaussian component the flow is linear: x(0) = mu_k + F^H sqrt(P_k / (P_k + sigma^2)) F(x - mu_k).
        This returns sum_k w_k(x, sigma) of those maps, which is exact as long as the responsibilities
        no longer change below sigma; :func:`solve_pf_ode` applies it at sigma <= sigma_min = 0.002,
        where every trajectory of this model has committed to one component.
        """
        labels = self._labels(cond, x.shape[0], x.device)
        return self._filter(x, sigma, labels, power=0.5)[0].to(x.dtype)

    # -- exact data samples ---------------------------------------------------------------------

    def sample(self, n, generator=None, labels=None):
        """Exact data samples x0 (n, C, H, W), float64: component k uniform (or ``labels``), then
        x0 = mu_k + F^H(sqrt(P_k) F(w)) with white w ~ N(0, I)."""
        device = self.mu.device
        if labels is None:
            labels = torch.randint(self.num_components, (n,), generator=generator, device=device)
        else:
            labels = torch.as_tensor(labels, device=device).long()
            if labels.shape != (n,) or bool(((labels < 0) | (labels >= self.num_components)).any()):
                raise ValueError(f'labels must have shape ({n},) and lie in [0, {self.num_components})')
        white = torch.randn((n,) + self.img_shape, generator=generator, dtype=torch.float64, device=device)
        field = torch.fft.ifft2(self.P[labels].sqrt() * torch.fft.fft2(white, norm='ortho'), norm='ortho')
        if n > 0 and field.imag.abs().max() > 1e-10 * (1 + field.real.abs().max()):
            raise RuntimeError('sample: imaginary part not negligible; the spectrum is not symmetric')
        return self.mu[labels] + field.real


def build(name):
    """The built-in models by name: 'toy' (unconditional) and 'toy_cond' (class-conditional), seed 0."""
    if name == 'toy':
        return GaussianMixture()
    if name == 'toy_cond':
        return GaussianMixture(conditional=True)
    raise ValueError(f"unknown built-in model {name!r}; choose 'toy' or 'toy_cond'")
