"""Pure tensor maths for the ODE solvers: time schedules, the analytical first step (AFS),
Adams-Bashforth (iPNDM) and multistep DPM-Solver(++) updates, dynamic thresholding and the
NFE count. No control flow over time lives here (that is ``solvers.py``).

Notation follows the AMED paper: sigma (also written t) is the EDM/VE noise level,
d(x, sigma) = (x - D(x; sigma)) / sigma is the probability-flow ODE direction,
lambda = -log(sigma) the half log-SNR of the VE form.
"""

import math

import torch

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform', 'discrete')
#: The default schedule of every run (the official README's): EDM's polynomial schedule with rho = 7.
SCHEDULE_TYPE = 'polynomial'
SCHEDULE_RHO = 7.0


# ----------------------------------------------------------------------------------------------
# Time schedules.

def _time_uniform_sigmas(u, sigma_min, sigma_max, rho, eps_s=1e-3):
    """VP-time-uniform schedule (DPM-Solver's 'time_uniform'): uniform in VP time tau^(1/rho),
    mapped to sigma through the linear-beta VP schedule that hits sigma_min at tau=eps_s and
    sigma_max at tau=1. Float64 throughout."""
    log_max = math.log1p(sigma_max ** 2)
    log_min = math.log1p(sigma_min ** 2)
    beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
    beta_min = log_max - beta_d / 2
    tau = (1 + u * (eps_s ** (1 / rho) - 1)) ** rho
    return torch.sqrt(torch.expm1(beta_d * tau ** 2 / 2 + beta_min * tau))


def get_schedule(num_steps, sigma_min, sigma_max, schedule_type=SCHEDULE_TYPE, schedule_rho=SCHEDULE_RHO,
                 sigma_to_t=None, t_to_sigma=None):
    """Return ``num_steps`` descending noise levels from ``sigma_max`` to ``sigma_min`` (float64, CPU).

    Schedules (u_i = i / (num_steps - 1)):

    * ``polynomial`` (EDM): ``(sigma_max^(1/rho) + u_i (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    * ``logsnr``: uniform in log sigma (``schedule_rho`` is not used).
    * ``time_uniform``: uniform in VP time ``tau^(1/rho)`` (see :func:`_time_uniform_sigmas`).
    * ``discrete``: uniform in ``T^(1/rho)`` where T = sigma_to_t(sigma) is the continuous time of a
      discrete-time model; needs the model's ``sigma_to_t`` and ``t_to_sigma`` maps. Unlike the
      official code, T_max is raised to 1/rho as well (the official schedule starts at the
      wrong sigma for rho != 1; identical for rho = 1).

    Each schedule is affine in ``u`` in a transformed variable, so the grid with
    ``(M+1)(num_steps-1)+1`` points contains this grid at every (M+1)-th index.
    Everything is computed in float64 and the end points are exactly ``sigma_max`` and
    ``sigma_min`` (the official float32 computation ends at 0.0020132 instead of 0.002).
    """
    check_schedule_args(num_steps, sigma_min, sigma_max, schedule_type, schedule_rho)
    sigma_min, sigma_max, rho = float(sigma_min), float(sigma_max), float(schedule_rho)
    u = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if schedule_type == 'polynomial':
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        t = (a + u * (b - a)) ** rho
    elif schedule_type == 'logsnr':
        t = torch.exp(math.log(sigma_max) + u * (math.log(sigma_min) - math.log(sigma_max)))
    elif schedule_type == 'time_uniform':
        t = _time_uniform_sigmas(u, sigma_min, sigma_max, rho)
    else:
        if sigma_to_t is None or t_to_sigma is None:
            raise ValueError("schedule_type='discrete' needs a discrete-time model "
                             "(one with sigma_to_t and t_to_sigma maps)")
        t_max = float(sigma_to_t(torch.tensor(sigma_max, dtype=torch.float64)))
        t_min = float(sigma_to_t(torch.tensor(sigma_min, dtype=torch.float64)))
        a, b = t_max ** (1 / rho), t_min ** (1 / rho)
        t = t_to_sigma((a + u * (b - a)) ** rho).to(torch.float64)
    t = t.clone()
    t[0], t[-1] = sigma_max, sigma_min
    return t


def check_schedule_args(num_steps, sigma_min, sigma_max, schedule_type, schedule_rho):
    """Raise ValueError (naming the option) for schedule arguments that make no sense."""
    if schedule_type not in SCHEDULES:
        raise ValueError(f"unknown schedule_type {schedule_type!r} (choose one of {', '.join(SCHEDULES)})")
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'num_steps must be an integer of at least 2, got {num_steps}')
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f'sigma_min ({sigma_min}) must be positive and below sigma_max ({sigma_max})')
    if schedule_type != 'logsnr' and not (schedule_rho > 0 and math.isfinite(schedule_rho)):
        raise ValueError(f'schedule_rho must be positive, got {schedule_rho}')


def check_rho_used(schedule_type, schedule_rho):
    """ValueError (one line) when a ``schedule_rho`` other than the default comes with a schedule
    that does not use it (``logsnr``): the run would silently be the default's. The sampling and
    training entry points call this on the user's options; :func:`get_schedule` itself ignores rho
    there, as the published predictors' settings expect."""
    if schedule_type == 'logsnr' and schedule_rho is not None and float(schedule_rho) != SCHEDULE_RHO:
        raise ValueError(f'--schedule_rho={schedule_rho:g} has no effect with --schedule_type=logsnr (uniform in log '
                         f'sigma): drop --schedule_rho or choose a schedule that uses it')


def intermediate_time(t_cur, t_next, r):
    """The AMED intermediate time s = t_next^r * t_cur^(1-r) (geometric interpolation).

    ``r`` is a python float (computed exactly in float64) or a tensor (computed in its dtype,
    differentiable)."""
    if isinstance(r, torch.Tensor):
        return torch.exp(r * math.log(t_next) + (1 - r) * math.log(t_cur))
    return t_next ** r * t_cur ** (1 - r)


# ----------------------------------------------------------------------------------------------
# Analytical first step.

def afs_direction(x, sigma):
    """Analytical first step (AFS): at sigma_max the ODE direction is approximated by
    d = x / sqrt(1 + sigma^2) (the exact direction for unit-variance zero-mean data), which
    saves the first model evaluation."""
    return x / torch.sqrt(1 + sigma ** 2)


# ----------------------------------------------------------------------------------------------
# iPNDM: Adams-Bashforth with fixed uniform-step coefficients.

AB_COEFFICIENTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def adams_bashforth(outputs, order):
    """Adams-Bashforth combination of the newest-first ``outputs`` (d_n, d_{n-1}, ...) with the
    uniform-step coefficients of the given order (1-4), as iPNDM uses them."""
    coeffs = AB_COEFFICIENTS[order]
    if len(outputs) < order:
        raise ValueError(f'Adams-Bashforth order {order} needs {order} outputs, got {len(outputs)}')
    out = coeffs[0] * outputs[0]
    for c, m in zip(coeffs[1:], outputs[1:]):
        out = out + c * m
    return out


# ----------------------------------------------------------------------------------------------
# Multistep DPM-Solver(++) in sigma (VE) space.

def dpm_multistep_update(x, sigma_to, outputs, sigmas, order, predict_x0=True, scale=1.0, corrected_3m=False):
    """One multistep DPM-Solver++ (``predict_x0``) or DPM-Solver (noise prediction) update of
    ``order`` 1-3 from ``sigmas[0]`` to ``sigma_to``.

    ``outputs``/``sigmas`` are newest first: outputs[0] is the model output at the current point
    sigmas[0] (the data prediction x0, or d = (x - x0)/sigma which is the noise prediction in
    VE form), outputs[1:] the previous ones. With lambda = -log sigma, h = lambda_to - lambda_0 and
    r_k = (lambda_k - lambda_{k+1}) / h, the update is the exponential-integrator formula with the
    DPM-Solver finite differences; ``scale`` (the AMED scale_dir) multiplies only the model terms.

    Order 3 uses D2 = (D1_0 - D1_1) / (r0 + r1) as the official code (and DPM-Solver, k-diffusion)
    do. That D2 estimates h^2 x0''/2 where the phi_3 term needs h^2 x0'', so the official
    third-order update is only second-order accurate (measured: fitted slope 2.0, see
    tests/test_solvers.py). ``corrected_3m=True`` doubles D2, which restores order 3.
    """
    s0 = sigmas[0]
    h = torch.log(s0) - torch.log(sigma_to)
    m0 = outputs[0]
    if order >= 2:
        r0 = (torch.log(sigmas[1]) - torch.log(s0)) / h
        d1_0 = (m0 - outputs[1]) / r0
    if order == 3:
        r1 = (torch.log(sigmas[2]) - torch.log(sigmas[1])) / h
        d1_1 = (outputs[1] - outputs[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (2 if corrected_3m else 1) * (d1_0 - d1_1) / (r0 + r1)
    if predict_x0:
        phi1 = torch.expm1(-h)
        base = (sigma_to / s0) * x
        if order == 1:
            return base - scale * (phi1 * m0)
        if order == 2:
            return base - scale * (phi1 * m0 + 0.5 * phi1 * d1_0)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        return base - scale * (phi1 * m0 - phi2 * d1 + phi3 * d2)
    phi1 = torch.expm1(h)
    if order == 1:
        return x - scale * (sigma_to * phi1 * m0)
    if order == 2:
        return x - scale * (sigma_to * phi1 * m0 + 0.5 * sigma_to * phi1 * d1_0)
    phi2 = phi1 / h - 1
    phi3 = phi2 / h - 0.5
    return x - scale * (sigma_to * (phi1 * m0 + phi2 * d1 + phi3 * d2))


def dpm_multistep_order(step_cur, total_points, max_order, lower_order_final):
    """Order of the multistep DPM-Solver(++) step that lands on grid point ``step_cur``
    (1-based, of ``total_points``), as the official code picks it: warm-up orders 1, 2, ... and,
    with ``lower_order_final``, lower orders on the last steps."""
    if lower_order_final:
        return step_cur if step_cur < max_order else min(max_order, total_points - step_cur)
    return min(max_order, step_cur)


def dynamic_threshold(x0, ratio=0.995, max_val=1.0):
    """Dynamic thresholding (Imagen / DPM-Solver++): per sample, s = max(quantile_ratio(|x0|), max_val),
    then x0 <- clamp(x0, -s, s) / s. Strictly per sample (no batch statistics)."""
    flat = x0.abs().flatten(1)
    n = flat.shape[1]
    srt = flat.sort(dim=1).values
    pos = ratio * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    q = srt[:, lo] + (pos - lo) * (srt[:, hi] - srt[:, lo])   # linear interpolation, as torch.quantile
    s = torch.clamp(q, min=max_val).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
