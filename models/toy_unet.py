"""The built-in learned model ``toy_unet``: a small EDM U-Net trained on exact samples of the
analytic mixture, shipped with the code.

The analytic mixture (:mod:`models.toy`) has an exact denoiser, exact samples and an exact ODE
solution, but it is not a network: its AMED feature is a pooled image and its denoiser has no
learning error. ``toy_unet`` is the stand-in for a real image network that any machine can run,
built as every built-in U-Net is (:mod:`models.builtin_unet`):

* the network is EDM's :class:`~models.networks_edm.EDMPrecond` around a
  :class:`~models.networks_edm.SongUNet` (DDPM++ layout, 3 levels 32/16/8, one block per level),
  trained with EDM's loss on fresh exact samples of ``build('toy')``;
* it loads through the same adapter as the EDM checkpoints (:class:`models.edm.EDMDenoiser`), and
  its AMED feature is a real U-Net bottleneck, the output of ``net.model.enc['8x8_block0']``;
* its checkpoint is code-free: a ``torch.save`` state dict of plain tensors (``weights_only``
  loadable) in ``models/weights/toy_unet.pt`` with a JSON sidecar (config, recipe, command, code
  revision, sha256), checked on every load;
* its reference ODE solution is :func:`models.toy.solve_pf_ode` (RK4 in log sigma) at
  :data:`REFERENCE_STEPS_PER_UNIT` steps per unit of log sigma (see its comment for the doubling check).

Reproduce the checkpoint (CPU, 2 threads, deterministic on the same machine)::

    python -m models.toy_unet --out=models/weights/toy_unet.pt
"""

from . import builtin_unet
from .builtin_unet import BuiltinUNetDenoiser, sha256_file, sidecar_path  # noqa: F401 (this module's interface)
from .toy import GaussianMixture

#: The network: EDM preconditioning with the mixture's data standard deviation (0.416, rounded),
#: DDPM++ backbone at 16 channels, levels 32/16/8, one residual block per level, no attention at the
#: encoder resolutions (the decoder's 8x8 input block has EDM's fixed attention).
CONFIG = dict(
    precond='EDMPrecond', model_type='SongUNet', img_resolution=32, img_channels=3, label_dim=0, sigma_data=0.4,
    model_channels=16, channel_mult=[1, 2, 2], channel_mult_emb=4, num_blocks=1, attn_resolutions=[], dropout=0.0,
    embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
    resample_filter=[1, 1])

#: The AMED feature: the last encoder block at 8x8 (the bottleneck's input), 32 channels.
FEATURE_BLOCK = '8x8_block0'

#: The training recipe (EDM's loss and noise distribution; Adam with a linear warm-up and a cosine
#: decay; EMA of the weights, which is what ships).
RECIPE = dict(kimg=128, batch=64, lr=2e-3, warmup_kimg=8, ema_halflife_kimg=8, P_mean=-1.2, P_std=1.2,
              seed=0, threads=2, data='toy')

#: RK4 steps per unit of lambda = log(sigma) of the reference solution (85 steps, 340 network
#: calls for sigma 80 -> 0.002). The check that doubling them changes the result by under 1e-4
#: relative: tests/test_builtin_unet.py and the quality table of docs/findings.md.
REFERENCE_STEPS_PER_UNIT = 8

SPEC = builtin_unet.UNetSpec(name='toy_unet', config=CONFIG, feature_block=FEATURE_BLOCK, recipe=RECIPE,
                             steps_per_unit=REFERENCE_STEPS_PER_UNIT, make_data=GaussianMixture)
WEIGHTS = SPEC.weights
ToyUNetDenoiser = BuiltinUNetDenoiser
load = SPEC.load
train = SPEC.train

main = builtin_unet.training_cli(SPEC)

if __name__ == '__main__':
    main()
