"""The AMED predictor: a ~9k-parameter network that chooses the intermediate time of a student step.

Architecture and parameter names follow the official ``AMED_predictor`` (the official code),
so a state dict of the official class loads into :class:`AMEDPredictor` with ``strict=True``:

    emb(t)    = silu(map_layer0(PE(t)))                      PE: positional embedding of raw sigma
    h         = enc_layer1(silu(enc_layer0(feature)))        feature: (B, 8, 8) -> (B, 64) -> (B, 4)
    out       = [h, emb(t_n), emb(t_{n+1})]                  (B, 20)
    r         = sigmoid(fc_r(out))                           in (0, 1)
    scale_dir = sigmoid(fc_scale_dir(out)) * 2 s_d + (1 - s_d)   in (1 - s_d, 1 + s_d), or 1
    scale_time= sigmoid(fc_scale_time(out)) * 2 s_t + (1 - s_t)  in (1 - s_t, 1 + s_t), or 1

Unlike the official forward, which returns a tuple whose length depends on which heads exist,
:meth:`AMEDPredictor.forward` always returns the triple ``(r, scale_dir, scale_time)`` of shape (B,).
"""

import math
import operator

import torch
from torch.nn.functional import silu

__all__ = ['AMEDPredictor', 'TablePredictor', 'KINDS', 'build_predictor', 'Linear', 'PositionalEmbedding']


# ----------------------------------------------------------------------------------------------
# Layers.

def _weight_init(shape, mode, fan_in, fan_out):
    """EDM-style initialisation: 'xavier_uniform' or 'kaiming_normal' (= sqrt(1/fan_in) N(0,1))."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init_mode {mode!r}')


class Linear(torch.nn.Module):
    """A fully connected layer ``x @ W.t() + b`` with parameters ``weight`` [out, in] and ``bias`` [out].

    The parameters are cast to the input's dtype in the forward (as the official EDM/AMED
    ``Linear``), so an fp16 feature is processed in fp16. The bias starts at zero; its random
    draw is made and discarded so that a given seed consumes the random stream the same way as
    an EDM-style layer.
    """

    def __init__(self, in_features, out_features, init_mode='kaiming_normal'):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(_weight_init([out_features, in_features], **kw))
        self.bias = torch.nn.Parameter(_weight_init([out_features], **kw) * 0)

    def forward(self, x):
        return x @ self.weight.to(x.dtype).t() + self.bias.to(x.dtype)

    def extra_repr(self):
        return f'in_features={self.in_features}, out_features={self.out_features}'


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of a raw value (no parameters), in the order [sin, cos].

    ``freqs = (1/max_positions) ** (k / (C/2 - endpoint))`` for k = 0 .. C/2-1, then
    ``[sin(x f), cos(x f)]``: EDM's [cos, sin] embedding with the halves swapped as its
    MappingNetwork does.
    """

    def __init__(self, num_channels, max_positions=10000, endpoint=True):
        super().__init__()
        half = num_channels // 2
        if num_channels % 2 or half - (1 if endpoint else 0) < 1:
            raise ValueError(f'num_channels must be even and >= {4 if endpoint else 2}, got {num_channels}')
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        """x: (N,) -> (N, num_channels), in x's dtype."""
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        arg = x.reshape(-1, 1) * freqs.to(x.dtype).reshape(1, -1)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


# ----------------------------------------------------------------------------------------------
# The predictor.

class AMEDPredictor(torch.nn.Module):
    """AMED predictor ``(feature (B,8,8), t_cur, t_next) -> (r, scale_dir, scale_time)``, each (B,).

    Args:
        scale_dir: half-width s_d of the direction scale's range (1 - s_d, 1 + s_d); 0 removes
            the ``fc_scale_dir`` head and the scale is 1.
        scale_time: the same for the time scale (``fc_scale_time``).
        hidden_dim: width of the feature encoder (128).
        bottleneck_input_dim: size of the flattened feature (64 = 8 x 8).
        bottleneck_output_dim: size of the encoded feature (4).
        noise_channels: size of the positional embedding of each sigma (8).

    Parameter count with the defaults of the paper: 8929 with the r head only, +21 per scale head.
    """

    needs_feature = True    # the solver hooks the model's 8x8 feature for this predictor

    def __init__(self, scale_dir=0.01, scale_time=0.0, hidden_dim=128, bottleneck_input_dim=64,
                 bottleneck_output_dim=4, noise_channels=8):
        super().__init__()
        self.scale_dir = check_half_width('scale_dir', scale_dir)
        self.scale_time = check_half_width('scale_time', scale_time)
        self.hidden_dim = _positive_int('hidden_dim', hidden_dim)
        self.bottleneck_input_dim = _positive_int('bottleneck_input_dim', bottleneck_input_dim)
        self.bottleneck_output_dim = _positive_int('bottleneck_output_dim', bottleneck_output_dim)
        self.noise_channels = _positive_int('noise_channels', noise_channels)
        if noise_channels % 2 or noise_channels < 4:
            raise ValueError(f'noise_channels must be even and >= 4, got {noise_channels}')

        # Construction order (and thus the use of the random stream) follows the official class.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, max_positions=10000, endpoint=True)
        self.map_layer0 = Linear(noise_channels, noise_channels, init_mode='xavier_uniform')
        self.enc_layer0 = Linear(bottleneck_input_dim, hidden_dim)
        self.enc_layer1 = Linear(hidden_dim, bottleneck_output_dim)
        out_dim = bottleneck_output_dim + 2 * noise_channels
        self.fc_r = Linear(out_dim, 1)
        if self.scale_dir > 0:
            self.fc_scale_dir = Linear(out_dim, 1)
        if self.scale_time > 0:
            self.fc_scale_time = Linear(out_dim, 1)

    def config(self):
        """The constructor arguments as a JSON-serialisable dict: ``AMEDPredictor(**p.config())``."""
        return dict(scale_dir=self.scale_dir, scale_time=self.scale_time, hidden_dim=self.hidden_dim,
                    bottleneck_input_dim=self.bottleneck_input_dim,
                    bottleneck_output_dim=self.bottleneck_output_dim, noise_channels=self.noise_channels)

    def embed_time(self, t, batch_size, device):
        """silu(map_layer0(PE(t))) for one scalar sigma t, repeated to (batch_size, noise_channels).

        The embedding is computed in float32 on ``device`` from the raw sigma (no log)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.numel() != 1:
            raise ValueError(f't_cur and t_next must be scalars shared by the batch, got shape {tuple(t.shape)}')
        emb = silu(self.map_layer0(self.map_noise(t.reshape(1))))
        return emb.expand(batch_size, -1)

    def forward(self, feature, t_cur, t_next, class_labels=None):
        """Predict (r, scale_dir, scale_time) for a batch.

        Args:
            feature: (B, 8, 8) (anything with B x bottleneck_input_dim elements) model feature.
                The layers run in its dtype (an fp16 feature gives an fp16 encoder pass); the
                outputs are float32 for float16/bfloat16/float32 features.
            t_cur, t_next: sigma at the two ends of the interval; python floats or one-element
                tensors, shared by the whole batch.
            class_labels: unused (kept for the official call signature).

        Returns:
            ``(r, scale_dir, scale_time)``, each of shape (B,); a scale whose head is off is 1.
        """
        b = feature.shape[0]
        x = feature.reshape(b, -1)
        if x.shape[1] != self.bottleneck_input_dim:
            raise ValueError(f'feature has {x.shape[1]} elements per sample, '
                             f'expected bottleneck_input_dim={self.bottleneck_input_dim}')
        emb = torch.cat([self.embed_time(t_cur, b, feature.device),
                         self.embed_time(t_next, b, feature.device)], dim=1)
        h = self.enc_layer1(silu(self.enc_layer0(x)))
        out = torch.cat([h, emb], dim=1)    # type promotion: an fp16 bottleneck joins the fp32 embedding

        r = torch.sigmoid(self.fc_r(out))[:, 0]
        if self.scale_dir > 0:
            scale_dir = _scale(self.fc_scale_dir(out)[:, 0], self.scale_dir)
        else:
            scale_dir = torch.ones_like(r)
        if self.scale_time > 0:
            scale_time = _scale(self.fc_scale_time(out)[:, 0], self.scale_time)
        else:
            scale_time = torch.ones_like(r)
        return r, scale_dir, scale_time

    def extra_repr(self):
        return f'scale_dir={self.scale_dir}, scale_time={self.scale_time}'


def _scale(logit, half_width):
    """A scale in (1 - s, 1 + s) from a logit, as the network's heads: sigmoid * 2s + (1 - s)."""
    return torch.sigmoid(logit) * (2 * half_width) + (1 - half_width)


class TablePredictor(torch.nn.Module):
    """The AMED predictor as a table of per-interval scalars instead of a network (EPD-style):
    interval k of the student's schedule ``t_steps`` gets its own r_k = sigmoid(``r[k]``) and scales
    in the same ranges as :class:`AMEDPredictor` (``scale_dir``, ``scale_time`` half-widths; 0 turns
    a scale off). It reads no feature (``needs_feature`` False: the model is not hooked), so every
    sample of an interval gets the same values. It starts at r = 1/2 and both scales 1.

    It is called with an interval of its schedule only: ValueError for any other (t_cur, t_next).
    """

    needs_feature = False

    def __init__(self, t_steps, scale_dir=0.01, scale_time=0.0):
        super().__init__()
        self.t_steps = [float(t) for t in t_steps]
        if len(self.t_steps) < 2 or any(b >= a for a, b in zip(self.t_steps, self.t_steps[1:])):
            raise ValueError('t_steps of a table predictor must be a descending list of at least 2 noise levels')
        self.scale_dir = check_half_width('scale_dir', scale_dir)
        self.scale_time = check_half_width('scale_time', scale_time)
        n = len(self.t_steps) - 1
        self.r = torch.nn.Parameter(torch.zeros(n))
        if self.scale_dir > 0:
            self.scale_dir_logit = torch.nn.Parameter(torch.zeros(n))
        if self.scale_time > 0:
            self.scale_time_logit = torch.nn.Parameter(torch.zeros(n))

    def config(self):
        """The constructor arguments plus ``kind='table'`` (:func:`build_predictor`)."""
        return dict(kind='table', t_steps=self.t_steps, scale_dir=self.scale_dir, scale_time=self.scale_time)

    def interval(self, t_cur, t_next):
        """The index k of the interval [t_cur, t_next] in the table's schedule."""
        t_cur, t_next = float(t_cur), float(t_next)
        for k in range(len(self.t_steps) - 1):
            if math.isclose(self.t_steps[k], t_cur, rel_tol=1e-6) and \
                    math.isclose(self.t_steps[k + 1], t_next, rel_tol=1e-6):
                return k
        raise ValueError(f'the table predictor has no interval [{t_cur:g}, {t_next:g}]: it was trained for the '
                         f'schedule {[round(t, 6) for t in self.t_steps]}')

    def forward(self, feature, t_cur, t_next, class_labels=None):
        """(r, scale_dir, scale_time) of the interval [t_cur, t_next], each (B,) for a (B, ...) feature."""
        k = self.interval(t_cur, t_next)
        ones = torch.ones(feature.shape[0], dtype=torch.float32, device=feature.device)
        r = torch.sigmoid(self.r[k]) * ones
        scale_dir = _scale(self.scale_dir_logit[k], self.scale_dir) * ones if self.scale_dir > 0 else ones
        scale_time = _scale(self.scale_time_logit[k], self.scale_time) * ones if self.scale_time > 0 else ones
        return r, scale_dir, scale_time

    def extra_repr(self):
        return f'intervals={len(self.t_steps) - 1}, scale_dir={self.scale_dir}, scale_time={self.scale_time}'


#: The predictor's forms by ``kind`` (``train.py --predictor``): the paper's network, or the table.
KINDS = {'network': AMEDPredictor, 'table': TablePredictor}


def build_predictor(config):
    """A predictor from its ``config()`` (a snapshot's ``predictor_config``): ``kind`` picks the
    class (default ``network``, which is what a config without ``kind`` is); ValueError for an
    unknown kind."""
    config = dict(config)
    kind = config.pop('kind', 'network')
    if kind not in KINDS:
        raise ValueError(f"unknown predictor kind {kind!r} (choose one of {', '.join(KINDS)})")
    return KINDS[kind](**config)


def check_half_width(name, value):
    """A scale range half-width (scale_dir, scale_time) as a float; ValueError unless finite and in
    [0, 1): the scale's range (1 - s, 1 + s) must stay positive."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be a number in [0, 1), got {value!r}') from None
    if isinstance(value, bool) or not (0 <= v < 1):
        raise ValueError(f'{name} must be a finite number in [0, 1) (the scale range (1 - s, 1 + s) must stay '
                         f'positive), got {value!r}')
    return v


def _positive_int(name, value):
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if isinstance(value, bool) or v is None or v < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    return int(v)
