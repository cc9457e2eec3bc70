"""Tiny latent models in the official file layouts, built offline for the tests.

* Stable Diffusion: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers
  ``CLIPTextModel`` with random weights and a tiny CLIP BPE tokenizer (lower-case letters and digits,
  no merges), written (a) as a diffusers folder (``save_pretrained``) and (b) as an original
  single-file checkpoint: the weights renamed to the CompVis layout (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.transformer.*``, ``alphas_cumprod``), with the
  component configs and the tokenizer in a diffusers-layout folder beside it (as in the Hugging Face
  SD repositories). The renaming below is the inverse of diffusers' single-file converter, written
  from the two layouts' module names; loading through diffusers' converter and getting the same
  network back checks both.
* LDM: our guided-diffusion ``UNetModel`` (LDM's U-Net has the same names) and a diffusers
  ``VQModel`` renamed to the taming/LDM VQ layout, in ``model.ckpt`` (``{'state_dict': ...}``, with
  ``model_ema.*`` EMA weights and optionally ``first_stage_model.*``), a stand-alone VQ checkpoint,
  and the zip files of the official release.
"""

import json
import os
import re
import string
import zipfile

import torch

SD_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
               up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32, attention_head_dim=8,
               norm_num_groups=8)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
              up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(16, 32), layers_per_block=1,
              latent_channels=4, norm_num_groups=8, sample_size=32)
LDM_VQ = dict(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 2,
              up_block_types=['UpDecoderBlock2D'] * 2, block_out_channels=[16, 32], layers_per_block=1,
              latent_channels=3, num_vq_embeddings=64, vq_embed_dim=3, norm_num_groups=8, sample_size=32)
LDM_UNET = dict(image_size=16, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
                attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16)
SD_BETAS = (0.00085, 0.012)
LDM_BETAS = (0.0015, 0.0195)


# ---------------------------------------------------------------------------------------------
# Tokenizer and Stable Diffusion components.

def write_tokenizer(folder):
    """A CLIP BPE tokenizer without merges: every letter/digit is a token (with and without </w>)."""
    os.makedirs(folder, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + '</w>': len(chars) + i for i, c in enumerate(chars)})
    vocab['<|startoftext|>'] = len(vocab)
    vocab['<|endoftext|>'] = len(vocab)
    with open(os.path.join(folder, 'vocab.json'), 'w') as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt'))
    tok.save_pretrained(folder)
    return tok


def sd_components(seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD_UNET)
    vae = AutoencoderKL(**SD_VAE)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=74, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=72,
                                        eos_token_id=73, pad_token_id=73, projection_dim=32))
    # Random (not zero-initialised) output layers, so that every part of the network matters.
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return unet.eval(), vae.eval(), text.eval()


def _scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_start=SD_BETAS[0], beta_end=SD_BETAS[1], beta_schedule='scaled_linear',
                         num_train_timesteps=1000)


def write_sd_folder(folder, seed=0):
    """diffusers layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json."""
    unet, vae, text = sd_components(seed)
    unet.save_pretrained(os.path.join(folder, 'unet'))
    vae.save_pretrained(os.path.join(folder, 'vae'))
    text.save_pretrained(os.path.join(folder, 'text_encoder'))
    write_tokenizer(os.path.join(folder, 'tokenizer'))
    _scheduler().save_pretrained(os.path.join(folder, 'scheduler'))
    with open(os.path.join(folder, 'model_index.json'), 'w') as f:
        json.dump({'_class_name': 'StableDiffusionPipeline'}, f)
    return folder


def _resnet_to_ldm(name):
    for new, old in (('norm1', 'in_layers.0'), ('conv1', 'in_layers.2'), ('time_emb_proj', 'emb_layers.1'),
                     ('norm2', 'out_layers.0'), ('conv2', 'out_layers.3'), ('conv_shortcut', 'skip_connection')):
        if name.startswith(new + '.'):
            return old + name[len(new):]
    raise KeyError(name)


def unet_key_to_ldm(key, config):
    """diffusers UNet2DConditionModel name -> CompVis openaimodel name."""
    per_level = config['layers_per_block'] + 1
    for new, old in (('time_embedding.linear_1', 'time_embed.0'), ('time_embedding.linear_2', 'time_embed.2'),
                     ('conv_in', 'input_blocks.0.0'), ('conv_norm_out', 'out.0'), ('conv_out', 'out.2')):
        if key.startswith(new + '.'):
            return old + key[len(new):]
    if m := re.match(r'down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)', key):
        n = per_level * int(m[1]) + int(m[3]) + 1
        return f'input_blocks.{n}.0.{_resnet_to_ldm(m[4])}' if m[2] == 'resnets' else f'input_blocks.{n}.1.{m[4]}'
    if m := re.match(r'down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)', key):
        return f'input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{m[2]}'
    if m := re.match(r'mid_block\.(resnets|attentions)\.(\d+)\.(.*)', key):
        return f'middle_block.{2 * int(m[2])}.{_resnet_to_ldm(m[3])}' if m[1] == 'resnets' else f'middle_block.1.{m[3]}'
    if m := re.match(r'up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)', key):
        n = per_level * int(m[1]) + int(m[3])
        return f'output_blocks.{n}.0.{_resnet_to_ldm(m[4])}' if m[2] == 'resnets' else f'output_blocks.{n}.1.{m[4]}'
    if m := re.match(r'up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)', key):
        i = int(m[1])
        slot = 2 if 'CrossAttn' in config['up_block_types'][i] else 1
        return f'output_blocks.{per_level * i + per_level - 1}.{slot}.conv.{m[2]}'
    raise KeyError(key)


def autoencoder_key_to_ldm(key, num_up):
    """diffusers AutoencoderKL/VQModel name -> LDM/taming Encoder/Decoder name."""
    def res(r):
        return r.replace('conv_shortcut', 'nin_shortcut')
    if m := re.match(r'(encoder|decoder)\.conv_norm_out\.(.*)', key):
        return f'{m[1]}.norm_out.{m[2]}'
    if m := re.match(r'(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)', key):
        return f'{m[1]}.mid.block_{int(m[2]) + 1}.{res(m[3])}'
    if m := re.match(r'(encoder|decoder)\.mid_block\.attentions\.0\.(.*)', key):
        for new, old in (('group_norm', 'norm'), ('to_q', 'q'), ('to_k', 'k'), ('to_v', 'v'), ('to_out.0', 'proj_out')):
            if m[2].startswith(new + '.'):
                return f'{m[1]}.mid.attn_1.{old}{m[2][len(new):]}'
    if m := re.match(r'encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)', key):
        return f'encoder.down.{m[1]}.block.{m[2]}.{res(m[3])}'
    if m := re.match(r'encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)', key):
        return f'encoder.down.{m[1]}.downsample.{m[2]}'
    if m := re.match(r'decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)', key):
        return f'decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{res(m[3])}'
    if m := re.match(r'decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)', key):
        return f'decoder.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}'
    return key   # conv_in, conv_out, quant_conv, post_quant_conv, quantize.embedding


def autoencoder_to_ldm(model):
    num_up = len(model.config.up_block_types)
    out = {}
    for k, v in model.state_dict().items():
        name = autoencoder_key_to_ldm(k, num_up)
        out[name] = v[:, :, None, None] if '.mid.attn_1.' in name and v.ndim == 2 else v
    return out


def ema_key(name):
    """LDM's LitEma name of ``model.<name>``."""
    return 'model_ema.' + name[len('model.'):].replace('.', '')


def write_sd_single_file(folder, seed=0, fmt='ckpt', ema=False):
    """Original layout: <folder>/model.<fmt> with every weight, plus configs-only component folders
    and the tokenizer (no weights in them). With ``ema`` the raw U-Net weights are perturbed and the
    seed's weights are stored as ``model_ema.*``: loading must pick the EMA ones. Returns the path."""
    unet, vae, text = sd_components(seed)
    os.makedirs(folder, exist_ok=True)
    unet.save_config(os.path.join(folder, 'unet'))
    vae.save_config(os.path.join(folder, 'vae'))
    text.config.save_pretrained(os.path.join(folder, 'text_encoder'))
    write_tokenizer(os.path.join(folder, 'tokenizer'))
    _scheduler().save_config(os.path.join(folder, 'scheduler'))
    state = {}
    for k, v in unet.state_dict().items():
        name = 'model.diffusion_model.' + unet_key_to_ldm(k, unet.config)
        state[name] = v.clone()
        if ema:
            state[ema_key(name)] = v.clone()
            state[name] = v + 0.5 * torch.randn_like(v)
    if ema:
        state['model_ema.decay'] = torch.tensor(0.9999)
        state['model_ema.num_updates'] = torch.tensor(1000)
    state.update({'first_stage_model.' + k: v for k, v in autoencoder_to_ldm(vae).items()})
    state.update({'cond_stage_model.transformer.' + k: v for k, v in text.state_dict().items()})
    from models.latent import linear_alphas_cumprod
    state['alphas_cumprod'] = linear_alphas_cumprod(*SD_BETAS).float()
    path = os.path.join(folder, f'model.{fmt}')
    if fmt == 'safetensors':
        import safetensors.torch
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({'state_dict': state, 'global_step': 470000}, path)
    return path


def write_captions(path, captions):
    import csv
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['', 'image_id', 'id', 'text'])
        for i, c in enumerate(captions):
            w.writerow([i, 1000 + i, 2000 + i, c])
    return path


# ---------------------------------------------------------------------------------------------
# LDM LSUN Bedroom.

class TrainingCallback:
    """Stands for PyTorch Lightning's ModelCheckpoint, which LDM training checkpoints pickle beside
    the weights: torch.load(weights_only=True) refuses it; the loader must read it without running it."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.1)


def ldm_components(seed=0):
    from diffusers import VQModel

    from models.networks_adm import UNetModel
    torch.manual_seed(seed)
    unet = UNetModel(**LDM_UNET)
    with torch.no_grad():   # no zero-initialised layers: every block (and the time input) matters
        for p in unet.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    vq = VQModel(**LDM_VQ)
    return unet.eval(), vq.eval()


def write_ldm(folder, seed=0, first_stage_inside=True, vq_path=None, zip_name=None):
    """<folder>/model.ckpt (+ model.ckpt.json config sidecar) in the LDM layout with EMA weights;
    without ``first_stage_inside`` the VQ weights go to ``vq_path`` (``{'state_dict'}`` with the
    taming keys and a ``loss.*`` entry). With ``zip_name`` the checkpoint and its sidecar are also
    packed into <folder>/<zip_name> as in lsun_bedrooms.zip. Returns (path, unet, vq)."""
    from models.latent import linear_alphas_cumprod
    unet, vq = ldm_components(seed)
    os.makedirs(folder, exist_ok=True)
    state = {}
    for k, v in unet.state_dict().items():
        name = 'model.diffusion_model.' + k
        state[ema_key(name)] = v.clone()
        state[name] = v + 0.5 * torch.randn_like(v)
    state['model_ema.decay'] = torch.tensor(0.9999)
    vq_state = autoencoder_to_ldm(vq)
    if first_stage_inside:
        state.update({'first_stage_model.' + k: v for k, v in vq_state.items()})
    else:
        os.makedirs(os.path.dirname(os.path.abspath(vq_path)), exist_ok=True)
        torch.save({'state_dict': dict(vq_state, **{'loss.logvar': torch.zeros(())})}, vq_path)
    state['alphas_cumprod'] = linear_alphas_cumprod(*LDM_BETAS).float()
    path = os.path.join(folder, 'model.ckpt')
    torch.save({'state_dict': state, 'callbacks': {TrainingCallback: TrainingCallback()}}, path)
    with open(path + '.json', 'w') as f:
        json.dump({'config': {'unet': LDM_UNET, 'first_stage': LDM_VQ}}, f)
    if zip_name:
        with zipfile.ZipFile(os.path.join(folder, zip_name), 'w') as zf:
            zf.write(path, 'model.ckpt')
            zf.write(path + '.json', 'model.ckpt.json')
    return path, unet, vq
