"""The built-in learned model ``toy_unet``: a small EDM U-Net trained on exact samples of the
analytic mixture, shipped with the code.

The analytic mixture (:mod:`models.toy`) has an exact denoiser, exact samples and an exact ODE
solution, but it is not a network: its AMED feature is a pooled image and its denoiser has no
learning error. ``toy_unet`` is the stand-in for a real image network that any machine can run:

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

import io
import json
import math
import os
import subprocess
import sys
import time

import click
import torch
import tqdm

from dnnlib.util import sha256_file
from torch_utils.misc import atomic_write

from .edm import EDMDenoiser
from .networks_edm import build_from_config
from .toy import GaussianMixture, ReferenceODE

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights', 'toy_unet.pt')

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
#: relative: tests/test_toy_unet.py and the quality table of docs/findings.md.
REFERENCE_STEPS_PER_UNIT = 8


def sidecar_path(weights):
    return os.path.splitext(weights)[0] + '.json'


class ToyUNetDenoiser(ReferenceODE, EDMDenoiser):
    """:class:`models.edm.EDMDenoiser` on the toy U-Net, plus its reference ODE solution."""

    steps_per_unit = REFERENCE_STEPS_PER_UNIT

    def __init__(self, net):
        super().__init__(net, feature_block=FEATURE_BLOCK)


def load(path=None):
    """The shipped (or another) toy U-Net checkpoint as a :class:`ToyUNetDenoiser` on the CPU.

    Reads the sidecar beside ``path``, checks the file's sha256 against it, builds the network from
    the sidecar's config and loads the weights with ``weights_only=True``. ValueError (one line,
    naming the file) when a file is missing, the hash differs or the weights do not fit."""
    path = os.fspath(path or WEIGHTS)
    side = sidecar_path(path)
    for f in (path, side):
        if not os.path.isfile(f):
            raise ValueError(f'toy_unet: {f} is missing (rebuild it with: python -m models.toy_unet --out={path})')
    with open(side) as f:
        meta = json.load(f)
    digest = sha256_file(path)
    if digest != meta.get('sha256'):
        raise ValueError(f"toy_unet: {path} has sha256 {digest}, its sidecar {side} says {meta.get('sha256')}")
    state = torch.load(path, map_location='cpu', weights_only=True)
    net = build_from_config(meta['config'], device='cpu')
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f'toy_unet: {path} does not fit the config of {side}: {str(e).splitlines()[0]}') from None
    return ToyUNetDenoiser(net)


def edm_loss(net, x0, generator, P_mean, P_std):
    """EDM's training loss (Karras et al. 2022, eq. 8 with their lambda and ln sigma ~ N(P_mean, P_std^2))."""
    sigma = (torch.randn(x0.shape[0], 1, 1, 1, generator=generator) * P_std + P_mean).exp()
    noise = torch.randn(x0.shape, generator=generator) * sigma
    sd = net.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    return (weight * (net(x0 + noise, sigma) - x0).square()).mean()


def _revision():
    """The code revision (``git describe``) of the checkout this module lies in, or 'unknown'."""
    try:
        out = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def _write_bytes(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def train(out, kimg=RECIPE['kimg'], progress=True, command=None):
    """Train the toy U-Net with :data:`RECIPE` (``kimg`` overrides its length) and write the EMA
    weights to ``out`` and the sidecar beside it. Deterministic for a given machine and thread count."""
    r = dict(RECIPE, kimg=kimg)
    revision = _revision()   # of the code that starts training, not of whatever is checked out at the end
    torch.set_num_threads(r['threads'])
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(r['seed'])
    net = build_from_config(CONFIG, device='cpu').train()
    ema = build_from_config(CONFIG, device='cpu').eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    data = GaussianMixture()
    data_gen = torch.Generator().manual_seed(r['seed'] + 1)
    noise_gen = torch.Generator().manual_seed(r['seed'] + 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=r['lr'], betas=(0.9, 0.999), eps=1e-8)
    steps = max(1, int(round(r['kimg'] * 1000 / r['batch'])))
    warmup = r['warmup_kimg'] * 1000 / r['batch']
    ema_beta = 0.5 ** (r['batch'] / (r['ema_halflife_kimg'] * 1000))
    start = time.time()
    losses = []
    bar = tqdm.tqdm(range(steps), desc='toy_unet', disable=not progress, unit='step')
    for step in bar:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group['lr'] = r['lr'] * scale
        x0 = data.sample(r['batch'], generator=data_gen).float()
        loss = edm_loss(net, x0, noise_gen, r['P_mean'], r['P_std'])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - ema_beta)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f'{sum(losses[-50:]) / len(losses[-50:]):.4f}')
    state = {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}
    buffer = io.BytesIO()   # torch.save names the archive after the file: a buffer keeps the bytes name-free
    torch.save(state, buffer)
    atomic_write(out, lambda p: _write_bytes(p, buffer.getvalue()))
    meta = dict(config=CONFIG, feature_block=FEATURE_BLOCK, recipe=r, command=command, revision=revision,
                torch=torch.__version__, train_seconds=round(time.time() - start, 1),
                final_loss=sum(losses[-100:]) / len(losses[-100:]), sha256=sha256_file(out))
    atomic_write(sidecar_path(out), lambda p: _write_bytes(p, (json.dumps(meta, indent=2) + '\n').encode()))
    return meta


@click.command(context_settings=dict(show_default=True))
@click.option('--out', help='Weights file to write (the sidecar .json goes beside it)', default=WEIGHTS)
@click.option('--kimg', help='Training length in thousands of samples (the recipe: 128)', type=click.FloatRange(min=0, min_open=True),
              default=RECIPE['kimg'])
@click.option('--progress/--no-progress', default=True)
def main(out, kimg, progress):
    """Train the toy_unet checkpoint from scratch (CPU, deterministic)."""
    command = 'python -m models.toy_unet ' + ' '.join(sys.argv[1:])
    meta = train(out, kimg=kimg, progress=progress, command=command.strip())
    print(f"Wrote {out} (sha256 {meta['sha256']}) in {meta['train_seconds']:.0f} s; final loss {meta['final_loss']:.4f}")


if __name__ == '__main__':
    main()
