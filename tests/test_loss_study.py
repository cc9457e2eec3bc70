"""benchmarks/loss_study.py's cached reference solutions belong to the model that made them."""

import os

import torch

from benchmarks import loss_study
from models.toy import GaussianMixture


def test_seed_set_cache_is_per_model(tmp_path):
    """Two models under one name get two cache files (a retrained checkpoint never reads the old
    one's reference); a second call reads the file and returns the same solutions."""
    a, b = GaussianMixture(seed=0), GaussianMixture(seed=1)
    _, _, exact_a = loss_study.seed_set(a, 'evaluation', str(tmp_path), num=2)
    _, _, exact_b = loss_study.seed_set(b, 'evaluation', str(tmp_path), num=2)
    assert len(os.listdir(tmp_path)) == 2
    assert not torch.allclose(exact_a, exact_b)
    latents, _, again = loss_study.seed_set(a, 'evaluation', str(tmp_path), num=2)
    assert len(os.listdir(tmp_path)) == 2 and torch.equal(again, exact_a)
    assert torch.allclose(a.ode_solution_from_noise(latents, a.sigma_max, [a.sigma_min])[-1], exact_a)
