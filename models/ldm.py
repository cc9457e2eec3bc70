"""LDM LSUN Bedroom (``lsun_bedroom_ldm``): the unconditional latent-diffusion model of CompVis'
``lsun_bedrooms.zip`` (``model.ckpt``) with the VQ-f4 first stage (``vq-f4.zip``), 3x64x64 latents
decoded to 256x256.

* The U-Net is LDM's ``openaimodel.UNetModel``, which is guided-diffusion's: our own code in
  ``models/networks_adm.py`` loads ``model.diffusion_model.*`` under the official names (EMA weights
  when the checkpoint has them).
* The VQ-f4 autoencoder is diffusers' ``VQModel``; its encoder/decoder weights are converted from
  the LDM layout by diffusers' own converter (``convert_ldm_vae_checkpoint``) plus the codebook
  ``quantize.embedding.weight``. ``decode`` quantises the latent first, as LDM's
  ``decode_first_stage`` does (scale factor 1).
* Noise schedule: the checkpoint's ``alphas_cumprod`` (the linear schedule 0.0015 .. 0.0195 when
  absent), read through :class:`models.latent.DiscreteEpsDenoiser`: sigma 0.03876 .. 83.82.

Files, first match wins: ``--model_path`` (a ``model.ckpt``, the zip, or a URL), else
``./src/lsun_bedroom_ldm/model.ckpt`` (the official placement), else the official zip downloaded to
the cache. The first stage comes from the checkpoint's ``first_stage_model.*`` weights when present,
else ``./models/ldm_models/first_stage_models/vq-f4/model.ckpt`` (the official README's path),
``./src/vq-f4/model.ckpt``, or the downloaded ``vq-f4.zip``. A JSON file ``<model file>.json`` with a
``config`` dict overrides the architecture (keys ``unet``, ``first_stage``, ``linear_start``,
``linear_end``), for other checkpoints of the family.
"""


import torch

from torch_utils import distributed as dist

from .files import find_file, load_checkpoint, load_strict, resolve_model_file, sidecar_config
from .latent import DiscreteEpsDenoiser, linear_alphas_cumprod, strip_prefix, use_ema_weights
from .networks_adm import UNetModel

URLS = {
    'lsun_bedroom_ldm': 'https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip',
    'vq-f4': 'https://ommer-lab.com/files/latent-diffusion/vq-f4.zip',
}
MODEL_CANDIDATES = ['./src/lsun_bedroom_ldm/model.ckpt']
FIRST_STAGE_CANDIDATES = ['./models/ldm_models/first_stage_models/vq-f4/model.ckpt', './src/vq-f4/model.ckpt']

#: lsun_bedrooms-ldm-vq-4: U-Net arguments (attention at downsample rates 8, 4, 2), the VQ-f4
#: autoencoder in diffusers' VQModel terms, and the beta schedule.
CONFIG = dict(
    unet=dict(image_size=64, in_channels=3, out_channels=3, model_channels=224, num_res_blocks=2,
              attention_resolutions=[8, 4, 2], channel_mult=[1, 2, 3, 4], num_head_channels=32),
    first_stage=dict(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=8192, vq_embed_dim=3,
                     block_out_channels=[128, 256, 512], layers_per_block=2, norm_num_groups=32, sample_size=256,
                     down_block_types=['DownEncoderBlock2D'] * 3, up_block_types=['UpDecoderBlock2D'] * 3),
    linear_start=0.0015, linear_end=0.0195, timesteps=1000, scale_factor=1.0,
)


class LDMDenoiser(DiscreteEpsDenoiser):
    """Unconditional LDM: eps = U-Net(x_in, timestep); images through the VQ decoder."""

    latent = True

    def __init__(self, unet, first_stage, alphas_cumprod, scale_factor=1.0):
        super().__init__(alphas_cumprod)
        self.unet, self.first_stage = unet, first_stage
        self.scale_factor = float(scale_factor)
        self.img_channels = int(unet.in_channels)
        self.img_resolution = int(unet.image_size)
        self.feature_module = unet.middle_block

    def eps(self, x_in, timestep, cond):
        if cond is not None:
            raise ValueError('the LDM LSUN Bedroom model is unconditional')
        return self.unet(x_in.to(self.unet.dtype), timestep)

    def decode(self, x):
        dtype = next(self.first_stage.parameters()).dtype
        return self.first_stage.decode((x / self.scale_factor).to(dtype)).sample.float()


def _config_for(path):
    config = dict(CONFIG)
    for k, v in sidecar_config(path).items():
        if k not in config:
            raise ValueError(f'{path}.json: unknown config key {k!r}')
        config[k] = v
    return config


def build_first_stage(state, config, path):
    """diffusers VQModel from an LDM-layout VQ state dict (keys ``encoder.*``, ``decoder.*``, ``quantize.*``, ...)."""
    from diffusers import VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    vq = VQModel.from_config(config)
    converted = convert_ldm_vae_checkpoint(state, vq.config)
    if 'quantize.embedding.weight' in state:
        converted['quantize.embedding.weight'] = state['quantize.embedding.weight']
    load_strict(vq, converted, path, 'VQ first stage')
    return vq


def load_ldm(model_path=None, use_fp16=False, device='cpu'):
    if use_fp16 and torch.device(device).type != 'cuda':
        raise ValueError('use_fp16 needs a CUDA device')
    if model_path is not None:
        path = resolve_model_file(model_path)
    else:
        path = find_file('the LDM LSUN Bedroom checkpoint (model.ckpt of lsun_bedrooms.zip)', MODEL_CANDIDATES,
                         URLS['lsun_bedroom_ldm'], member='model.ckpt')
    state = load_checkpoint(path, 'LDM')
    config = _config_for(path)
    state, used_ema = use_ema_weights(state)
    unet_state = strip_prefix(state, 'model.diffusion_model.')
    if not unet_state:
        raise ValueError(f'{path}: no model.diffusion_model.* weights (not an LDM checkpoint)')
    unet = UNetModel(**config['unet'])
    load_strict(unet, unet_state, path, 'LDM U-Net')

    first_state, first_path = strip_prefix(state, 'first_stage_model.'), path
    if not first_state:
        first_path = find_file('the VQ-f4 first stage (model.ckpt of vq-f4.zip)', FIRST_STAGE_CANDIDATES, URLS['vq-f4'],
                               member='model.ckpt', option='a checkpoint with first_stage_model weights')
        first_state = load_checkpoint(first_path, 'VQ-f4')
    first_state = {k: v for k, v in first_state.items() if not k.startswith('loss.')}
    first_stage = build_first_stage(first_state, config['first_stage'], first_path)

    if 'alphas_cumprod' in state:
        abar = state['alphas_cumprod'].double()
    else:
        abar = linear_alphas_cumprod(config['linear_start'], config['linear_end'], config['timesteps'])
    dist.print0(f"LDM: {path} ({'EMA' if used_ema else 'raw'} U-Net weights), first stage from {first_path}")
    model = LDMDenoiser(unet.eval().requires_grad_(False), first_stage.eval().requires_grad_(False), abar,
                        config['scale_factor'])
    if use_fp16:
        unet.convert_to_fp16()
    return model
