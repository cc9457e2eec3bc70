"""Time schedules: published formulas, exact end points, the teacher-refinement property."""

import math

import numpy as np
import pytest
import torch

import solver_utils
import solvers
from solver_utils import get_schedule

# Continuous VP maps (EDM's VPPrecond / the official CGPrecond): sigma(t) and its inverse.
BETA_D, BETA_MIN = 19.9, 0.1


def vp_t_to_sigma(t):
    return torch.sqrt(torch.expm1(BETA_D * t ** 2 / 2 + BETA_MIN * t))


def vp_sigma_to_t(sigma):
    return (torch.sqrt(BETA_MIN ** 2 + 2 * BETA_D * torch.log1p(sigma ** 2)) - BETA_MIN) / BETA_D


VP_MAPS = dict(sigma_to_t=vp_sigma_to_t, t_to_sigma=vp_t_to_sigma)
SIGMA_MIN_VP, SIGMA_MAX_VP = float(vp_t_to_sigma(torch.tensor(1e-3, dtype=torch.float64))), \
    float(vp_t_to_sigma(torch.tensor(1.0, dtype=torch.float64)))


@pytest.mark.parametrize('schedule_type', ['polynomial', 'logsnr', 'time_uniform'])
@pytest.mark.parametrize('num_steps', [2, 5, 18])
def test_end_points_exact_and_descending(schedule_type, num_steps):
    t = get_schedule(num_steps, 0.002, 80, schedule_type, 7.0)
    assert t.dtype == torch.float64 and t.shape == (num_steps,)
    assert t[0].item() == 80.0 and t[-1].item() == 0.002
    assert bool((t[1:] < t[:-1]).all())


def test_polynomial_matches_edm_formula():
    n, rho = 6, 7.0
    t = get_schedule(n, 0.002, 80, 'polynomial', rho)
    i = np.arange(n)
    ref = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-14)


def test_logsnr_is_uniform_in_log_sigma_and_ignores_rho():
    t = get_schedule(7, 0.002, 80, 'logsnr', 3.0)
    steps = np.diff(np.log(t.numpy()))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-12)
    assert torch.equal(t, get_schedule(7, 0.002, 80, 'logsnr', 7.0))


def test_time_uniform_matches_published_formula_and_fixes_float32_end():
    n, rho, eps_s = 7, 1.0, 1e-3
    t = get_schedule(n, 0.002, 80, 'time_uniform', rho)
    # DPM-Solver's VP time-uniform schedule, written out independently in numpy float64.
    lmax, lmin = np.log(80 ** 2 + 1), np.log(0.002 ** 2 + 1)
    beta_d = 2 * (lmin / eps_s - lmax) / (eps_s - 1)
    beta_min = lmax - beta_d / 2
    tau = np.linspace(1, eps_s, n)
    ref = np.sqrt(np.exp(beta_d * tau ** 2 / 2 + beta_min * tau) - 1)
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-9)
    # The same formula in float32 (as the official code computes it) misses sigma_min.
    f32 = np.float32
    tau32 = np.linspace(f32(1), f32(eps_s), n, dtype=f32)
    ref32 = np.sqrt(np.exp(f32(beta_d) * tau32 ** 2 / 2 + f32(beta_min) * tau32) - 1)
    assert abs(ref32[-1] - 0.002) > 1e-6
    assert t[-1].item() == 0.002


@pytest.mark.parametrize('rho', [1.0, 2.0])
def test_discrete_schedule_uniform_in_model_time(rho):
    n = 6
    t = get_schedule(n, SIGMA_MIN_VP, SIGMA_MAX_VP, 'discrete', rho, **VP_MAPS)
    assert t[0].item() == SIGMA_MAX_VP and t[-1].item() == SIGMA_MIN_VP
    tau = vp_sigma_to_t(t) ** (1 / rho)
    steps = np.diff(tau.numpy())
    np.testing.assert_allclose(steps, steps[0], rtol=1e-8)
    if rho == 1:   # (1000 t - 1) are the discrete timesteps: 999 ... 0, evenly spaced
        np.testing.assert_allclose((1000 * vp_sigma_to_t(t) - 1).numpy(), np.linspace(999, 0, n), atol=1e-8)


def test_discrete_rho_bug_is_fixed():
    """The official code does not raise T_max to 1/rho, so for rho != 1 its first point is not
    sigma_max; ours starts at sigma_max for every rho (the official code)."""
    rho = 2.0
    t = get_schedule(4, 0.5, 10.0, 'discrete', rho, **VP_MAPS)
    t_max = vp_sigma_to_t(torch.tensor(10.0, dtype=torch.float64))
    t_min = vp_sigma_to_t(torch.tensor(0.5, dtype=torch.float64))
    official_first = vp_t_to_sigma(t_max ** rho)    # (T_max + 0 * (...))^rho, the bug
    assert abs(official_first.item() - 10.0) > 1.0
    assert t[0].item() == 10.0
    u = torch.linspace(0, 1, 4, dtype=torch.float64)
    ours = vp_t_to_sigma((t_max ** (1 / rho) + u * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho)
    np.testing.assert_allclose(t[1:-1].numpy(), ours[1:-1].numpy(), rtol=1e-12)


@pytest.mark.parametrize('schedule_type,rho', [('polynomial', 7.0), ('logsnr', 1.0), ('time_uniform', 1.0),
                                              ('time_uniform', 2.0), ('discrete', 1.0), ('discrete', 3.0)])
@pytest.mark.parametrize('m', [1, 2, 3])
def test_teacher_grid_contains_student_grid(schedule_type, rho, m):
    n = 5
    lo, hi = (SIGMA_MIN_VP, SIGMA_MAX_VP) if schedule_type == 'discrete' else (0.002, 80.0)
    maps = VP_MAPS if schedule_type == 'discrete' else {}
    student = get_schedule(n, lo, hi, schedule_type, rho, **maps)
    teacher = get_schedule((m + 1) * (n - 1) + 1, lo, hi, schedule_type, rho, **maps)
    np.testing.assert_allclose(teacher[::m + 1].numpy(), student.numpy(), rtol=1e-10)


@pytest.mark.parametrize('kwargs,word', [
    (dict(schedule_type='karras'), 'schedule_type'),
    (dict(num_steps=1), 'num_steps'),
    (dict(sigma_min=80.0, sigma_max=0.002), 'sigma_min'),
    (dict(sigma_min=1.0, sigma_max=1.0), 'sigma_min'),
    (dict(sigma_min=0.0), 'sigma_min'),
    (dict(schedule_rho=0.0), 'schedule_rho'),
    (dict(schedule_type='discrete'), 'discrete'),
])
def test_bad_schedule_arguments(kwargs, word):
    args = dict(num_steps=4, sigma_min=0.002, sigma_max=80.0, schedule_type='polynomial', schedule_rho=7.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        get_schedule(**args)


def test_intermediate_time():
    assert solver_utils.intermediate_time(4.0, 1.0, 0.5) == 2.0
    assert solver_utils.intermediate_time(4.0, 1.0, 1.0) == 1.0
    r = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    s = solver_utils.intermediate_time(4.0, 1.0, r)
    np.testing.assert_allclose(s.numpy(), [4.0, 2.0, 1.0], rtol=1e-15)


def test_count_nfe_examples_from_reference():
    assert solvers.count_nfe('amed', 4, afs=True, with_predictor=True) == 5
    assert solvers.count_nfe('ipndm', 4, afs=False, with_predictor=True) == 6
    assert solvers.count_nfe('dpmpp', 6, afs=False, with_predictor=True, calls_per_eval=2) == 20
    assert solvers.count_nfe('ipndm', 6, afs=True) == 4
    assert solvers.count_nfe('dpm', 4, afs=True) == 5
    assert math.isclose(solvers.count_nfe('euler', 4, denoise_to_zero=True), 4)
