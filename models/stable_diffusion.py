"""Stable Diffusion v1.x (``ms_coco``) with classifier-free guidance, from diffusers and transformers.

* Components: diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``, transformers'
  ``CLIPTextModel`` and ``CLIPTokenizer``. Latents 4x64x64, decoded by the VAE (x / 0.18215, the
  VAE config's ``scaling_factor``) to 512x512.
* Files: a diffusers-format folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``), or an original single-file checkpoint (``v1-5-pruned-emaonly.ckpt`` or
  ``.safetensors``; EMA weights used when it has both). A single file is converted by diffusers'
  ``from_single_file`` (U-Net, VAE) and by stripping ``cond_stage_model.transformer.`` (text
  encoder); the component configs come from a diffusers-layout folder next to the file when there is
  one (``unet/config.json`` ...), else from the SD v1 configs shipped in
  ``models/configs/stable-diffusion-v1``. The tokenizer (not part of a single file) comes from
  ``tokenizer/`` next to the file, else from ``openai/clip-vit-large-patch14`` through the Hugging
  Face cache. Nothing is downloaded when the files are local.
* Noise schedule: the checkpoint's ``alphas_cumprod`` (single file) or the scheduler config
  (folder), through :class:`models.latent.DiscreteEpsDenoiser`: sigma 0.029168 .. 14.6146.
* Guidance (the official code): eps = eps_u + w (eps_c - eps_u) from ONE batched U-Net call on
  [unconditional; conditional] inputs, counted as 2 NFE; w = 1 is a single conditional call (1 NFE).
  The unconditional embedding is the empty prompt's. The AMED feature is the U-Net middle block's
  output for the conditional half.
* Prompts: ``--prompt`` (one prompt for every image), or the MS-COCO val2014 30k captions CSV
  (column ``text``): caption i for seed i when sampling, a caption drawn from each trajectory's own
  generator when training.
"""

import contextlib
import csv
import os

import torch

from .clip import load_tokenizer
from .files import find_file, load_checkpoint, resolve_model_file
from .latent import DiscreteEpsDenoiser, strip_prefix, use_ema_weights

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'stable-diffusion-v1')
URLS = {
    # The official runwayml repository is gone; this is its copy under the stable-diffusion-v1-5 organisation.
    'ms_coco': 'https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.ckpt',
    'prompts': 'https://github.com/boomb0om/text2image-benchmark/releases/download/v0.0.1/MS-COCO_val2014_30k_captions.csv',
}
MODEL_CANDIDATES = ['./src/ms_coco/v1-5-pruned-emaonly.ckpt', './src/ms_coco/v1-5-pruned-emaonly.safetensors']
PROMPT_CANDIDATES = ['./src/prompts/MS-COCO_val2014_30k_captions.csv']
TEXT_ENCODER_PREFIX = 'cond_stage_model.transformer.'


def captions_file(prompt_path=None):
    """``prompt_path``, else the MS-COCO val2014 30k captions file (local copy, else the cached download)."""
    return prompt_path or find_file('the MS-COCO captions file', PROMPT_CANDIDATES, URLS['prompts'],
                                    option='--prompt_path')


def load_captions(path):
    """The ``text`` column of a captions CSV, in file order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'prompt file not found: {path}')
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or 'text' not in reader.fieldnames:
            raise ValueError(f"{path}: no 'text' column (columns: {', '.join(reader.fieldnames or [])})")
        captions = [row['text'] for row in reader]
    if not captions:
        raise ValueError(f'{path}: no captions')
    return captions


class StableDiffusion(DiscreteEpsDenoiser):
    """SD v1.x as D(x; sigma) with classifier-free guidance (see the module docstring)."""

    latent = True

    def __init__(self, unet, vae, text_encoder, tokenizer, alphas_cumprod, guidance_rate, captions=None, prompt=None):
        super().__init__(alphas_cumprod)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.guidance_rate = float(guidance_rate)
        self.calls_per_eval = 1 if self.guidance_rate == 1 else 2
        self.captions, self.prompt = captions, prompt
        if captions is None and prompt is None:
            raise ValueError('Stable Diffusion needs prompts: a captions file or one prompt')
        self.img_channels = int(unet.config.in_channels)
        self.img_resolution = int(unet.config.sample_size)
        self.feature_module = unet.mid_block
        self.max_length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
        self._uncond = {}

    @torch.no_grad()
    def encode_prompts(self, prompts, device):
        """CLIP text embeddings (B, 77, 768) of the prompts (last hidden state, padded to max length)."""
        ids = self.tokenizer(list(prompts), padding='max_length', max_length=self.max_length, truncation=True,
                             return_tensors='pt').input_ids.to(device)
        return self.text_encoder(ids)[0].float()

    def uncond_embedding(self, like):
        key = like.device
        if key not in self._uncond:
            self._uncond[key] = self.encode_prompts([''], like.device)
        return self._uncond[key].expand(like.shape[0], *like.shape[1:])

    def prompts_for(self, seeds, rnd=None, training=False):
        """Prompts of a batch: --prompt for all; else caption i for seed i (sampling) or a caption
        drawn from each trajectory's generator (training)."""
        if self.prompt is not None:
            return [self.prompt] * len(seeds)
        if training:
            return [self.captions[i] for i in rnd.randint(len(self.captions), size=[len(seeds)]).tolist()]
        self.check_seeds(seeds)
        return [self.captions[s] for s in seeds]

    def check_seeds(self, seeds):
        if self.prompt is None:
            too_large = [s for s in seeds if not 0 <= s < len(self.captions)]
            if too_large:
                raise ValueError(f'seed {too_large[0]} has no caption: the prompt file has {len(self.captions)} '
                                 f'(seeds 0-{len(self.captions) - 1}); use --prompt for other seeds')

    def sample_cond(self, rnd, batch_size, training=False):
        return self.encode_prompts(self.prompts_for(rnd.seeds[:batch_size], rnd, training), rnd.device)

    def eps(self, x_in, timestep, cond):
        if cond is None:
            raise ValueError('Stable Diffusion needs text embeddings as cond')
        dtype = self.unet.dtype
        if self.calls_per_eval == 1:
            return self.unet(x_in.to(dtype), timestep, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
        context = torch.cat([self.uncond_embedding(cond), cond])
        out = self.unet(torch.cat([x_in, x_in]).to(dtype), torch.cat([timestep, timestep]),
                        encoder_hidden_states=context.to(dtype), return_dict=False)[0]
        eps_u, eps_c = out.float().chunk(2)
        return eps_u + self.guidance_rate * (eps_c - eps_u)

    def amed_feature(self, activation):
        if self.calls_per_eval == 2:   # the U-Net batch is [unconditional; conditional]
            activation = activation[activation.shape[0] // 2:]
        return super().amed_feature(activation)

    def decode(self, x):
        z = x / float(self.vae.config.scaling_factor)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()


@contextlib.contextmanager
def _quiet_libraries():
    """diffusers/transformers log progress and notices on load; keep only errors."""
    import diffusers
    import transformers
    libs = [diffusers.utils.logging, transformers.utils.logging]
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    for lib in libs:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (level, bar) in zip(libs, saved):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def _one_line(e):
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return ' '.join(lines[:2]) if lines else type(e).__name__


def _load_folder(folder):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    for sub in ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise FileNotFoundError(f'{folder}: not a diffusers Stable Diffusion folder (no {sub}/)')
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder='unet', local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder='vae', local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder='text_encoder', local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder='tokenizer', local_files_only=True)
        abar = DDPMScheduler.from_pretrained(folder, subfolder='scheduler', local_files_only=True).alphas_cumprod
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f'{folder}: {_one_line(e)}') from None
    return unet, vae, text_encoder, tokenizer, abar, 'diffusers folder'


def _load_single_file(path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    state, used_ema = use_ema_weights(load_checkpoint(path, 'Stable Diffusion'))
    folder = os.path.dirname(os.path.abspath(path))
    config_dir = folder if os.path.isfile(os.path.join(folder, 'unet', 'config.json')) else CONFIG_DIR
    text_state = {k: v for k, v in strip_prefix(state, TEXT_ENCODER_PREFIX).items() if not k.endswith('position_ids')}
    if not any(k.startswith('model.diffusion_model.') for k in state) or not text_state:
        raise ValueError(f'{path}: not a Stable Diffusion v1 checkpoint (no model.diffusion_model.* or '
                         f'{TEXT_ENCODER_PREFIX}* weights)')
    try:
        unet = UNet2DConditionModel.from_single_file(state, config=config_dir, subfolder='unet', local_files_only=True)
        vae = AutoencoderKL.from_single_file(state, config=config_dir, subfolder='vae', local_files_only=True)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(config_dir, 'text_encoder')))
        text_encoder.load_state_dict(text_state, strict=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f'{path}: does not match the Stable Diffusion configs in {config_dir} ({_one_line(e)})') from None
    if 'alphas_cumprod' in state:
        abar = state['alphas_cumprod']
    else:
        abar = DDPMScheduler.from_pretrained(config_dir, subfolder='scheduler', local_files_only=True).alphas_cumprod
    source = f"single file, {'EMA' if used_ema else 'stored'} U-Net weights, configs from {config_dir}"
    return unet, vae, text_encoder.eval(), load_tokenizer(os.path.join(config_dir, 'tokenizer'),
                                                             'the CLIP tokenizer of a single-file checkpoint'), abar, source


def load_sd(model_path=None, guidance_type='cfg', guidance_rate=None, prompt_path=None, prompt=None, use_fp16=False,
            device='cpu'):
    """Load SD v1.x from ``model_path`` (diffusers folder, single file, zip-free URL) or the default
    places, with the captions of ``prompt_path`` (or the default captions file) unless ``prompt``."""
    from torch_utils import distributed as dist
    if guidance_type != 'cfg' or guidance_rate is None:
        raise ValueError('ms_coco (Stable Diffusion) needs --guidance_type=cfg and --guidance_rate (7.5 in the paper)')
    if prompt is not None and prompt_path is not None:
        raise ValueError('give either --prompt or --prompt_path, not both')
    if use_fp16 and torch.device(device).type != 'cuda':
        raise ValueError('use_fp16 needs a CUDA device')
    captions = None
    if prompt is None:
        captions = load_captions(captions_file(prompt_path))
    if model_path is not None and os.path.isdir(model_path):
        path = model_path
    elif model_path is not None:
        path = resolve_model_file(model_path)
    else:
        path = find_file('the Stable Diffusion v1.5 checkpoint', MODEL_CANDIDATES, URLS['ms_coco'])
    with _quiet_libraries():
        parts = _load_folder(path) if os.path.isdir(path) else _load_single_file(path)
    unet, vae, text_encoder, tokenizer, abar, source = parts
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(f'{path}: the tokenizer has {len(tokenizer)} tokens, the text encoder '
                         f'{text_encoder.config.vocab_size}')
    dist.print0(f'Stable Diffusion: {path} ({source})')
    modules = (unet, vae, text_encoder)
    for m in modules:
        m.eval().requires_grad_(False)
        if use_fp16:
            m.half()
    return StableDiffusion(unet, vae, text_encoder, tokenizer, torch.as_tensor(abar).double(), guidance_rate,
                           captions=captions, prompt=prompt)
