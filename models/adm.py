"""256x256 pixel models as :class:`models.base.Denoiser` (the official code):

* ``lsun_bedroom`` / ``lsun_cat``: Consistency-Models EDM-trained U-Nets (``edm_bedroom256_ema.pt``,
  ``edm_cat256_ema.pt``): EDM preconditioning with sigma_data 0.5, time input 1000 ln(sigma) / 4,
  sigma 0.002 to 80.
* ``imagenet256``: ADM (guided-diffusion ``256x256_diffusion.pt``), an epsilon model of the 1000-step
  linear-beta schedule, read through the continuous VP form (beta_d 19.9, beta_min 0.1) with its
  sigma<->t maps for the ``discrete`` schedule, and classifier guidance with the noisy-image
  classifier (``256x256_classifier.pt``).

The official files are plain state dicts (no code runs when loading them). The architecture is our
own code (models/networks_adm.py) with the official names. A JSON file ``<model file>.json`` with a
``config`` dict next to a checkpoint overrides the official architecture settings (for smaller or
fine-tuned checkpoints of the same family).
"""

import torch

from .base import Denoiser
from .files import load_checkpoint, load_strict, resolve_model_file, sidecar_config
from .networks_adm import create_adm_classifier, create_adm_unet, create_cm_unet

URLS = {
    'lsun_bedroom': 'https://openaipublic.blob.core.windows.net/consistency/edm_bedroom256_ema.pt',
    'lsun_cat': 'https://openaipublic.blob.core.windows.net/consistency/edm_cat256_ema.pt',
    'imagenet256': 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion.pt',
    'imagenet256-classifier': 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_classifier.pt',
}

# Official architecture settings (the fixtures' configs).
CM_CONFIG = dict(image_size=256, num_channels=256, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                 num_head_channels=64, attention_resolutions='32,16,8', channel_mult='', dropout=0.0,
                 class_cond=False, use_scale_shift_norm=False, resblock_updown=True, use_fp16=False,
                 use_new_attention_order=False, learn_sigma=False)
ADM_CONFIG = dict(image_size=256, num_channels=256, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                  num_head_channels=64, attention_resolutions='32,16,8', channel_mult='', dropout=0.0,
                  class_cond=True, use_scale_shift_norm=True, resblock_updown=True, use_fp16=False,
                  use_new_attention_order=False, learn_sigma=True)
CLASSIFIER_CONFIG = dict(image_size=256, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                         classifier_attention_resolutions='32,16,8', classifier_use_scale_shift_norm=True,
                         classifier_resblock_updown=True, classifier_pool='attention')


def load_state_dict_file(path, what):
    """A state-dict checkpoint (path or URL, cached) on the CPU, code-free; returns (state, local path)."""
    local = resolve_model_file(path)
    return load_checkpoint(local, what), local


def _config_for(local_path, default):
    """The official config, overridden by ``<file>.json``'s ``config`` when present."""
    return dict(default, **sidecar_config(local_path))


def _build(factory, state, config, path, what):
    config = dict(config)
    extra = {k: config.pop(k) for k in ('num_classes', 'in_channels') if k in config}
    try:
        net = factory(config, **extra)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    load_strict(net, state, path, what)
    return net.eval().requires_grad_(False)


def _fp16(net, use_fp16, device):
    if use_fp16:
        if torch.device(device).type != 'cuda':
            raise ValueError('use_fp16 needs a CUDA device')
        net.convert_to_fp16()
    return net


class CMDenoiser(Denoiser):
    """Consistency-Models EDM-trained U-Net: D = c_skip x + c_out F(c_in x; 1000 ln(sigma)/4)."""

    sigma_data = 0.5

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.img_resolution = int(unet.image_size)
        self.img_channels = int(unet.in_channels)
        self.label_dim = 0
        self.feature_module = unet.middle_block

    def forward(self, x, sigma, cond=None):
        if cond is not None:
            raise ValueError('this Consistency-Models U-Net is unconditional')
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        t = 1000 * 0.25 * torch.log(sigma.reshape(-1))
        out = self.unet((c_in * x).to(torch.float32), t)
        return (c_skip * x + c_out * out.to(torch.float32)).to(x.dtype)


class ADMDenoiser(Denoiser):
    """guided-diffusion epsilon model through the continuous VP form, with classifier guidance.

    sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) for t in [1e-3, 1]; the network sees
    x_in = x / sqrt(sigma^2 + 1) at timestep (M-1) t; epsilon is the first 3 of its 6 output
    channels; with guidance, eps' = eps - sqrt(1 - alpha_bar) * w * grad log p(y | x_in), alpha_bar =
    1/(1+sigma^2); D = x - sigma eps', clamped to [-1, 1] (the official code, CGPrecond).
    Class labels are integers (B,)."""

    beta_d, beta_min, M, epsilon_t = 19.9, 0.1, 1000, 1e-3

    def __init__(self, unet, classifier=None, guidance_rate=0.0):
        super().__init__()
        self.unet, self.classifier = unet, classifier
        self.guidance_rate = float(guidance_rate or 0.0)
        self.img_resolution = int(unet.image_size)
        self.img_channels = int(unet.in_channels)
        self.label_dim = int(unet.num_classes)
        self.sigma_min = float(self.t_to_sigma(torch.tensor(self.epsilon_t, dtype=torch.float64)))
        self.sigma_max = float(self.t_to_sigma(torch.tensor(1.0, dtype=torch.float64)))
        self.feature_module = unet.middle_block

    def t_to_sigma(self, t):
        t = torch.as_tensor(t)
        return torch.sqrt(torch.expm1(self.beta_d * t ** 2 / 2 + self.beta_min * t))

    def sigma_to_t(self, sigma):
        sigma = torch.as_tensor(sigma)
        return (torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)) - self.beta_min) / self.beta_d

    def sample_cond(self, rnd, batch_size, training=False):
        return rnd.randint(self.label_dim, size=[batch_size])

    def forward(self, x, sigma, cond=None):
        if cond is None:
            raise ValueError('the ImageNet-256 model is class-conditional: give integer labels')
        labels = cond.long() if not cond.is_floating_point() else cond.argmax(dim=1)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_to_t(sigma.reshape(-1))
        x_in = (c_in * x).to(torch.float32)
        eps = self.unet(x_in, c_noise, labels)[:, :self.img_channels].to(torch.float32)
        if self.guidance_rate != 0:
            if self.classifier is None:
                raise ValueError('classifier guidance needs a classifier')
            with torch.enable_grad():
                xg = x_in.detach().requires_grad_(True)
                logp = torch.log_softmax(self.classifier(xg, c_noise.detach()).float(), dim=-1)
                grad = torch.autograd.grad(logp[torch.arange(len(labels)), labels].sum(), xg)[0]
            alpha_bar = 1 / (1 + sigma ** 2)
            eps = eps - (1 - alpha_bar).sqrt() * self.guidance_rate * grad
        return (x - sigma * eps).clamp(-1, 1).to(x.dtype)


def load_cm(dataset_name, model_path=None, use_fp16=False, device='cpu'):
    path = model_path or URLS[dataset_name]
    state, local = load_state_dict_file(path, 'Consistency-Models U-Net')
    unet = _build(create_cm_unet, state, _config_for(local, CM_CONFIG), path, 'Consistency-Models U-Net')
    return CMDenoiser(_fp16(unet.to(device), use_fp16, device))


def load_adm(model_path=None, classifier_path=None, guidance_type=None, guidance_rate=None, use_fp16=False,
             device='cpu'):
    path = model_path or URLS['imagenet256']
    state, local = load_state_dict_file(path, 'ADM U-Net')
    unet = _build(create_adm_unet, state, _config_for(local, ADM_CONFIG), path, 'ADM U-Net')
    classifier = None
    if guidance_type == 'cg' and guidance_rate:
        cpath = classifier_path or URLS['imagenet256-classifier']
        cstate, clocal = load_state_dict_file(cpath, 'ADM classifier')
        classifier = _build(create_adm_classifier, cstate, _config_for(clocal, CLASSIFIER_CONFIG), cpath,
                            'ADM classifier')
        classifier = _fp16(classifier.to(device), use_fp16, device)
    elif classifier_path is not None:
        raise ValueError('classifier_path is used only with guidance_type=cg and a non-zero guidance_rate')
    return ADMDenoiser(_fp16(unet.to(device), use_fp16, device), classifier, guidance_rate if classifier else 0.0)
