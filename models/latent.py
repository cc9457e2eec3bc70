"""What the latent models (LDM, Stable Diffusion) share: a discrete-time VP epsilon network read as
a sigma denoiser through its ``alphas_cumprod``, and how their checkpoint files are found and read.

The sigma <-> t maps are REFERENCE.md 4.1 (CFGPrecond): with keypoints t_n = (n + 1) / 1000 and
log alpha_n = 1/2 ln alpha_bar_n (n = 0 .. 999), log alpha(t) is the piecewise-linear interpolation
of the keypoints, extended linearly past both ends, and sigma(t) = sqrt(1 - alpha^2) / alpha. The
inverse goes through log alpha = -1/2 ln(1 + sigma^2). The network sees x / sqrt(sigma^2 + 1) at the
continuous timestep 1000 t - 1, and D = x - sigma eps.

Checkpoints in the original single-file layout (``model.ckpt``, ``v1-5-pruned-emaonly.ckpt`` or
``.safetensors``) are read without running code (``torch.load(weights_only=True)`` or safetensors);
when they hold EMA weights (``model_ema.*``) those replace the raw network weights, so teacher,
student and the backward pass of training all use the EMA network.
"""

import hashlib
import os
import pickle
import zipfile

import torch

import dnnlib

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


# ----------------------------------------------------------------------------------------------
# Checkpoint files.

def load_checkpoint(path, what):
    """The state dict of a single-file checkpoint (``.ckpt``/``.pt``: a torch file, optionally
    ``{'state_dict': ...}``; ``.safetensors``), read on the CPU without running code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} file not found: {path}')
    try:
        if path.endswith('.safetensors'):
            import safetensors.torch
            state = safetensors.torch.load_file(path, device='cpu')
        else:
            state = _load_torch_file(path)
    except Exception as e:
        raise ValueError(f'{path}: not a readable {what} checkpoint ({type(e).__name__}: '
                         f'{str(e).splitlines()[0] if str(e) else ""})') from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{path}: holds no {what} state dict')
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


class _Placeholder:
    """Stands in for a class a checkpoint pickles besides its tensors (e.g. PyTorch Lightning's
    ModelCheckpoint callback in LDM's training checkpoints): it takes any arguments and state and
    runs no code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def _load_torch_file(path):
    """``torch.load(weights_only=True)``; classes other than tensors' (which weights_only refuses)
    are read as :class:`_Placeholder` subclasses of the same name, so no code from the file runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names:
            raise
    stand_ins = []
    for full in names:
        module, _, name = full.rpartition('.')
        stand_ins.append(type(name, (_Placeholder,), {'__module__': module, '__qualname__': name}))
    with torch.serialization.safe_globals(stand_ins):
        state = torch.load(path, map_location='cpu', weights_only=True)
    from torch_utils import distributed as dist
    dist.print0(f"{path}: read {', '.join(names)} as placeholders (only the tensors are used; no code from the file runs)")
    return state


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


def find_file(what, candidates, url, member=None, option='--model_path'):
    """The first existing path of ``candidates``; otherwise the (cached) download of ``url``; with
    ``member``, ``url`` is a zip and the member is extracted once into the download cache.

    A failed download raises FileNotFoundError with one line that says where to put the file."""
    for path in candidates:
        if os.path.isfile(path):
            return path
    try:
        local = dnnlib.util.open_url(url, return_filename=True)
    except (dnnlib.util.DownloadError, OSError) as e:
        raise FileNotFoundError(f'{what} not found: put it at {candidates[0]} or pass {option} '
                                f'(downloading {url} failed: {str(e).splitlines()[0]})') from None
    return extract_member(local, member) if member else local


def extract_member(zip_path, member):
    """Extract a zip file once into the download cache (as the official code unpacks
    ``lsun_bedrooms.zip`` / ``vq-f4.zip``) and return the path of ``member`` (matched by basename,
    the shallowest one). Files are written atomically; an extracted file is not written again."""
    st = os.stat(zip_path)
    key = hashlib.md5(f'{os.path.abspath(zip_path)}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:16]
    target_dir = dnnlib.util.make_cache_dir_path('extracted', f'{key}_{os.path.basename(zip_path)}.d')
    from torch_utils.misc import atomic_write
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if not n.endswith('/')]
            matches = [n for n in names if os.path.basename(n) == member]
            if not matches:
                raise ValueError(f'{zip_path}: no {member} inside')
            for name in names:
                target = os.path.join(target_dir, *name.split('/'))
                if os.path.isfile(target):
                    continue

                def write(tmp, name=name):
                    with zf.open(name) as src, open(tmp, 'wb') as dst:
                        while chunk := src.read(1 << 24):
                            dst.write(chunk)
                atomic_write(target, write)
    except zipfile.BadZipFile:
        raise ValueError(f'{zip_path}: not a zip file') from None
    return os.path.join(target_dir, *min(matches, key=len).split('/'))


def resolve_model_file(path, member='model.ckpt'):
    """A user-given model path: a zip (the official ``lsun_bedrooms.zip`` / ``vq-f4.zip``) is
    read through its ``member``; a URL is downloaded to the cache first."""
    if '://' in str(path):
        path = dnnlib.util.open_url(path, return_filename=True)
    if str(path).endswith('.zip'):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'file not found: {path}')
        return extract_member(path, member)
    return str(path)
