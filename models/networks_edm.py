"""EDM's denoiser networks, written for this project with the official module and parameter names.

This module reimplements the architectures of Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM, NeurIPS 2022), so that the published EDM checkpoints
(CIFAR-10 and FFHQ/AFHQ ``SongUNet`` with ``VPPrecond``, ImageNet-64 ``DhariwalUNet`` with
``EDMPrecond``) load into it key for key:

* building blocks: :func:`weight_init`, :class:`Linear`, :class:`Conv2d` (with FIR up/down
  resampling), :class:`GroupNorm`, :class:`AttentionOp`, :class:`UNetBlock`,
  :class:`PositionalEmbedding`, :class:`FourierEmbedding`;
* backbones: :class:`SongUNet` (DDPM++ / NCSN++) and :class:`DhariwalUNet` (ADM);
* preconditioners: :class:`VPPrecond`, :class:`VEPrecond`, :class:`EDMPrecond`, which wrap a
  backbone as the denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``;
* :func:`build_from_config`, which builds a preconditioner from a fixture-style config dict.

The state-dict keys, shapes and module names equal those listed in ``fixtures/edm-*.json``.

Self-containment rule: NVIDIA's persistence pickles re-execute a network module's full source
text in a fresh module, so this file imports only numpy, torch and ``torch_utils.persistence``,
uses no relative imports, and defines every class at top level (each nn.Module class is a
persistent class, as in EDM). Classes are looked up by name in ``globals()``.
"""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

# ---------------------------------------------------------------------------------------------
# Weight initialisation.


def weight_init(shape, mode, fan_in, fan_out):
    """Return a freshly drawn weight tensor of the given shape.

    Modes (all zero-mean):
      * ``xavier_uniform``:  U(-a, a) with a = sqrt(6 / (fan_in + fan_out));
      * ``xavier_normal``:   N(0, 2 / (fan_in + fan_out));
      * ``kaiming_uniform``: U(-a, a) with a = sqrt(3 / fan_in);
      * ``kaiming_normal``:  N(0, 1 / fan_in).
    """
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"')


# ---------------------------------------------------------------------------------------------
# Layers.


@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer ``y = x W^T + b`` whose parameters are cast to the input's dtype.

    ``weight`` has shape (out_features, in_features) and is drawn by :func:`weight_init` and
    multiplied by ``init_weight``; ``bias`` (optional) is drawn the same way times ``init_bias``
    (so it is zero with the default ``init_bias=0``).
    """

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        """Apply the layer to the last dimension of ``x``."""
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y.add_(self.bias.to(x.dtype))
        return y


def make_resample_filter(taps):
    """The normalised 2-D FIR filter of shape (1, 1, K, K) built from 1-D taps (outer product,
    divided by the squared sum so that it has unit DC gain)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).unsqueeze(0).unsqueeze(0)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """2-D convolution with optional 2x FIR upsampling (``up``) or downsampling (``down``).

    * ``kernel`` is the (square) kernel size; ``kernel=0`` gives a parameter-free layer that only
      resamples (used for the non-projected skip paths).
    * Resampling uses the fixed filter built from ``resample_filter`` taps (``[1, 1]`` is box /
      nearest, ``[1, 3, 3, 1]`` is bilinear). It is stored as the buffer ``resample_filter`` only
      when ``up`` or ``down`` is set, so that it appears in the state dict like EDM's.
    * Upsampling is a depthwise transposed convolution (stride 2, filter times 4); downsampling a
      depthwise strided convolution. Without ``fused_resample`` the resampling happens before the
      main convolution; with it, upsampling happens before and downsampling after, with padding
      arranged as a single fused operation would.
    * Parameters and filter are cast to the input's dtype.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        assert not (up and down), 'Conv2d cannot both upsample and downsample'
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = None
        self.bias = None
        if kernel:
            w = weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight
            self.weight = torch.nn.Parameter(w)
            if bias:
                self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
        filt = make_resample_filter(list(resample_filter)) if (up or down) else None
        self.register_buffer('resample_filter', filt)

    def _upsample(self, x, f, padding):
        """Depthwise 2x upsampling of ``x`` with filter ``f`` (gain 4 restores the mean)."""
        kernel = (f * 4).tile([x.shape[1], 1, 1, 1])
        return torch.nn.functional.conv_transpose2d(x, kernel, groups=x.shape[1], stride=2, padding=padding)

    def _downsample(self, x, f, padding):
        """Depthwise 2x downsampling of ``x`` with filter ``f``."""
        kernel = f.tile([x.shape[1], 1, 1, 1])
        return torch.nn.functional.conv2d(x, kernel, groups=x.shape[1], stride=2, padding=padding)

    def forward(self, x):
        """Resample (if configured) and convolve ``x``; the output has ``out_channels`` channels."""
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv = torch.nn.functional.conv2d

        if self.fused_resample and self.up and w is not None:
            x = self._upsample(x, f, padding=max(f_pad - w_pad, 0))
            x = conv(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv(x, w, padding=w_pad + f_pad)
            x = self._downsample(x, f, padding=0)
        else:
            if self.up:
                x = self._upsample(x, f, padding=f_pad)
            if self.down:
                x = self._downsample(x, f, padding=f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with EDM's group count rule.

    The number of groups is ``min(num_groups, num_channels // min_channels_per_group)``, so narrow
    layers keep at least ``min_channels_per_group`` channels per group. The affine ``weight``
    starts at one and ``bias`` at zero; both are cast to the input's dtype.
    """

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        """Normalise ``x`` of shape (B, C, ...) over each group of channels and space."""
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """Attention weights ``softmax_k(q . k / sqrt(C))`` computed in float32.

    Inputs ``q`` and ``k`` have shape (N, C, L) (N = batch times heads, L = pixels); the result
    has shape (N, L_q, L_k) and the dtype of ``q``. The backward pass also runs in float32, which
    keeps fp16 training stable.
    """

    @staticmethod
    def forward(ctx, q, k):
        """Return the attention weights (N, L_q, L_k)."""
        scale = 1 / np.sqrt(q.shape[1])
        logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), k.to(torch.float32) * scale)
        w = logits.softmax(dim=2)
        ctx.save_for_backward(q, k, w)
        return w.to(q.dtype)

    @staticmethod
    def backward(ctx, dw):
        """Gradients with respect to ``q`` and ``k`` through the softmax and the dot product."""
        q, k, w = ctx.saved_tensors
        dw = dw.to(torch.float32)
        # Softmax backward: d logits = w * (dw - sum_k(dw * w)).
        dlogits = w * (dw - (dw * w).sum(dim=2, keepdim=True))
        scale = 1 / np.sqrt(q.shape[1])
        dq = torch.einsum('nck,nqk->ncq', k.to(torch.float32), dlogits) * scale
        dk = torch.einsum('ncq,nqk->nck', q.to(torch.float32), dlogits) * scale
        return dq.to(q.dtype), dk.to(k.dtype)


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual U-Net block with timestep-embedding modulation and optional self-attention.

    Main path: GroupNorm -> SiLU -> Conv3x3 (``conv0``, optionally resampling) -> embedding
    injection -> SiLU -> dropout -> Conv3x3 (``conv1``, zero-ish init). The embedding goes through
    ``affine``: with ``adaptive_scale`` it yields a per-channel (scale, shift) pair applied as
    ``norm1(x) * (scale + 1) + shift``; otherwise it is added before ``norm1``.
    The shortcut ``skip`` exists when the channel count changes or the block resamples; it is a
    1x1 convolution when ``resample_proj`` is set or the channels change, else a pure resampler.
    The residual sum is multiplied by ``skip_scale``.

    With attention (``num_heads`` heads, or ``out_channels // channels_per_head`` when
    ``num_heads`` is None) a second residual branch follows: GroupNorm ``norm2`` -> 1x1 ``qkv``
    -> multi-head attention -> 1x1 ``proj``, again times ``skip_scale``.
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True,
                 init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init) if init is not None else dict()
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        init_attn = dict(init_attn) if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:
            self.num_heads = out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        affine_out = out_channels * 2 if adaptive_scale else out_channels
        self.affine = Linear(in_features=emb_channels, out_features=affine_out, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        """Apply the block to ``x`` (B, C_in, H, W) given the embedding ``emb`` (B or 1, E)."""
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            b, c, h, w_ = x.shape
            heads = self.num_heads
            q, k, v = self.qkv(self.norm2(x)).reshape(b * heads, c // heads, 3, -1).unbind(2)
            weights = AttentionOp.apply(q, k)
            attended = torch.einsum('nqk,nck->ncq', weights, v)
            x = self.proj(attended.reshape(b, c, h, w_)).add_(x)
            x = x * self.skip_scale
        return x


# ---------------------------------------------------------------------------------------------
# Noise-level embeddings.


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal (transformer-style) embedding of a scalar per sample.

    ``freqs_i = (1 / max_positions) ** (i / D)`` for ``i < num_channels // 2``, where
    ``D = num_channels // 2 - 1`` with ``endpoint`` (the last frequency is exactly
    1 / max_positions) and ``D = num_channels // 2`` without. The output is
    ``[cos(x f), sin(x f)]`` of shape (B, num_channels).
    """

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        """Embed ``x`` of shape (B,)."""
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier feature embedding (NCSN++): ``[cos(2 pi x f), sin(2 pi x f)]`` with
    fixed frequencies ``f ~ N(0, scale^2)`` stored in the buffer ``freqs``."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        """Embed ``x`` of shape (B,) into (B, num_channels)."""
        angles = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# ---------------------------------------------------------------------------------------------
# Backbones.


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (score SDE), as configured in EDM.

    DDPM++ is ``embedding_type='positional', encoder_type='standard', decoder_type='standard',
    channel_mult_noise=1, resample_filter=[1, 1]``; NCSN++ is ``'fourier', 'residual', 'standard',
    2, [1, 3, 3, 1]``.

    Layout (modules in ``enc`` and ``dec``, keyed ``'{res}x{res}_...'``):
      * encoder level 0: ``_conv`` (3x3 to ``model_channels``); later levels: ``_down``
        (a downsampling :class:`UNetBlock`) plus, for the skip / residual encoders,
        ``_aux_down``/``_aux_skip`` or ``_aux_residual`` acting on the input-image pyramid;
        then ``num_blocks`` blocks ``_block{i}`` with attention at ``attn_resolutions``.
      * decoder: ``_in0`` (with attention) and ``_in1`` at the lowest resolution, ``_up`` at the
        others, then ``num_blocks + 1`` blocks consuming the encoder skips (attention only in the
        last block of a level in ``attn_resolutions``), then ``_aux_norm``/``_aux_conv`` output
        heads (at every level with ``decoder_type='skip'``, with ``_aux_up`` between levels).

    ``forward(x, noise_labels, class_labels, augment_labels=None)`` returns the raw network output
    F of shape (B, out_channels, H, W).
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard',
                 resample_filter=(1, 1)):
        assert embedding_type in ['fourier', 'positional']
        assert encoder_type in ['standard', 'skip', 'residual']
        assert decoder_type in ['standard', 'skip']
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Embedding of noise level, class label and augmentation labels.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        last_level = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == last_level:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < last_level:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        """Return F(x; noise_labels, class_labels) of shape (B, out_channels, H, W)."""
        # Embedding. The positional embedding is [cos, sin]; DDPM++ uses [sin, cos].
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder; ``aux`` carries the input-image pyramid of the skip / residual encoders.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = x + block(aux)
                skips[-1] = x
            elif 'aux_residual' in name:
                x = (x + block(aux)) / np.sqrt(2)
                skips[-1] = x
                aux = x
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; ``aux`` accumulates the output heads.
        aux = None
        head = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                head = block(x)
            elif 'aux_conv' in name:
                head = block(silu(head))
                aux = head if aux is None else head + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol ("Diffusion models beat GANs"), as configured in EDM.

    Same ``enc``/``dec`` naming as :class:`SongUNet`, with ADM's choices: adaptive (scale, shift)
    group-norm modulation, 64 channels per attention head, non-projected resampling shortcuts,
    kaiming-uniform init scaled by sqrt(1/3), the class label added after the noise MLP
    (``map_label``, no bias), and a final ``out_norm``/``out_conv`` head.

    ``forward(x, noise_labels, class_labels, augment_labels=None)`` returns the raw network output
    F of shape (B, out_channels, H, W).
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                            init=init, init_zero=init_zero)

        # Embedding.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=np.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        last_level = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == last_level:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        """Return F(x; noise_labels, class_labels) of shape (B, out_channels, H, W)."""
        # Embedding.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


# ---------------------------------------------------------------------------------------------
# Preconditioners: D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).


class _Precond(torch.nn.Module):
    """Shared machinery of the preconditioners (not one of EDM's classes).

    Subclasses set ``sigma_min``/``sigma_max`` and implement :meth:`coefficients`. The wrapped
    backbone is ``self.model``, built from ``model_type`` (a class name of this module) with
    ``in_channels = out_channels = img_channels``.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type='SongUNet',
                 **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """Return ``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` of shape (B, 1, 1, 1) in float32;
        ``c_noise`` keeps that shape and is flattened by :meth:`forward`."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """Denoise ``x`` (B, C, H, W) at noise level ``sigma`` (scalar or (B,)); returns float32.

        A conditional network given no ``class_labels`` sees zero labels of shape (1, label_dim).
        The backbone runs in float16 when ``use_fp16`` is set, ``force_fp32`` is not, and ``x``
        is on CUDA.
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_half = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        dtype = torch.float16 if use_half else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        """Noise levels usable by the network: every sigma (an identity, as in EDM)."""
        return torch.as_tensor(sigma)


@persistence.persistent_class
class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021, DDPM++) in EDM's sigma space.

    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``, so ``sigma_min = sigma(epsilon_t)``
    and ``sigma_max = sigma(1)``. Like EDM these are evaluated in float32: with the defaults
    ``sigma_min = 0.0009765625`` (float32 rounding of exp(1e-6) - 1; the exact value is about
    0.0010005) and ``sigma_max = 152.16697692871094``.
    ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)``,
    ``c_noise = (M - 1) * sigma_inv(sigma)``.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim=label_dim, use_fp16=use_fp16,
                         model_type=model_type, **model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Evaluated on the CPU in float32 (as EDM does), also when built inside a device context
        # such as ``with torch.device('meta')``, whose tensors hold no values.
        with torch.device('cpu'):
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        """VP coefficients (see the class docstring)."""
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t):
        """Noise level at VP time ``t`` in [epsilon_t, 1]."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """VP time of noise level ``sigma`` (the inverse of :meth:`sigma`)."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


@persistence.persistent_class
class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021, NCSN++).

    ``c_skip = 1``, ``c_out = sigma``, ``c_in = 1``, ``c_noise = log(sigma / 2)``;
    sigma range [0.02, 100] by default.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim=label_dim, use_fp16=use_fp16,
                         model_type=model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        """VE coefficients (see the class docstring)."""
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


@persistence.persistent_class
class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1) with data standard deviation ``sigma_data``.

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = log(sigma) / 4``; the network accepts any
    sigma (``sigma_min = 0``, ``sigma_max = inf``).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim=label_dim, use_fp16=use_fp16,
                         model_type=model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        """EDM coefficients (see the class docstring)."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


# ---------------------------------------------------------------------------------------------
# Construction from a config dict.

PRECOND_CLASSES = ('VPPrecond', 'VEPrecond', 'EDMPrecond')
MODEL_CLASSES = ('SongUNet', 'DhariwalUNet')


def build_from_config(config, device='meta'):
    """Instantiate a preconditioner from a fixture-style config dict.

    ``config`` holds ``precond`` (a preconditioner class name), ``model_type`` (a backbone class
    name), the preconditioner arguments (``img_resolution``, ``img_channels``, ``label_dim``, ...)
    and any backbone keyword arguments (``model_channels``, ``channel_mult``, ...). The network is
    created directly on ``device``; the default ``'meta'`` allocates no memory, which suits shape
    checks and building a skeleton to load a state dict into.
    """
    kwargs = dict(config)
    precond = kwargs.pop('precond')
    if precond not in PRECOND_CLASSES:
        raise ValueError(f'Unknown preconditioner "{precond}"')
    if kwargs.get('model_type', 'SongUNet') not in MODEL_CLASSES:
        raise ValueError(f'Unknown model type "{kwargs["model_type"]}"')
    with torch.device(device):
        return globals()[precond](**kwargs)
