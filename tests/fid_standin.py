"""A tiny stand-in for NVIDIA's Inception pickle in the fid.py tests.

Pickled with our persistence, so this module's source is embedded in the pickle: it may import
only torch, numpy and torch_utils.persistence. Called like NVIDIA's detector:
``net(images_uint8 (N, 3, H, W), return_features=True) -> (N, dim)``.
"""

import numpy as np
import torch

from torch_utils import persistence


@persistence.persistent_class
class StandInDetector(torch.nn.Module):
    """Images in [0, 1], average-pooled to 4x4, then a fixed random linear map and tanh (float64)."""

    def __init__(self, dim=16, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.register_buffer('weight', torch.from_numpy(rng.randn(3 * 4 * 4, dim) / 4))
        self.register_buffer('bias', torch.from_numpy(rng.randn(dim) * 0.1))

    def forward(self, images, return_features=True):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3
        assert return_features
        x = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float64) / 255, 4).flatten(1)
        return torch.tanh(x @ self.weight + self.bias)
