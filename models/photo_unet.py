"""The built-in model of real photographs, ``photo_unet``: a small EDM U-Net trained on 32x32 RGB
crops of the photographs that scikit-image ships with its package.

Where ``toy_unet`` learns the analytic mixture (stationary Gaussians: no edges, objects or
textures), this model learns crops of real photographs: edges, textures, flat regions, specular
highlights, the black surround of a fundus photograph, stars on black. It is built as ``toy_unet``
is (:mod:`models.builtin_unet`): EDM's U-Net, a real U-Net block as AMED feature, a code-free
checkpoint with a sidecar and hash check, a reference ODE solution whose convergence is measured.

Data (:class:`PhotoCrops`): a photograph drawn uniformly from a list, a scale drawn uniformly from
:data:`SCALES` (the photograph average-pooled by that factor), a uniformly placed 32x32 crop, a
horizontal flip with probability 1/2; pixels mapped from [0, 255] to [-1, 1] as EDM's datasets are.
:data:`TRAIN_PHOTOS` train the network; :data:`HELD_OUT_PHOTOS` never do: their crops are the
data of the distribution metrics' noise and blur checks. scikit-image is needed to rebuild the
checkpoint and to draw data, not to sample from the model.

Reproduce the checkpoint (CPU, deterministic on the same machine and thread count)::

    python -m models.photo_unet --out=models/weights/photo_unet.pt
"""

import torch

from . import builtin_unet

#: scikit-image sample photographs (``skimage.data.<name>()``, RGB uint8) that train the model.
#: Their sources and terms, from scikit-image's docstrings: astronaut (NASA, public domain), rocket
#: (SpaceX, public domain), hubble_deep_field (NASA, public domain), immunohistochemistry (no known
#: copyright restrictions), retina (Wikimedia, CC0).
TRAIN_PHOTOS = ('astronaut', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina')

#: Photographs kept out of training, for the metrics' data: chelsea (a cat) and coffee (a cup on
#: wood), both CC0 by their photographers.
HELD_OUT_PHOTOS = ('chelsea', 'coffee')

#: Average-pooling factors applied to a photograph before cropping (a 32x32 crop then covers 32,
#: 64 or 128 pixels of the original).
SCALES = (1, 2, 4)

RESOLUTION = 32


def _load_photo(name):
    try:
        import skimage.data
    except ImportError:
        raise ValueError('photo_unet data needs scikit-image: pip install scikit-image') from None
    image = getattr(skimage.data, name)()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'skimage.data.{name}() is not an RGB photograph (shape {image.shape})')
    return torch.from_numpy(image.copy()).permute(2, 0, 1).to(torch.float64) / 127.5 - 1


class PhotoCrops:
    """Random 32x32 crops of photographs at several scales with horizontal flips, in [-1, 1].

    ``sample(n, generator)`` is deterministic given the generator's state (float64, (n, 3, 32, 32))."""

    def __init__(self, photos=TRAIN_PHOTOS, scales=SCALES, resolution=RESOLUTION):
        self.photos = tuple(photos)
        self.resolution = int(resolution)
        self.levels = []   # one (3, H, W) image per (photograph, scale)
        for name in self.photos:
            image = _load_photo(name)
            for s in scales:
                level = torch.nn.functional.avg_pool2d(image[None], s)[0] if s > 1 else image
                if min(level.shape[1:]) < self.resolution:
                    raise ValueError(f'{name} at scale 1/{s} is smaller than {self.resolution} pixels')
                self.levels.append(level)

    def sample(self, n, generator=None):
        r = self.resolution
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        which = (u[:, 0] * len(self.levels)).long().clamp(max=len(self.levels) - 1)
        out = torch.empty(n, 3, r, r, dtype=torch.float64)
        for i in range(n):
            level = self.levels[which[i]]
            y = int(u[i, 1] * (level.shape[1] - r + 1))
            x = int(u[i, 2] * (level.shape[2] - r + 1))
            crop = level[:, y:y + r, x:x + r]
            out[i] = crop.flip(-1) if u[i, 3] < 0.5 else crop
        return out


def held_out_data():
    """Crops of :data:`HELD_OUT_PHOTOS`: the metrics' data (never seen in training)."""
    return PhotoCrops(HELD_OUT_PHOTOS)


#: The network: EDM preconditioning with sigma_data 0.5 (EDM's value for images in [-1, 1]),
#: DDPM++ backbone at 16 channels, levels 32/16/8, one residual block per level; no attention at the
#: encoder resolutions (the decoder's 8x8 input block has EDM's fixed attention).
CONFIG = dict(
    precond='EDMPrecond', model_type='SongUNet', img_resolution=32, img_channels=3, label_dim=0, sigma_data=0.5,
    model_channels=16, channel_mult=[1, 2, 2], channel_mult_emb=4, num_blocks=1, attn_resolutions=[], dropout=0.0,
    embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
    resample_filter=[1, 1])

SPEC = builtin_unet.UNetSpec(
    name='photo_unet', config=CONFIG,
    feature_block='8x8_block0',   # the last encoder block at 8x8 (the bottleneck's input), 32 channels
    recipe=dict(kimg=200, batch=64, lr=2e-3, warmup_kimg=5, ema_halflife_kimg=5, P_mean=-1.2, P_std=1.2,
                seed=0, threads=1, data='skimage photographs: ' + ', '.join(TRAIN_PHOTOS)),
    steps_per_unit=8,
    make_data=PhotoCrops)

WEIGHTS = SPEC.weights
load = SPEC.load
train = SPEC.train

main = builtin_unet.training_cli(SPEC)

if __name__ == '__main__':
    main()
