"""Inception-v3 in the form used for FID: the TensorFlow graph `inception-2015-12-05`.

This is the network of the original FID code (TTUR), as ported to PyTorch by pytorch-fid
("FID Inception"). It differs from torchvision's ImageNet Inception-v3 in three places:

* the pooling branch of the 35x35 (Mixed_5b-d), 17x17 (Mixed_6b-e) and first 8x8 (Mixed_7b)
  blocks averages over the valid pixels of each 3x3 window only (TensorFlow's 'SAME' average
  pooling, i.e. ``count_include_pad=False``);
* the pooling branch of the last block (Mixed_7c) is a 3x3 *max* pooling;
* the classifier has 1008 outputs (the TF graph's label set), not 1000.

Input: uint8 images (N, 3, H, W) in [0, 255]. They are scaled to [0, 1], resized to 299x299
(bilinear, ``align_corners=False``) and mapped to [-1, 1]. Output: the 2048-d average-pooled
features ("pool_3"), or the 1008 class logits.

Module and parameter names equal those of pytorch-fid's FID Inception (torchvision's names:
``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``, ..., ``fc.bias``), so the
state dict ``pt_inception-2015-12-05-*.pth`` loads with ``strict=True``::

    net = FIDInception()
    net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    features = net(images_uint8, return_features=True)          # (N, 2048) float32

The call signature is the one of NVIDIA's ``inception-2015-12-05.pkl`` detector used by EDM.
"""

import torch
import torch.nn.functional as F
from torch import nn

RESOLUTION = 299        # input size of the TF graph
FEATURE_DIM = 2048      # pool_3 features
NUM_CLASSES = 1008      # logits of the TF graph


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in TF), ReLU. Names: ``conv``, ``bn``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _row(cin, cout):
    """1x7 convolution keeping the size."""
    return ConvBN(cin, cout, (1, 7), padding=(0, 3))


def _col(cin, cout):
    """7x1 convolution keeping the size."""
    return ConvBN(cin, cout, (7, 1), padding=(3, 0))


def _tf_avg_pool(x):
    """3x3 stride-1 'SAME' average pooling that ignores the zero padding (TensorFlow's)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


class Mixed35(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_tf_avg_pool(x)),
        ], dim=1)


class Reduce35to17(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class Mixed17(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions (c7 inner channels)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = _row(c7, c7)
        self.branch7x7_3 = _col(c7, 192)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = _col(c7, c7)
        self.branch7x7dbl_3 = _row(c7, c7)
        self.branch7x7dbl_4 = _col(c7, c7)
        self.branch7x7dbl_5 = _row(c7, 192)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                   self.branch7x7dbl_5),
            self.branch_pool(_tf_avg_pool(x)),
        ], dim=1)


class Reduce17to8(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = _row(192, 192)
        self.branch7x7x3_3 = _col(192, 192)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class Mixed8(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 outputs.

    ``pool='avg'`` (Mixed_7b): TF average pooling; ``pool='max'`` (Mixed_7c): 3x3 max pooling,
    as in the 2015-12-05 graph."""

    def __init__(self, in_channels, pool):
        super().__init__()
        if pool not in ('avg', 'max'):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _tf_avg_pool(x) if self.pool == 'avg' else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInception(nn.Module):
    """Inception-v3 of the TF graph ``inception-2015-12-05`` (FID's detector); see the module doc.

    Freshly constructed, the weights are PyTorch's default initialisation (useless for FID): load
    the converted TF weights with :meth:`load_state_dict`, e.g. pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``. The module is put in eval mode (batch norm uses its
    running statistics) and has no gradients by default.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Mixed35(192, pool_features=32)
        self.Mixed_5c = Mixed35(256, pool_features=64)
        self.Mixed_5d = Mixed35(288, pool_features=64)
        self.Mixed_6a = Reduce35to17(288)
        self.Mixed_6b = Mixed17(768, channels_7x7=128)
        self.Mixed_6c = Mixed17(768, channels_7x7=160)
        self.Mixed_6d = Mixed17(768, channels_7x7=160)
        self.Mixed_6e = Mixed17(768, channels_7x7=192)
        self.Mixed_7a = Reduce17to8(768)
        self.Mixed_7b = Mixed8(1280, pool='avg')
        self.Mixed_7c = Mixed8(2048, pool='max')
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval().requires_grad_(False)

    def preprocess(self, images):
        """uint8 (N, 3, H, W) in [0, 255] -> float (N, 3, 299, 299) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'FIDInception expects images (N, 3, H, W), got shape {tuple(images.shape)}')
        x = images.to(self.fc.weight.dtype) / 255
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode='bilinear', align_corners=False)
        return 2 * x - 1

    def forward(self, images, return_features=True):
        """Features (N, 2048) of uint8 images (N, 3, H, W), or with ``return_features=False`` the
        1008 class logits (N, 1008)."""
        x = self.preprocess(images)
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                   self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        features = x.mean(dim=(2, 3))
        return features if return_features else self.fc(features)
