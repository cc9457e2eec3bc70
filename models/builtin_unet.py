"""The built-in learned models (``toy_unet``, ``photo_unet``): small EDM U-Nets shipped with the code.

One recipe for each of them: EDM's :class:`~models.networks_edm.EDMPrecond` around a
:class:`~models.networks_edm.SongUNet`, trained on CPU with EDM's loss on fresh samples of a data
source, the EMA of the weights written as a code-free checkpoint (a ``torch.save`` state dict of
plain tensors, ``weights_only`` loadable) with a JSON sidecar (config, AMED feature block, recipe,
command, code revision, torch version, training time, sha256) that is checked on every load.
Each model is a :class:`UNetSpec`; its module holds the spec and its data source.

Loaded, a model is a :class:`BuiltinUNetDenoiser`: the EDM adapter (:class:`models.edm.EDMDenoiser`,
whose AMED feature is a real U-Net block) plus a reference ODE solution
(:func:`models.toy.solve_pf_ode`, RK4 in log sigma at the spec's steps per unit).
"""

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable

import click
import torch
import tqdm

from dnnlib.util import sha256_file
from torch_utils.misc import atomic_write

from .edm import EDMDenoiser
from .networks_edm import build_from_config
from .toy import ReferenceODE

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """What makes one built-in U-Net: its name (the preset and the ``python -m models.<name>``
    module), network config, AMED feature block, training recipe, reference-ODE accuracy and data.

    ``make_data()`` returns the training data source: an object whose ``sample(n, generator=...)``
    returns (n, C, H, W) images in [-1, 1] (float32 or float64), deterministic per generator state."""
    name: str
    config: dict
    feature_block: str
    recipe: dict
    steps_per_unit: int
    make_data: Callable

    @property
    def weights(self):
        return os.path.join(WEIGHTS_DIR, f'{self.name}.pt')

    @property
    def command(self):
        return f'python -m models.{self.name}'

    def load(self, path=None):
        """The shipped (or another) checkpoint of this model: see :func:`load`."""
        return load(self, path)

    def train(self, out, kimg=None, progress=True, command=None):
        """Train this model's checkpoint from scratch: see :func:`train`."""
        return train(self, out, kimg=kimg, progress=progress, command=command)


def sidecar_path(weights):
    return os.path.splitext(weights)[0] + '.json'


class BuiltinUNetDenoiser(ReferenceODE, EDMDenoiser):
    """:class:`models.edm.EDMDenoiser` on a built-in U-Net, plus its reference ODE solution."""

    def __init__(self, net, spec):
        super().__init__(net, feature_block=spec.feature_block)
        self.steps_per_unit = spec.steps_per_unit


def load(spec, path=None, cls=BuiltinUNetDenoiser):
    """The shipped (or another) checkpoint of ``spec`` as a ``cls`` on the CPU.

    Reads the sidecar beside ``path``, checks the file's sha256 against it, builds the network from
    the sidecar's config and loads the weights with ``weights_only=True``. ValueError (one line,
    naming the file) when a file is missing, the hash differs or the weights do not fit."""
    path = os.fspath(path or spec.weights)
    side = sidecar_path(path)
    for f in (path, side):
        if not os.path.isfile(f):
            raise ValueError(f'{spec.name}: {f} is missing (rebuild it with: {spec.command} --out={path})')
    with open(side) as f:
        meta = json.load(f)
    digest = sha256_file(path)
    if digest != meta.get('sha256'):
        raise ValueError(f"{spec.name}: {path} has sha256 {digest}, its sidecar {side} says {meta.get('sha256')}")
    state = torch.load(path, map_location='cpu', weights_only=True)
    net = build_from_config(meta['config'], device='cpu')
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f'{spec.name}: {path} does not fit the config of {side}: {str(e).splitlines()[0]}') from None
    return cls(net, spec)


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


def train(spec, out, kimg=None, progress=True, command=None):
    """Train ``spec``'s U-Net with its recipe (``kimg`` overrides the length) and write the EMA
    weights to ``out`` and the sidecar beside it. Deterministic for a given machine and thread count.

    The recipe: Adam with a linear warm-up and a cosine decay, EDM's loss and noise distribution,
    an EMA of the weights with a half-life in samples (what ships), fresh data every step."""
    r = dict(spec.recipe, kimg=spec.recipe['kimg'] if kimg is None else kimg)
    revision = _revision()   # of the code that starts training, not of whatever is checked out at the end
    torch.set_num_threads(r['threads'])
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(r['seed'])
    net = build_from_config(spec.config, device='cpu').train()
    ema = build_from_config(spec.config, device='cpu').eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    data = spec.make_data()
    data_gen = torch.Generator().manual_seed(r['seed'] + 1)
    noise_gen = torch.Generator().manual_seed(r['seed'] + 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=r['lr'], betas=(0.9, 0.999), eps=1e-8)
    steps = max(1, int(round(r['kimg'] * 1000 / r['batch'])))
    warmup = r['warmup_kimg'] * 1000 / r['batch']
    ema_beta = 0.5 ** (r['batch'] / (r['ema_halflife_kimg'] * 1000))
    start = time.time()
    losses = []
    bar = tqdm.tqdm(range(steps), desc=spec.name, disable=not progress, unit='step')
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
    meta = dict(config=spec.config, feature_block=spec.feature_block, recipe=r, command=command, revision=revision,
                torch=torch.__version__, train_seconds=round(time.time() - start, 1),
                final_loss=sum(losses[-100:]) / len(losses[-100:]), sha256=sha256_file(out))
    atomic_write(sidecar_path(out), lambda p: _write_bytes(p, (json.dumps(meta, indent=2) + '\n').encode()))
    return meta


def training_cli(spec):
    """The ``python -m models.<name>`` command that trains ``spec``'s checkpoint from scratch."""
    @click.command(context_settings=dict(show_default=True), help=f'Train the {spec.name} checkpoint from scratch '
                   '(CPU, deterministic).')
    @click.option('--out', help='Weights file to write (the sidecar .json goes beside it)', default=spec.weights)
    @click.option('--kimg', help=f"Training length in thousands of samples (the recipe: {spec.recipe['kimg']:g})",
                  type=click.FloatRange(min=0, min_open=True), default=spec.recipe['kimg'])
    @click.option('--progress/--no-progress', default=True)
    def main(out, kimg, progress):
        command = f'{spec.command} ' + ' '.join(sys.argv[1:])
        meta = train(spec, out, kimg=kimg, progress=progress, command=command.strip())
        print(f"Wrote {out} (sha256 {meta['sha256']}) in {meta['train_seconds']:.0f} s; "
              f"final loss {meta['final_loss']:.4f}")
    return main
