"""CLIP image and text towers for the CLIP score, with open_clip's parameter names.

Our own code (no open_clip and no torchvision at run time): the ViT image tower and the causal text
transformer of open_clip's ``CLIP`` class, so that the released open_clip checkpoints (e.g.
``open_clip_pytorch_model.bin`` of ViT-g-14 ``laion2b_s34b_b88k``) load with ``strict=True``:
``visual.conv1.weight``, ``visual.class_embedding``, ``visual.positional_embedding``,
``visual.ln_pre.*``, ``visual.transformer.resblocks.<i>.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}.*``, ``visual.ln_post.*``, ``visual.proj``,
``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.<i>.*``,
``ln_final.*``, ``text_projection``, ``logit_scale``.

* Architecture configs: open_clip's model-config JSON format (``embed_dim``, ``quick_gelu``,
  ``vision_cfg`` {image_size, patch_size, width, layers, head_width, mlp_ratio}, ``text_cfg``
  {context_length, vocab_size, width, heads, layers, mlp_ratio}); the plain ViT variant only
  (class-token pooling, LayerNorm before and after the transformer, argmax/EOT text pooling, no
  layer scale). Any other option is refused with one line rather than silently ignored.
* Image preprocessing (open_clip's eval transform, written with PIL): resize the shortest side to
  the input size (bicubic, the longer side ``int(size * long / short)``), center crop (offsets
  ``int(round((H - size) / 2))``), scale to [0, 1], normalise with the model's mean/std (OpenAI
  CLIP's by default).
* Tokenizer: the OpenAI CLIP BPE (open_clip's ``SimpleTokenizer`` vocabulary), read by transformers'
  ``CLIPTokenizer`` from ``vocab.json``/``merges.txt`` (:func:`load_tokenizer`). The text is cleaned
  as open_clip does first (ftfy ``fix_text``, HTML unescaping twice, whitespace collapsed, lower
  case); ids are ``[SOT] tokens [EOT]`` cut to the context length with EOT kept last, zero-padded.
"""

import html
import json
import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .files import load_strict

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
TOKENIZER_REPO = 'openai/clip-vit-large-patch14'   # the same BPE as open_clip's bundled vocabulary

_TEXT_77 = dict(context_length=77, vocab_size=49408)
# Architectures (open_clip's model configs of the same names).
ARCHITECTURES = {
    'ViT-B-32': dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
                     text_cfg=dict(_TEXT_77, width=512, heads=8, layers=12)),
    'ViT-L-14': dict(embed_dim=768, vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
                     text_cfg=dict(_TEXT_77, width=768, heads=12, layers=12)),
    'ViT-H-14': dict(embed_dim=1024, vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80,
                                                     patch_size=14),
                     text_cfg=dict(_TEXT_77, width=1024, heads=16, layers=24)),
    'ViT-g-14': dict(embed_dim=1024, vision_cfg=dict(image_size=224, layers=40, width=1408, head_width=88,
                                                     mlp_ratio=4.3637, patch_size=14),
                     text_cfg=dict(_TEXT_77, width=1024, heads=16, layers=24)),
    'ViT-bigG-14': dict(embed_dim=1280, vision_cfg=dict(image_size=224, layers=48, width=1664, head_width=104,
                                                        mlp_ratio=4.9231, patch_size=14),
                        text_cfg=dict(_TEXT_77, width=1280, heads=20, layers=32)),
}
_HF = 'https://huggingface.co/laion/{}/resolve/main/open_clip_pytorch_model.bin'
# Released weights: --model name -> (architecture, pretrained tag, URL of the open_clip checkpoint, mean, std).
PRETRAINED = {
    'ViT-g-14': ('ViT-g-14', 'laion2b_s34b_b88k', _HF.format('CLIP-ViT-g-14-laion2B-s34B-b88K'), OPENAI_MEAN,
                 OPENAI_STD),
    'ViT-H-14': ('ViT-H-14', 'laion2b_s32b_b79k', _HF.format('CLIP-ViT-H-14-laion2B-s32B-b79K'), OPENAI_MEAN,
                 OPENAI_STD),
    'ViT-bigG-14': ('ViT-bigG-14', 'laion2b_s39b_b160k', _HF.format('CLIP-ViT-bigG-14-laion2B-39B-b160k'),
                    OPENAI_MEAN, OPENAI_STD),
    'ViT-L-14': ('ViT-L-14', 'laion2b_s32b_b82k', _HF.format('CLIP-ViT-L-14-laion2B-s32B-b82K'), INCEPTION_MEAN,
                 INCEPTION_STD),
    'ViT-B-32': ('ViT-B-32', 'laion2b_s34b_b79k', _HF.format('CLIP-ViT-B-32-laion2B-s34B-b79K'), OPENAI_MEAN,
                 OPENAI_STD),
}
DEFAULT_MODEL = 'ViT-g-14'   # laion2b_s34b_b88k, the official clip_score.py's model

_VISION_KEYS = {'image_size': None, 'patch_size': None, 'width': None, 'layers': None, 'head_width': 64,
                'mlp_ratio': 4.0}
_TEXT_KEYS = {'context_length': 77, 'vocab_size': 49408, 'width': None, 'heads': None, 'layers': None,
              'mlp_ratio': 4.0}
# Options that do not change the eval-time network (training-only) and are accepted as given.
_TRAINING_ONLY = {'patch_dropout', 'timm_drop', 'timm_drop_path'}


def parse_config(cfg, where):
    """Check an open_clip model config (dict) and fill in the defaults: ``(embed_dim, quick_gelu,
    vision, text, mean, std)``. Raises ValueError naming the first option we do not implement."""
    if not isinstance(cfg, dict):
        raise ValueError(f'{where}: a CLIP config must be a JSON object')
    known = {'embed_dim', 'quick_gelu', 'vision_cfg', 'text_cfg', 'preprocess_cfg', 'custom_text'}
    for key in cfg:
        if key not in known:
            raise ValueError(f'{where}: option {key!r} is not supported by our CLIP towers')
    if cfg.get('custom_text'):
        raise ValueError(f"{where}: 'custom_text' (a separate text tower) is not supported by our CLIP towers")

    def section(name, keys):
        given = cfg.get(name)
        if not isinstance(given, dict):
            raise ValueError(f'{where}: {name} must be a JSON object')
        out = {}
        for key, value in given.items():
            if key in _TRAINING_ONLY:
                continue
            if key not in keys:
                raise ValueError(f'{where}: {name}.{key} is not supported by our CLIP towers '
                                 f'(supported: {", ".join(keys)})')
            out[key] = value
        for key, default in keys.items():
            if key not in out:
                if default is None:
                    raise ValueError(f'{where}: {name}.{key} is missing')
                out[key] = default
        return out

    vision, text = section('vision_cfg', _VISION_KEYS), section('text_cfg', _TEXT_KEYS)
    pre = dict(cfg.get('preprocess_cfg') or {})
    mean, std = tuple(pre.pop('mean', OPENAI_MEAN)), tuple(pre.pop('std', OPENAI_STD))
    for key, expected in (('interpolation', 'bicubic'), ('resize_mode', 'shortest'), ('mode', 'RGB')):
        if pre.pop(key, expected) != expected:
            raise ValueError(f'{where}: preprocess_cfg.{key} other than {expected!r} is not supported')
    if pre:
        raise ValueError(f'{where}: preprocess_cfg.{next(iter(pre))} is not supported')
    if vision['width'] % vision['head_width'] or text['width'] % text['heads']:
        raise ValueError(f'{where}: the widths must be multiples of head_width / heads')
    if 'embed_dim' not in cfg:
        raise ValueError(f'{where}: embed_dim is missing')
    return int(cfg['embed_dim']), bool(cfg.get('quick_gelu', False)), vision, text, mean, std


# ----------------------------------------------------------------------------
# The towers.

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP and of open_clip's ``quick_gelu`` models."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention stored as ``torch.nn.MultiheadAttention`` stores it (``in_proj_weight``
    [3D, D] for q, k, v in that order, ``in_proj_bias``, ``out_proj``), computed with
    ``scaled_dot_product_attention`` (batch first)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, causal=False):
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with mlp = c_fc, GELU, c_proj."""

    def __init__(self, width, heads, mlp_ratio, quick_gelu):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module('c_fc', nn.Linear(width, hidden))
        self.mlp.add_module('gelu', QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module('c_proj', nn.Linear(hidden, width))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, quick_gelu):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)])

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    """ViT: patches (conv1, no bias), class token, learned positions, ln_pre, transformer, ln_post
    on the class token, projection ``proj`` [width, embed_dim]."""

    def __init__(self, embed_dim, image_size, patch_size, width, layers, head_width, mlp_ratio, quick_gelu):
        super().__init__()
        self.image_size = image_size
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)                               # (B, grid^2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """open_clip's ``CLIP`` (plain ViT image tower, causal text transformer) for inference:
    :meth:`encode_image` of preprocessed images (B, 3, S, S) and :meth:`encode_text` of token ids
    (B, context_length), both unnormalised (B, embed_dim)."""

    def __init__(self, cfg, where='CLIP config'):
        super().__init__()
        embed_dim, quick_gelu, vision, text, self.mean, self.std = parse_config(cfg, where)
        self.config = cfg
        self.visual = VisionTransformer(embed_dim, quick_gelu=quick_gelu, **vision)
        self.context_length = int(text['context_length'])
        self.token_embedding = nn.Embedding(text['vocab_size'], text['width'])
        self.positional_embedding = nn.Parameter(torch.randn(self.context_length, text['width']) * 0.01)
        self.transformer = Transformer(text['width'], text['layers'], text['heads'], text['mlp_ratio'], quick_gelu)
        self.ln_final = nn.LayerNorm(text['width'])
        self.text_projection = nn.Parameter(torch.randn(text['width'], embed_dim) * text['width'] ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    @property
    def image_size(self):
        return self.visual.image_size

    @property
    def vocab_size(self):
        return self.token_embedding.num_embeddings

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, causal=True))
        eot = ids.argmax(dim=-1)              # the end-of-text token has the largest id of the vocabulary
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


def load_state(net, state, path):
    """Load an open_clip state dict strictly: a ``'module.'`` prefix (DDP training checkpoints) is
    removed and a 1-d ``logit_scale`` reshaped, as open_clip does; anything else must match."""
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    if 'logit_scale' in state:
        state = dict(state, logit_scale=state['logit_scale'].reshape(()))
    return load_strict(net, state, path, 'CLIP')


# ----------------------------------------------------------------------------
# Images.

def preprocess(image, size, mean=OPENAI_MEAN, std=OPENAI_STD):
    """open_clip's eval transform of one uint8 (H, W, 3) image: float32 (3, size, size).

    Shortest side to ``size`` by PIL bicubic (the other side ``int(size * long / short)``), a center
    crop, [0, 1], then (x - mean) / std."""
    h, w = image.shape[:2]
    img = PIL.Image.fromarray(image)
    if min(h, w) != size:
        long = int(size * max(h, w) / min(h, w))
        w, h = (size, long) if w <= h else (long, size)
        img = img.resize((w, h), PIL.Image.Resampling.BICUBIC)
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------
# Text.

def load_tokenizer(folder, what='the CLIP tokenizer'):
    """transformers' ``CLIPTokenizer`` from ``folder`` (``vocab.json``, ``merges.txt``) when it exists,
    else :data:`TOKENIZER_REPO` from the Hugging Face cache, else downloaded (not when
    ``HF_HUB_OFFLINE`` is set). Raises FileNotFoundError with one line saying where to put the files."""
    from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel
    if os.path.isdir(folder):
        try:
            return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f'{folder}: not a CLIP tokenizer ({" ".join(str(e).split())[:200]})') from None
    offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
    for local_only in (True, False) if not offline else (True,):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_REPO, local_files_only=local_only)
            if len(tokenizer) > 1000:   # transformers builds an empty tokenizer when the files are missing
                return tokenizer
        except (OSError, ValueError, TypeError):
            pass
    raise FileNotFoundError(f'{what} not found: put its files (vocab.json, merges.txt) in {folder}/ '
                            f'or let transformers fetch {TOKENIZER_REPO}')


def clean_text(text):
    """open_clip's default text cleaning: ftfy ``fix_text``, HTML unescaped twice, whitespace
    collapsed, lower case."""
    import ftfy  # pylint: disable=import-outside-toplevel
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return ' '.join(text.split()).lower()


def tokenize(tokenizer, texts, context_length):
    """Token ids (N, context_length) int64 as open_clip's tokenizer makes them: start-of-text, the
    BPE tokens, end-of-text; cut to ``context_length`` with the last id set to end-of-text; zeros after."""
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot] + tokenizer(clean_text(text), add_special_tokens=False)['input_ids'] + [eot]
        ids = ids[:context_length]
        ids[-1] = eot
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def read_config(spec):
    """A --model value: a name of :data:`PRETRAINED` -> (config, name, tag, URL); a JSON file in
    open_clip's model-config format -> (config, file name, None, None)."""
    if spec in PRETRAINED:
        arch, tag, url, mean, std = PRETRAINED[spec]
        return dict(ARCHITECTURES[arch], preprocess_cfg=dict(mean=mean, std=std)), arch, tag, url
    if spec.lower().endswith('.json'):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f'--model {spec}: no such file')
        try:
            with open(spec, encoding='utf-8') as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'--model {spec}: not a JSON file ({" ".join(str(e).split())})') from None
        parse_config(cfg, f'--model {spec}')
        return cfg, os.path.basename(spec), None, None
    raise ValueError(f'--model must be one of {", ".join(PRETRAINED)} or an open_clip model-config .json '
                     f'file, got {spec}')
