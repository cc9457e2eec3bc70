"""ADM ("guided-diffusion") networks with the official module and parameter names.

Our own plain-PyTorch implementation of the two networks of Dhariwal & Nichol, "Diffusion
Models Beat GANs on Image Synthesis" (2021), whose released checkpoints AMED samples from:

* ``UNetModel``: the noise-prediction U-Net (e.g. ``256x256_diffusion.pt``, class-conditional,
  learned sigma), and, with ``attention_type='cm'``, the U-Net of OpenAI's Consistency Models
  release (e.g. ``edm_bedroom256_ema.pt``), which uses the same layout except for 1x1 *2-D*
  attention convolutions and a different q/k/v channel order.
* ``EncoderUNetModel``: the noisy-image classifier (e.g. ``256x256_classifier.pt``): the
  encoder half of the U-Net followed by a pooling head (``AttentionPool2d`` for ``'attention'``).

Every module and parameter has the name and type of the official code, so that
``net.load_state_dict(torch.load(official_pt), strict=True)`` works and the module name ->
class-name map equals the manifests in ``tests/fixtures/{adm,cm}-*.json``.

Attention is computed with plain torch operations (no flash-attn, no xformers). The released
Consistency-Models network was trained with flash attention; its ``FlashAttention`` module has
no parameters, and ours computes the same softmax attention (scale ``1/sqrt(head_dim)``).

The factories ``create_adm_unet``, ``create_cm_unet`` and ``create_adm_classifier`` take the
option dictionaries of the official scripts (the ``config`` of the fixture manifests).

This file only imports ``math`` and ``torch`` so that it can run standalone.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

__all__ = [
    'GroupNorm32', 'timestep_embedding', 'TimestepBlock', 'TimestepEmbedSequential',
    'Upsample', 'Downsample', 'ResBlock', 'AttentionBlock', 'QKVAttentionLegacy',
    'QKVAttention', 'FlashAttention', 'QKVFlashAttention', 'AttentionPool2d', 'UNetModel',
    'EncoderUNetModel', 'default_channel_mult', 'parse_channel_mult',
    'parse_attention_resolutions', 'create_adm_unet', 'create_cm_unet',
    'create_adm_classifier', 'NUM_CLASSES',
]

#: Number of ImageNet classes of the class-conditional checkpoints and the classifier.
NUM_CLASSES = 1000

# ---------------------------------------------------------------------------------------------
# Small building blocks.


class GroupNorm32(nn.GroupNorm):
    """Group normalisation that always computes in float32 and returns the input's dtype.

    The official networks keep the normalisation parameters in float32 even when the rest of
    the torso runs in float16; normalising in float32 keeps the statistics accurate.
    """

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    """The standard normalisation layer of the ADM networks: 32 groups over ``channels``."""
    return GroupNorm32(32, channels)


def zero_module(module):
    """Set every parameter of ``module`` to zero (in place) and return the module.

    Used for the last convolution of each residual branch and of the output head, so that a
    freshly initialised network starts as (almost) the identity / zero function.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def conv_nd(dims, *args, **kwargs):
    """A 1-D or 2-D convolution (the official networks only use these two)."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    raise ValueError(f'unsupported number of convolution dimensions: {dims}')


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
        timesteps: a 1-D tensor of N timesteps (any real dtype; computed in float32).
        dim: the embedding width.
        max_period: the longest period; the frequencies are
            ``exp(-log(max_period) * i / half)`` for ``i = 0 .. half - 1``.

    Returns:
        An ``(N, dim)`` float32 tensor ``[cos(t * f), sin(t * f)]`` (cosines first), padded
        with one zero column when ``dim`` is odd.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    angles = timesteps.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def convert_module_to_f16(module):
    """Cast the weight and bias of a convolution to float16 (other modules are left alone).

    As in the official code only convolutions are converted: linear layers (the timestep
    projections inside the residual blocks) and group norms stay in float32.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo ``convert_module_to_f16``: cast a convolution's weight and bias to float32."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def _maybe_checkpoint(function, enabled, *args):
    """Run ``function(*args)``, with activation checkpointing when enabled and training."""
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _softmax_attention(q, k, v):
    """Softmax attention on head-folded tensors.

    Args:
        q, k, v: ``(N, C, T)`` tensors (N = batch * heads, C = channels per head, T = tokens).

    Returns:
        ``(N, C, T)``: for each query position t, ``sum_s softmax_s(q_t . k_s / sqrt(C)) v_s``.

    The ``1/sqrt(C)`` scale is split as ``C**-1/4`` on each of q and k (better behaved in
    float16) and the softmax is taken in float32, as in the official code.
    """
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum('nct,ncs->nts', q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum('nts,ncs->nct', weight, v)


# ---------------------------------------------------------------------------------------------
# Sequential containers that route the timestep embedding.


class TimestepBlock(nn.Module):
    """A module whose ``forward(x, emb)`` also takes the timestep embedding."""

    def forward(self, x, emb):  # pragma: no cover - interface only
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that passes ``emb`` to the children that are ``TimestepBlock``s."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Resampling.


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution ``conv``."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=2, mode='nearest')
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling ``op``: a strided 3x3 convolution, or 2x2 average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError('average-pool downsampling cannot change the channel count')
            self.op = nn.AvgPool2d(kernel_size=2, stride=2) if dims == 2 else \
                nn.AvgPool1d(kernel_size=2, stride=2)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


# ---------------------------------------------------------------------------------------------
# Residual block.


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling.

    Layout (official names): ``in_layers`` = (GroupNorm32, SiLU, conv3x3), ``h_upd`` /
    ``x_upd`` (resampling of the branch / the skip path; one shared ``Identity`` when not
    resampling), ``emb_layers`` = (SiLU, Linear), ``out_layers`` = (GroupNorm32, SiLU, Dropout,
    zero-initialised conv3x3) and ``skip_connection`` (Identity, or a 1x1 / 3x3 conv when the
    channel count changes).

    With ``use_scale_shift_norm`` the embedding gives a (scale, shift) pair applied after the
    first normalisation of ``out_layers`` (``norm(h) * (1 + scale) + shift``); otherwise it is
    added to ``h`` before ``out_layers``.
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False,
                 down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            # One shared module, as in the official code (it is listed once, as ``h_upd``).
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        """``x``: ``(N, C, H, W)`` features; ``emb``: ``(N, emb_channels)`` embedding."""
        return _maybe_checkpoint(self._forward, self.use_checkpoint, x, emb)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the activation and the convolution of ``in_layers``.
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


# ---------------------------------------------------------------------------------------------
# Attention.


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a packed ``(N, heads * 3 * C, T)`` tensor (heads outermost).

    This is the channel order of the guided-diffusion checkpoints
    (``use_new_attention_order=False``): each head's q, k and v are contiguous.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        """``(N, H*3*C, T)`` -> ``(N, H*C, T)``."""
        batch, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(batch * self.n_heads, 3 * ch, length).split(ch, dim=1)
        return _softmax_attention(q, k, v).reshape(batch, -1, length)


class QKVAttention(nn.Module):
    """Multi-head attention on a packed ``(N, 3 * heads * C, T)`` tensor (q/k/v outermost).

    The "new" order (``use_new_attention_order=True``), also used by ``AttentionPool2d``.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        """``(N, 3*H*C, T)`` -> ``(N, H*C, T)``."""
        batch, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(batch * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _softmax_attention(q, k, v).reshape(batch, -1, length)


class FlashAttention(nn.Module):
    """Plain-torch stand-in for flash-attn's ``FlashAttention`` (no parameters).

    Takes the packed ``(B, S, 3, H, D)`` layout of flash-attn and returns ``(B, S, H, D)``:
    softmax attention with scale ``1/sqrt(D)``, no dropout, no mask.
    """

    def forward(self, qkv):
        batch, length, three, heads, dim = qkv.shape
        assert three == 3
        # (B, S, 3, H, D) -> three (B*H, D, S) tensors for the shared attention kernel.
        q, k, v = qkv.permute(2, 0, 3, 4, 1).reshape(3, batch * heads, dim, length)
        out = _softmax_attention(q, k, v)
        return out.reshape(batch, heads, dim, length).permute(0, 3, 1, 2)


class QKVFlashAttention(nn.Module):
    """Multi-head attention with the Consistency-Models (flash) channel order.

    Takes ``(B, 3*H*D, S)`` where the channels are ordered (q/k/v, head, dim) -- like
    ``QKVAttention``, unlike ``QKVAttentionLegacy`` -- and returns ``(B, H*D, S)``.
    """

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.inner_attn = FlashAttention()

    def forward(self, qkv):
        batch, width, length = qkv.shape
        # (B, (3 H D), S) -> (B, S, 3, H, D)
        packed = qkv.reshape(batch, 3, self.num_heads, self.head_dim, length)
        packed = packed.permute(0, 4, 1, 2, 3)
        out = self.inner_attn(packed)  # (B, S, H, D)
        return out.permute(0, 2, 3, 1).reshape(batch, self.num_heads * self.head_dim, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    ``norm`` (GroupNorm32) -> ``qkv`` (1x1 conv to 3x channels) -> ``attention`` ->
    ``proj_out`` (zero-initialised 1x1 conv), added to the input.

    ``attention_type``:
        * ``'legacy'`` (guided-diffusion): 1x1 ``Conv1d`` on the flattened positions;
          ``QKVAttentionLegacy`` unless ``use_new_attention_order`` (then ``QKVAttention``).
        * ``'cm'`` (alias ``'flash'``; Consistency Models): 1x1 ``Conv2d`` and
          ``QKVFlashAttention`` (q/k/v-outermost channel order).
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False, attention_type='legacy'):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f'channels {channels} not divisible by num_head_channels '
                                 f'{num_head_channels}')
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        attention_type = _check_attention_type(attention_type)
        self.attention_type = attention_type

        self.norm = normalization(channels)
        if attention_type == 'cm':
            self.qkv = nn.Conv2d(channels, channels * 3, 1)
            self.attention = QKVFlashAttention(channels, self.num_heads)
            self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))
        else:
            self.qkv = nn.Conv1d(channels, channels * 3, 1)
            if use_new_attention_order:
                self.attention = QKVAttention(self.num_heads)
            else:
                self.attention = QKVAttentionLegacy(self.num_heads)
            self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        """``(N, C, *spatial)`` -> same shape."""
        return _maybe_checkpoint(self._forward, self.use_checkpoint, x)

    def _forward(self, x):
        batch, channels, *spatial = x.shape
        if self.attention_type == 'cm':
            qkv = self.qkv(self.norm(x)).reshape(batch, 3 * channels, -1)
            h = self.attention(qkv).reshape(batch, channels, *spatial)
            return x + self.proj_out(h)
        x = x.reshape(batch, channels, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


def _check_attention_type(attention_type):
    """Normalise the ``attention_type`` option: 'legacy' or 'cm' ('flash' is an alias)."""
    if attention_type == 'flash':
        return 'cm'
    if attention_type not in ('legacy', 'cm'):
        raise ValueError(f"attention_type must be 'legacy' or 'cm', got {attention_type!r}")
    return attention_type


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling head of the classifier.

    The spatial mean is prepended as an extra token, a learned ``positional_embedding``
    (``(C, spacial_dim**2 + 1)``) is added, and multi-head attention (``QKVAttention`` with
    ``embed_dim // num_heads_channels`` heads) is applied; the output of the mean token,
    projected by ``c_proj`` to ``output_dim``, is returned: ``(N, output_dim)``.
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        batch, channels = x.shape[:2]
        x = x.reshape(batch, channels, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


# ---------------------------------------------------------------------------------------------
# The U-Net and the encoder (classifier).


def _prepare_timesteps(timesteps, batch, device):
    """Accept a scalar or a 1-D batch of timesteps; return a 1-D tensor of length ``batch``."""
    timesteps = torch.as_tensor(timesteps, device=device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    if timesteps.shape != (batch,):
        raise ValueError(f'timesteps must be a scalar or of shape ({batch},), '
                         f'got {tuple(timesteps.shape)}')
    return timesteps


class _EncoderTrunk(nn.Module):
    """Shared constructor code: ``time_embed``, ``input_blocks`` and ``middle_block``.

    Not a module of its own in the state dict: the subclasses call ``_build_encoder`` in their
    constructors, so the attributes sit directly on the network (official names).
    """

    def _build_encoder(self, in_channels, model_channels, num_res_blocks,
                       attention_resolutions, dropout, channel_mult, conv_resample, dims,
                       use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm,
                       resblock_updown, use_new_attention_order, attention_type):
        """Build the encoder half; return (channels after it, skip-channel list, final ds)."""
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self._extra_time_modules()

        res = dict(dims=dims, use_checkpoint=use_checkpoint,
                   use_scale_shift_norm=use_scale_shift_norm)
        attn = dict(use_checkpoint=use_checkpoint, num_head_channels=num_head_channels,
                    use_new_attention_order=use_new_attention_order,
                    attention_type=attention_type)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        self._feature_size = ch
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, **res)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, **attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = ResBlock(ch, time_embed_dim, dropout, out_channels=ch, down=True,
                                    **res)
                else:
                    down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, **res),
            AttentionBlock(ch, num_heads=num_heads, **attn),
            ResBlock(ch, time_embed_dim, dropout, **res),
        )
        self._feature_size += ch
        return ch, input_block_chans, ds

    def _extra_time_modules(self):
        """Hook for modules registered right after ``time_embed`` (the U-Net's ``label_emb``)."""

    def _torso(self):
        """The modules whose convolutions ``convert_to_fp16`` converts."""
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self):
        """Convert the convolutions of the torso to float16 (as the official code does).

        The forward then runs the torso in float16; embeddings, linear layers, group norms and
        the output head stay in float32.
        """
        for module in self._torso():
            module.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        """Undo ``convert_to_fp16``."""
        for module in self._torso():
            module.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def _time_embedding(self, timesteps, x):
        """``time_embed`` of the sinusoidal embedding of ``timesteps`` (broadcast to the batch)."""
        timesteps = _prepare_timesteps(timesteps, x.shape[0], x.device)
        return self.time_embed(timestep_embedding(timesteps, self.model_channels))


class UNetModel(_EncoderTrunk):
    """The ADM U-Net (official module names), optionally class-conditional.

    Args:
        image_size: nominal input resolution (only recorded; the net is fully convolutional).
        in_channels, out_channels: image channels in and out (``out_channels = 6`` with a
            learned sigma: epsilon and the variance interpolation).
        model_channels: base width; the timestep embedding is ``4 * model_channels`` wide.
        num_res_blocks: residual blocks per resolution level.
        attention_resolutions: downsample rates (``image_size // resolution``) that get
            self-attention, e.g. ``(8, 16, 32)`` for "32,16,8" at 256x256.
        dropout: dropout inside the residual blocks.
        channel_mult: width multiplier per level (``len`` = number of levels).
        conv_resample: learned 3x3 convs in ``Upsample`` / ``Downsample`` (unused when
            ``resblock_updown``).
        dims: 2 (images); 1 is accepted for 1-D signals.
        num_classes: number of classes for the ``label_emb`` embedding, or None.
        use_checkpoint: activation checkpointing of every block during training.
        use_fp16: the official flag; records the intent. The weights are float32 until
            ``convert_to_fp16()`` is called (as the official scripts do after loading).
        num_heads, num_head_channels, num_heads_upsample: attention heads (a fixed
            per-head width when ``num_head_channels != -1``); ``num_heads_upsample = -1``
            means ``num_heads``.
        use_scale_shift_norm: FiLM-style (scale, shift) conditioning in the residual blocks.
        resblock_updown: resample with residual blocks instead of ``Upsample``/``Downsample``.
        use_new_attention_order: q/k/v-outermost channel order (``QKVAttention``).
        attention_type: ``'legacy'`` (guided-diffusion layout) or ``'cm'`` (Consistency
            Models layout: ``Conv2d`` 1x1 qkv/proj_out and ``QKVFlashAttention``).

    ``forward(x, timesteps, y=None)``: ``x`` ``(N, in_channels, H, W)``, ``timesteps`` a scalar
    or ``(N,)`` real tensor (the sinusoidal embedding takes them as floats), ``y`` ``(N,)``
    integer labels iff class-conditional. Returns ``(N, out_channels, H, W)`` in ``x``'s dtype.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0.0, channel_mult=(1, 2, 4, 8),
                 conv_resample=True, dims=2, num_classes=None, use_checkpoint=False,
                 use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, attention_type='legacy'):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_type = _check_attention_type(attention_type)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.dtype = torch.float32  # the torso's dtype; set by convert_to_fp16/32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.attention_type = attention_type

        time_embed_dim = model_channels * 4
        ch, input_block_chans, ds = self._build_encoder(
            in_channels, model_channels, num_res_blocks, self.attention_resolutions, dropout,
            self.channel_mult, conv_resample, dims, use_checkpoint, num_heads,
            num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, attention_type)

        res = dict(dims=dims, use_checkpoint=use_checkpoint,
                   use_scale_shift_norm=use_scale_shift_norm)
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                out_ch = int(model_channels * mult)
                layers = [ResBlock(ch + skip_ch, time_embed_dim, dropout, out_channels=out_ch,
                                   **res)]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(
                        ch, num_heads=num_heads_upsample, num_head_channels=num_head_channels,
                        use_checkpoint=use_checkpoint,
                        use_new_attention_order=use_new_attention_order,
                        attention_type=attention_type))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(ResBlock(ch, time_embed_dim, dropout, out_channels=ch,
                                               up=True, **res))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        input_ch = int(self.channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def _extra_time_modules(self):
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, self.model_channels * 4)

    def _torso(self):
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(self, x, timesteps, y=None):
        if (y is not None) != (self.num_classes is not None):
            raise ValueError('pass class labels y if and only if the model is class-conditional')
        emb = self._time_embedding(timesteps, x)
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f'y must have shape ({x.shape[0]},), got {tuple(y.shape)}')
            emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class EncoderUNetModel(_EncoderTrunk):
    """The noisy-image classifier: the U-Net's encoder half and a pooling head ``out``.

    Takes the same arguments as ``UNetModel`` (minus the class and decoder options) plus
    ``pool``: ``'attention'`` (``AttentionPool2d``; needs ``num_head_channels``),
    ``'adaptive'`` (global average pool + zero-initialised 1x1 conv), ``'spatial'`` or
    ``'spatial_v2'`` (MLPs on the per-block spatial means). ``out_channels`` is the number
    of classes.

    ``forward(x, timesteps)``: ``(N, in_channels, H, W)`` and a scalar or ``(N,)`` timesteps
    -> ``(N, out_channels)`` logits in ``x``'s dtype.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0.0, channel_mult=(1, 2, 4, 8),
                 conv_resample=True, dims=2, use_checkpoint=False, use_fp16=False,
                 num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, pool='adaptive', attention_type='legacy'):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.dtype = torch.float32  # the torso's dtype; set by convert_to_fp16/32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        ch, _, ds = self._build_encoder(
            in_channels, model_channels, num_res_blocks, self.attention_resolutions, dropout,
            self.channel_mult, conv_resample, dims, use_checkpoint, num_heads,
            num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, _check_attention_type(attention_type))

        self.pool = pool
        if pool == 'adaptive':
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == 'attention':
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == 'spatial':
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        elif pool == 'spatial_v2':
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )
        else:
            raise ValueError(f'unknown pool {pool!r}')

    def forward(self, x, timesteps):
        emb = self._time_embedding(timesteps, x)
        spatial = self.pool.startswith('spatial')
        means = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.type(x.dtype))


# ---------------------------------------------------------------------------------------------
# Factories from the official option dictionaries.

_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# Options of the official scripts that do not change the network (diffusion / sampling ones).
_NON_ARCHITECTURE_KEYS = {
    'source', 'diffusion_steps', 'noise_schedule', 'timestep_respacing', 'use_kl',
    'predict_xstart', 'rescale_timesteps', 'rescale_learned_sigmas', 'sigma_min', 'sigma_max',
    'weight_schedule', 'distillation', 'sigma_data', 'clip_denoised', 'num_samples',
    'batch_size', 'use_ddim', 'model_path', 'classifier_path', 'classifier_scale',
}


def default_channel_mult(image_size):
    """The official per-level width multipliers for a given resolution (64, 128, 256, 512)."""
    try:
        return _DEFAULT_CHANNEL_MULT[int(image_size)]
    except KeyError:
        raise ValueError(f'no default channel_mult for image_size {image_size}; pass '
                         f'channel_mult explicitly') from None


def parse_channel_mult(channel_mult, image_size):
    """``''`` / None -> the default for ``image_size``; ``'1,2,2'`` or a sequence -> tuple."""
    if channel_mult is None or channel_mult == '':
        return default_channel_mult(image_size)
    if isinstance(channel_mult, str):
        return tuple(float(m) if '.' in m else int(m) for m in channel_mult.split(','))
    return tuple(channel_mult)


def parse_attention_resolutions(spec, image_size):
    """Resolutions ('32,16,8' or a sequence of ints) -> downsample rates ``image_size // res``."""
    if isinstance(spec, str):
        spec = [s for s in spec.split(',') if s.strip()]
    return tuple(int(image_size) // int(res) for res in spec)


def _check_keys(config, known, what):
    """Reject keys that are neither architecture options nor known non-architecture ones."""
    unknown = set(config) - set(known) - _NON_ARCHITECTURE_KEYS
    if unknown:
        raise ValueError(f'unknown {what} option(s): {sorted(unknown)}')


_UNET_DEFAULTS = dict(
    num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions='16,8', channel_mult='', dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, learn_sigma=False,
)


def _create_unet(config, attention_type, num_classes, in_channels):
    """Shared body of ``create_adm_unet`` and ``create_cm_unet``."""
    _check_keys(config, set(_UNET_DEFAULTS) | {'image_size'}, 'U-Net')
    c = dict(_UNET_DEFAULTS, **config)
    image_size = c['image_size']
    return UNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=c['num_channels'],
        out_channels=2 * in_channels if c['learn_sigma'] else in_channels,
        num_res_blocks=c['num_res_blocks'],
        attention_resolutions=parse_attention_resolutions(c['attention_resolutions'],
                                                          image_size),
        dropout=c['dropout'],
        channel_mult=parse_channel_mult(c['channel_mult'], image_size),
        num_classes=num_classes if c['class_cond'] else None,
        use_checkpoint=c['use_checkpoint'],
        use_fp16=c['use_fp16'],
        num_heads=c['num_heads'],
        num_head_channels=c['num_head_channels'],
        num_heads_upsample=c['num_heads_upsample'],
        use_scale_shift_norm=c['use_scale_shift_norm'],
        resblock_updown=c['resblock_updown'],
        use_new_attention_order=c['use_new_attention_order'],
        attention_type=attention_type,
    )


def create_adm_unet(config, num_classes=NUM_CLASSES, in_channels=3):
    """Build a guided-diffusion U-Net from the official script options.

    ``config`` keys (official names; missing ones take guided-diffusion's defaults):
    ``image_size`` (required), ``num_channels``, ``num_res_blocks``, ``num_heads``,
    ``num_heads_upsample``, ``num_head_channels``, ``attention_resolutions`` (resolutions,
    e.g. ``'32,16,8'``), ``channel_mult`` (``''`` = default for the size, or ``'1,2,2'``),
    ``dropout``, ``class_cond``, ``use_checkpoint``, ``use_scale_shift_norm``,
    ``resblock_updown``, ``use_fp16``, ``use_new_attention_order``, ``learn_sigma``
    (``out_channels = 2 * in_channels``). Diffusion options and ``source`` are ignored;
    other keys raise ``ValueError``.

    The weights are float32; call ``model.convert_to_fp16()`` for the float16 torso.
    """
    return _create_unet(config, 'legacy', num_classes, in_channels)


def create_cm_unet(config, num_classes=NUM_CLASSES, in_channels=3):
    """Build a Consistency-Models U-Net (same options as ``create_adm_unet``).

    The network is the guided-diffusion U-Net with ``attention_type='cm'``: the attention
    blocks use 1x1 ``Conv2d`` for ``qkv`` / ``proj_out`` and ``QKVFlashAttention`` (computed
    in plain torch here), matching the checkpoints trained with flash attention.
    """
    return _create_unet(config, 'cm', num_classes, in_channels)


_CLASSIFIER_DEFAULTS = dict(
    classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions='32,16,8', classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool='attention',
    # Extensions (not official options): used to build small test networks.
    classifier_channel_mult='', classifier_num_head_channels=64,
)


def create_adm_classifier(config, num_classes=NUM_CLASSES, in_channels=3):
    """Build the guided-diffusion noisy-image classifier from the official script options.

    ``config`` keys (official names; missing ones take guided-diffusion's defaults):
    ``image_size`` (required), ``classifier_use_fp16``, ``classifier_width`` (base channels),
    ``classifier_depth`` (residual blocks per level), ``classifier_attention_resolutions``,
    ``classifier_use_scale_shift_norm``, ``classifier_resblock_updown``, ``classifier_pool``;
    and two extensions: ``classifier_channel_mult`` (``''`` = the default for the size) and
    ``classifier_num_head_channels`` (64, the official value). Returns ``num_classes`` logits.
    """
    _check_keys(config, set(_CLASSIFIER_DEFAULTS) | {'image_size'}, 'classifier')
    c = dict(_CLASSIFIER_DEFAULTS, **config)
    image_size = c['image_size']
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=c['classifier_width'],
        out_channels=num_classes,
        num_res_blocks=c['classifier_depth'],
        attention_resolutions=parse_attention_resolutions(
            c['classifier_attention_resolutions'], image_size),
        channel_mult=parse_channel_mult(c['classifier_channel_mult'], image_size),
        use_fp16=c['classifier_use_fp16'],
        num_head_channels=c['classifier_num_head_channels'],
        use_scale_shift_norm=c['classifier_use_scale_shift_norm'],
        resblock_updown=c['classifier_resblock_updown'],
        pool=c['classifier_pool'],
    )
