"""What the latent models (LDM, Stable Diffusion) share: a discrete-time VP epsilon network read as
a sigma denoiser through its ``alphas_cumprod``, and the EMA weights of their checkpoints.

The sigma <-> t maps are the official code's (CFGPrecond): with keypoints t_n = (n + 1) / 1000 and
log alpha_n = 1/2 ln alpha_bar_n (n = 0 .. 999), log alpha(t) is the piecewise-linear interpolation
of the keypoints, extended linearly past both ends, and sigma(t) = sqrt(1 - alpha^2) / alpha. The
inverse goes through log alpha = -1/2 ln(1 + sigma^2). The network sees x / sqrt(sigma^2 + 1) at the
continuous timestep 1000 t - 1, and D = x - sigma eps.

When a checkpoint holds EMA weights (``model_ema.*``) those replace the raw network weights, so
teacher, student and the backward pass of training all use the EMA network (files are read by
:mod:`models.files`).
"""

import torch

from .base import Denoiser


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), extended linearly past both ends."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def linear_alphas_cumprod(linear_start, linear_end, timesteps=1000):
    """alpha_bar of the LDM/SD 'linear' beta schedule (linear in sqrt(beta)), in float64."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class DiscreteEpsDenoiser(Denoiser):
    """A discrete-time VP epsilon network as D(x; sigma) (see the module docstring).

    Subclasses set ``self.img_channels`` / ``self.img_resolution`` / ``feature_module`` and implement
    ``eps(x_in, timestep, cond)`` (x_in in float32; timestep (B,) continuous in [0, 999])."""

    #: t of the first keypoint: the smallest time of the model (sigma_min = sigma(t_min)).
    t_min = 1e-3

    def __init__(self, alphas_cumprod):
        super().__init__()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError('alphas_cumprod must decrease strictly inside (0, 1)')
        n = abar.numel()
        # float64 keypoints, kept off the module's buffers (schedule constants, not weights), with
        # one copy per device the maps are evaluated on.
        self._keys = {torch.device('cpu'): (torch.arange(1, n + 1, dtype=torch.float64) / n, 0.5 * torch.log(abar))}
        self.num_timesteps = n
        self.sigma_min = float(self.t_to_sigma(torch.tensor(self.t_min, dtype=torch.float64)))
        self.sigma_max = float(self.t_to_sigma(torch.tensor(1.0, dtype=torch.float64)))

    def _keypoints(self, device):
        if device not in self._keys:
            self._keys[device] = tuple(k.to(device) for k in self._keys[torch.device('cpu')])
        return self._keys[device]

    def t_to_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        t_keys, log_alpha_keys = self._keypoints(t.device)
        return torch.sqrt(torch.expm1(-2 * _interp(t, t_keys, log_alpha_keys)))

    def sigma_to_t(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t_keys, log_alpha_keys = self._keypoints(sigma.device)
        return _interp(-0.5 * torch.log1p(sigma ** 2), log_alpha_keys.flip(0), t_keys.flip(0))

    def timestep(self, sigma):
        """The network's (continuous) timestep input at noise level ``sigma``: 1000 t - 1."""
        return self.num_timesteps * self.sigma_to_t(sigma) - 1

    def eps(self, x_in, timestep, cond):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x, sigma, cond=None):
        sigma = sigma.reshape(-1)
        timestep = self.timestep(sigma).to(torch.float32)   # differentiable: training backpropagates through s
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        x_in = (x / (sigma ** 2 + 1).sqrt()).to(torch.float32)
        eps = self.eps(x_in, timestep, cond).to(torch.float32)
        return (x - sigma * eps).to(x.dtype)


def use_ema_weights(state, prefix='model.diffusion_model.'):
    """Replace the network weights under ``prefix`` by their EMA copies when the checkpoint has them.

    LDM's EMA (``LitEma``) stores ``model.X.Y`` as ``model_ema.XY`` (dots removed). Returns
    (state, used_ema); raises ValueError when the EMA covers only part of the network."""
    ema = {k[len('model_ema.'):]: v for k, v in state.items()
           if k.startswith('model_ema.') and k not in ('model_ema.decay', 'model_ema.num_updates')}
    if not ema:
        return state, False
    out = dict(state)
    missing = []
    for key in state:
        if key.startswith(prefix):
            name = key[len('model.'):].replace('.', '')
            if name in ema:
                out[key] = ema[name]
            else:
                missing.append(key)
    if missing:
        raise ValueError(f'the checkpoint has EMA weights for only part of the network (none for {missing[0]})')
    return {k: v for k, v in out.items() if not k.startswith('model_ema.')}, True


def strip_prefix(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
