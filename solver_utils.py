"""Pure tensor maths for the ODE solvers: time schedules, the analytical first step (AFS),
Adams-Bashforth (iPNDM, iPNDM_v), multistep DPM-Solver(++), DEIS and UniPC updates and dynamic
thresholding. No control flow over time lives here (that is ``solvers.py``).

Notation follows the AMED paper: sigma (also written t) is the EDM/VE noise level,
d(x, sigma) = (x - D(x; sigma)) / sigma is the probability-flow ODE direction,
lambda = -log(sigma) the half log-SNR of the VE form.
"""

import math

import numpy as np
import torch

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform', 'discrete')
#: The default schedule of every run (the official README's): EDM's polynomial schedule with rho = 7.
SCHEDULE_TYPE = 'polynomial'
SCHEDULE_RHO = 7.0


# ----------------------------------------------------------------------------------------------
# Time schedules.

def vp_constants(sigma_min, sigma_max, eps_s=1e-3):
    """(beta_d, beta_min) of the linear-beta VP schedule with sigma(eps_s) = sigma_min and sigma(1) =
    sigma_max, where sigma(tau)^2 = exp(beta_d tau^2 / 2 + beta_min tau) - 1."""
    log_max = math.log1p(sigma_max ** 2)
    log_min = math.log1p(sigma_min ** 2)
    beta_d = 2 * (log_min / eps_s - log_max) / (eps_s - 1)
    return beta_d, log_max - beta_d / 2


def _time_uniform_sigmas(u, sigma_min, sigma_max, rho, eps_s=1e-3):
    """VP-time-uniform schedule (DPM-Solver's 'time_uniform'): uniform in VP time tau^(1/rho),
    mapped to sigma through the linear-beta VP schedule that hits sigma_min at tau=eps_s and
    sigma_max at tau=1. Float64 throughout."""
    beta_d, beta_min = vp_constants(sigma_min, sigma_max, eps_s)
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


#: The most time points a schedule may have (student or teacher grid): a bound on what a run
#: allocates, far above any useful few-step or teacher solver.
MAX_TIME_POINTS = 10000


def refine_schedule(t_steps, M, rho=SCHEDULE_RHO):
    """``t_steps`` with ``M`` points inserted in every interval, evenly spaced in ``t^(1/rho)`` (the
    polynomial schedule's variable): a teacher grid for an explicit student schedule. For a
    polynomial schedule of exponent ``rho`` it is that schedule with ``(M+1)(N-1)+1`` points."""
    t = torch.as_tensor(t_steps, dtype=torch.float64) ** (1 / float(rho))
    frac = torch.arange(int(M) + 1, dtype=torch.float64) / (int(M) + 1)
    inner = (t[:-1, None] * (1 - frac) + t[1:, None] * frac).flatten()
    return torch.cat([inner, t[-1:]]) ** float(rho)


def check_schedule_args(num_steps, sigma_min, sigma_max, schedule_type, schedule_rho):
    """Raise ValueError (naming the option) for schedule arguments that make no sense."""
    if schedule_type not in SCHEDULES:
        raise ValueError(f"unknown schedule_type {schedule_type!r} (choose one of {', '.join(SCHEDULES)})")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, float)) or int(num_steps) != num_steps \
            or num_steps < 2:
        raise ValueError(f'num_steps must be an integer of at least 2, got {num_steps!r}')
    if num_steps > MAX_TIME_POINTS:
        raise ValueError(f'num_steps {int(num_steps)} is too large: a schedule has at most {MAX_TIME_POINTS} time points')
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


# ----------------------------------------------------------------------------------------------
# iPNDM_v: Adams-Bashforth with coefficients that follow the actual step sizes.

def ipndm_v_coefficients(steps, order):
    """The official variable-step Adams-Bashforth weights of iPNDM_v: with ``steps`` the signed step
    sizes newest first (h = t_to - t_from, h1 = t_from - t_prev, h2, h3; floats or tensors), the
    update is ``x + h * sum_j w_j d_{n-j}``. Returns ``order`` weights (orders 1-4).

    Order 2 is the exact variable-step AB2. Orders 3 and 4 are the official formulas: order 3 equals
    AB3 on a uniform grid and integrates linear functions exactly on any grid (so it keeps order 3
    on smoothly varying grids); the official order-4 weights are (57, -65, 43, -11)/24 on a uniform
    grid, not AB4's (55, -59, 37, -9)/24, and integrate only quadratics exactly: order 3 as well.
    The exact variable-step Adams-Bashforth method of any order is ``deis_coefficients(mode='rhoab')``.
    """
    if order == 1:
        return [1.0]
    h, h1 = steps[0], steps[1]
    ratio = h / h1
    w = [1 + ratio / 2, -ratio / 2]
    if order == 2:
        return w
    h2 = steps[2]
    t1 = (1 - h ** 2 / (3 * h1 * (h1 + h2))) / 2
    w = [w[0] + t1, w[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    if order == 3:
        return w
    h3 = steps[3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
        * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return [w[0] + t2, w[1] - (1 + h1 / h2 + q) * t2, w[2] + (h1 / h2 + q * (1 + h2 / h3)) * t2, -t2 * q * h1 / h2]


# ----------------------------------------------------------------------------------------------
# DEIS: polynomial extrapolation of the direction, integrated over sigma.

#: The VP schedule (beta linear, eps_s = 1e-3) whose time tau is DEIS-tAB's interpolation variable; the
#: official code builds it from these fixed end points whatever the model's sigma range.
DEIS_VP_RANGE = (0.002, 80.0)
DEIS_MODES = ('tab', 'rhoab', 'logrho')
_GAUSS_NODES = 64


def vp_time(sigma, sigma_min=DEIS_VP_RANGE[0], sigma_max=DEIS_VP_RANGE[1]):
    """The VP time tau of noise level ``sigma`` (a tensor) in the schedule of :func:`vp_constants`."""
    beta_d, beta_min = vp_constants(sigma_min, sigma_max)
    return (torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)) - beta_min) / beta_d


def _gauss_legendre(n):
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def deis_coefficients(sigmas, sigma_to, mode='tab'):
    """DEIS weights c_j of ``x_next = x + sum_j c_j d_j`` for the directions d_j at ``sigmas`` (newest
    first, the current point sigmas[0]; floats or per-sample tensors), from sigmas[0] to ``sigma_to``:
    c_j = integral over [sigmas[0], sigma_to] of the Lagrange polynomial L_j(v(sigma)) d sigma, the
    direction being interpolated in the variable v:

    * ``tab``: v = VP time tau (:func:`vp_time`), DEIS-tAB as the official code;
    * ``rhoab``: v = sigma, i.e. the exact variable-step Adams-Bashforth method in sigma;
    * ``logrho``: v = log sigma, as diffusers' DEISMultistepScheduler.

    The integral is a 64-point Gauss-Legendre rule in log sigma, computed in float64: exact to
    rounding here, where the official tAB coefficients are a float32 sum over 10^4 points
    (relative deviation about 1e-4). One point gives Euler's weight sigma_to - sigmas[0].
    """
    if mode not in DEIS_MODES:
        raise ValueError(f"unknown deis_mode {mode!r} (choose one of {', '.join(DEIS_MODES)})")
    ref = next((s for s in list(sigmas) + [sigma_to] if isinstance(s, torch.Tensor)), None)
    as64 = lambda s: torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1)  # noqa: E731
    pts = [as64(s) for s in sigmas]
    lo, hi = torch.log(pts[0]), torch.log(as64(sigma_to))
    nodes, weights = _gauss_legendre(_GAUSS_NODES)
    u = (lo + hi) / 2 + (hi - lo) / 2 * nodes            # (B, n) nodes in log sigma
    sig = torch.exp(u)
    dsigma = sig * (hi - lo) / 2 * weights                # d sigma = sigma du, times the weights
    var = {'tab': vp_time, 'rhoab': lambda s: s, 'logrho': torch.log}[mode]
    v, vp = var(sig), [var(p) for p in pts]
    coeffs = []
    for j, pj in enumerate(vp):
        basis = torch.ones_like(v)
        for k, pk in enumerate(vp):
            if k != j:
                basis = basis * (v - pk) / (pj - pk)
        coeffs.append((basis * dsigma).sum(1))
    if ref is None:
        return [float(c) for c in coeffs]
    return [c.to(ref).reshape(ref.shape) for c in coeffs]


# ----------------------------------------------------------------------------------------------
# UniPC: the unified predictor-corrector of Zhao et al. (2023), in sigma (VE) space.

UNIPC_VARIANTS = ('bh1', 'bh2')


def _unipc_terms(x, sigma_to, outputs, sigmas, order, predict_x0, variant):
    """The parts shared by UniPC's predictor and corrector of ``order`` from sigmas[0] to
    ``sigma_to``: the first-order base point, the factor in front of the higher-order terms, the
    scaled differences D1_k = (m_k - m_0) / r_k of the previous outputs, and the weights solving
    R rho = b (rows r_k^(i-1), b_i = i! phi_{i+1}(h) / B(h), h the step in lambda = -log sigma).
    Every quantity is per sample (sigmas are (B,1,1,1) tensors)."""
    s0, m0 = sigmas[0], outputs[0]
    lam = lambda s: -torch.log(s)  # noqa: E731
    h = lam(sigma_to) - lam(s0)
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == 'bh1' else torch.expm1(hh)
    rks = [(lam(sigmas[k]) - lam(s0)) / h for k in range(1, order)]
    d1s = [(outputs[k] - m0) / rk for k, rk in zip(range(1, order), rks)]
    rks_all = torch.stack([r.reshape(-1) for r in rks] + [torch.ones_like(h.reshape(-1))], dim=1)   # (B, order)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(rks_all ** (i - 1))
        b.append((h_phi_k * fact / b_h).reshape(-1))
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    big_r = torch.stack(rows, dim=1)                      # (B, order, order): row i-1 holds r_k^(i-1)
    big_b = torch.stack(b, dim=1)                         # (B, order)
    if predict_x0:
        base = sigma_to / s0 * x - h_phi_1 * m0
        factor = b_h
    else:
        base = x - sigma_to * h_phi_1 * m0
        factor = sigma_to * b_h
    return base, factor, d1s, big_r, big_b


def _weighted(rhos, terms):
    out = 0
    for k, t in enumerate(terms):
        out = out + rhos[:, k].reshape(-1, *([1] * (t.ndim - 1))).to(t.dtype) * t
    return out


def unipc_predict(x, sigma_to, outputs, sigmas, order, predict_x0=True, variant='bh2'):
    """UniPC's predictor (UniP) of ``order`` 1-3 from sigmas[0] to ``sigma_to``: ``outputs`` newest
    first (data predictions with ``predict_x0``, else directions), at ``sigmas`` ((B,1,1,1) tensors).
    Order 2 uses rho = 1/2 as the official code."""
    base, factor, d1s, big_r, big_b = _unipc_terms(x, sigma_to, outputs, sigmas, order, predict_x0, variant)
    if order == 1:
        return base
    if order == 2:
        rhos = torch.full((x.shape[0], 1), 0.5, dtype=big_b.dtype, device=big_b.device)
    else:
        rhos = torch.linalg.solve(big_r[:, :-1, :-1], big_b[:, :-1])
    return base - factor * _weighted(rhos, d1s)


def unipc_correct(x, sigma_to, outputs, sigmas, order, output_to, predict_x0=True, variant='bh2'):
    """UniPC's corrector (UniC) of ``order``: the step of :func:`unipc_predict` redone with the model
    output ``output_to`` at the predicted point (sigma_to) as one more node. Order 1 uses rho = 1/2
    as the official code."""
    base, factor, d1s, big_r, big_b = _unipc_terms(x, sigma_to, outputs, sigmas, order, predict_x0, variant)
    if order == 1:
        rhos = torch.full((x.shape[0], 1), 0.5, dtype=big_b.dtype, device=big_b.device)
    else:
        rhos = torch.linalg.solve(big_r, big_b)
    return base - factor * _weighted(rhos, d1s + [output_to - outputs[0]])
