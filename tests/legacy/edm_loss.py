"""Test fixture: stands in for EDM's persistent loss object inside a training pickle. Its source
is embedded in the pickle, so it imports only what EDM's loss module imports."""

import torch

from torch_utils import persistence


@persistence.persistent_class
class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t
