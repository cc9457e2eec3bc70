"""EDM checkpoints (NVlabs/edm network pickles) as :class:`models.base.Denoiser`.

An EDM pickle is a dict whose ``'ema'`` entry is a preconditioned network (VPPrecond, VEPrecond or
EDMPrecond) in NVIDIA's persistence format: unpickling executes the network source embedded in
the file. The official AMED code then sets sigma_min = 0.002 and sigma_max = 80;
so do we.
"""

import torch

from torch_utils import persistence

from .base import Denoiser

EDM_URLS = {
    'cifar10': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl',
    'ffhq': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-ffhq-64x64-uncond-vp.pkl',
    'afhqv2': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-afhqv2-64x64-uncond-vp.pkl',
    'imagenet64': 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl',
}


def load_edm_pickle(path, verbose=True):
    """Load the ``'ema'`` network of an EDM training pickle (path or URL; URLs are cached)."""
    data = persistence.load_pickle(path, 'EDM network', verbose=verbose)
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f"{path}: not an EDM network pickle (no 'ema' entry)")
    return data['ema']


class EDMDenoiser(Denoiser):
    """Wraps an EDM preconditioned network ``net(x, sigma, class_labels)``.

    AMED feature (the official code): the output of ``net.model.enc['8x8_block3']`` for
    unconditional calls and ``net.model.enc['8x8_block2']`` for conditional ones (the official code
    picks the block by whether the call has labels, not by the architecture); ``feature_block``
    names another ``net.model.enc`` block for networks of another layout (the built-in toy U-Net).
    Conditioning: one-hot class labels (B, label_dim), drawn per seed as EDM's generate.py does.
    """

    def __init__(self, net, sigma_min=0.002, sigma_max=80.0, feature_block=None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.img_channels = int(net.img_channels)
        self.img_resolution = int(net.img_resolution)
        self.label_dim = int(net.label_dim)
        block = feature_block or ('8x8_block2' if self.label_dim else '8x8_block3')
        try:
            self.feature_module = net.model.enc[block]
        except (AttributeError, KeyError):
            raise ValueError(f'the EDM network has no model.enc[{block!r}] block for the AMED feature') from None

    def forward(self, x, sigma, cond=None):
        if self.label_dim and cond is None:
            raise ValueError('this EDM model is class-conditional: give one-hot labels')
        return self.net(x, sigma, class_labels=cond).to(x.dtype)

    def sample_cond(self, rnd, batch_size, training=False):
        if not self.label_dim:
            return None
        labels = rnd.randint(self.label_dim, size=[batch_size])
        return torch.eye(self.label_dim, device=labels.device)[labels]
