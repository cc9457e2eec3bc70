"""GITS: a time schedule for a given model, solver and NFE, searched by dynamic programming over a
cost matrix of teacher trajectories (Chen et al., "On the Trajectory Regularity of ODE-based
Diffusion Sampling", ICML 2024), written as a schedule card (:mod:`predictors.card`)::

    python -m evaluation.gits --dataset_name=toy --solver=ipndm --nfe=5 --out=gits-ipndm-nfe5.json
    python sample.py --card=gits-ipndm-nfe5.json --seeds=0-63 --grid

The search, with the official defaults:

1. A teacher (``--teacher``, default iPNDM) solves ``--num_warmup`` (256) trajectories on a fine grid of
   ``--num_steps_tea`` points of the base schedule (polynomial, rho 7), from the search seeds.
2. The cost of jumping from fine point i to fine point j is the distance between one Euler step from
   the teacher's point i (with the teacher's direction there) and the teacher's point j, averaged over
   the trajectories: ``l1`` or ``l2`` norms, or ``dev`` (the default), the step's deviation from the
   straight line between the trajectory's ends minus the teacher's deviation at j.
3. Dynamic programming picks the K-interval path from the first to the last fine point that minimises
   cost(i0, i1) + coeff * (cost of the rest), ``--coeff`` 1.15: the costs of later steps weigh more.
   K follows from the solver and ``--nfe`` (the plain solver's model calls).
4. With ``--afs``, as the official code, one more point is inserted between the first two (a 'free'
   step: AFS saves its model call), chosen among the fine points there by the L2 distance of the
   solver's final samples to the teacher's on the last warm-up batch.

The search seeds (default 200000-200255) are disjoint from sample.py's usual seeds and from the
comparison's evaluation seeds; the card records them, the fine grid, the teacher, the metric, the
coefficient, the DP path and the search time.
"""

import math
import time

import click
import numpy as np
import torch
from tqdm import tqdm

import solver_utils
import solvers
from evaluation.accuracy import seeded_inputs
from models.presets import dataset_names, load_model
from predictors import card as C
from torch_utils.misc import format_int_list, parse_seeds

METRICS = ('dev', 'l1', 'l2')
#: The official defaults (the command line's num_steps_tea default is 21; its README's recipes use 61).
DEFAULTS = dict(teacher='ipndm', num_steps_tea=61, num_warmup=256, metric='dev', coeff=1.15,
                schedule_type='polynomial', schedule_rho=7.0, seeds_start=200000)


def deviation(points, start, end):
    """Per-sample distance of each of ``points`` (K, B, ...) from the straight line through ``start``
    and ``end`` (B, ...): the norm of the part of (end - point) orthogonal to (end - start). (K, B)."""
    axis = (end - start).flatten(1)
    axis = axis / axis.norm(dim=1, keepdim=True)
    rel = (end.unsqueeze(0) - points).flatten(2)
    along = (rel * axis).sum(-1, keepdim=True)
    return (rel - along * axis).norm(dim=-1)


@torch.no_grad()
def teacher_run(model, teacher, t_fine, latents, cond=None):
    """The teacher's states at every fine point (N, B, ...) and its directions at the first N-1 (list)."""
    x = latents.double() * t_fine[0]
    xs, ds = [x], []
    for state, info in solvers.iterate(model, teacher, x, t_fine, cond):
        ds.append((xs[-1] - info.denoised.double()) / t_fine[len(ds)])
        xs.append(state.x.double())
    return torch.stack(xs), ds


def batch_costs(traj, ds, t_fine, metric):
    """The cost matrix (n, n) of one batch of teacher trajectories: entry (i, j), j > i, is the batch
    mean of the metric between the Euler step from point i to level j and the teacher's point j."""
    n = len(t_fine)
    cost = torch.zeros(n, n, dtype=torch.float64)
    if metric == 'dev':
        dev_tea = torch.cat([deviation(traj[1:-1], traj[0], traj[-1]).mean(1), torch.zeros(1, dtype=torch.float64)])
    for i in range(n - 1):
        steps = torch.stack([traj[i] + (t_fine[j] - t_fine[i]) * ds[i] for j in range(i + 1, n)])
        if metric == 'dev':
            cost[i, i + 1:] = deviation(steps, traj[0], traj[-1]).mean(1) - dev_tea[i:]
        else:
            diff = (steps - traj[i + 1:]).flatten(2)
            cost[i, i + 1:] = diff.abs().sum(-1).mean(1) if metric == 'l1' else diff.norm(dim=-1).mean(1)
    return cost


def dp_path(cost, intervals, coeff=DEFAULTS['coeff']):
    """The path 0 = i_0 < i_1 < ... < i_K = n-1 over the fine points minimising
    V(i_0, K) = cost(i_0, i_1) + coeff V(i_1, K-1), V(i, 1) = cost(i, n-1); ties go to the lowest index."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if not 1 <= intervals <= n - 1:
        raise ValueError(f'{intervals} intervals do not fit into a fine grid of {n} points (raise --num_steps_tea)')
    value = np.full((intervals + 1, n), np.inf)
    choice = np.zeros((intervals + 1, n), dtype=int)
    value[1, :n - 1] = cost[:n - 1, n - 1]
    for k in range(2, intervals + 1):
        for j in range(n - 1):
            cand = cost[j, j + 1:n - 1] + coeff * value[k - 1, j + 1:n - 1]
            if cand.size and np.isfinite(cand).any():
                best = int(np.argmin(cand))
                value[k, j], choice[k, j] = cand[best], j + 1 + best
    path = [0]
    for k in range(intervals, 1, -1):
        path.append(int(choice[k, path[-1]]))
    return path + [n - 1]


def intervals_for(spec, nfe, afs):
    """Intervals K of the DP path whose run (with the AFS point inserted when ``afs``) costs ``nfe``."""
    for k in range(1, nfe + 2):
        if solvers.count_nfe(spec, k + 1 + int(afs), afs) == nfe:
            return k
    raise ValueError(f'no schedule gives NFE {nfe} for {spec.name} (afs={afs})')


@torch.no_grad()
def cost_matrix(model, teacher='ipndm', num_steps_tea=DEFAULTS['num_steps_tea'], num_warmup=DEFAULTS['num_warmup'],
                metric=DEFAULTS['metric'], schedule_type=DEFAULTS['schedule_type'],
                schedule_rho=DEFAULTS['schedule_rho'], seeds=None, batch=64, teacher_options=None, progress=False):
    """The averaged cost matrix of the teacher's trajectories from the search ``seeds`` (default:
    ``num_warmup`` seeds from 200000). Returns a dict: ``cost`` (n, n), ``t_fine``, ``seeds``, and the
    last batch (``latents``, ``cond``, teacher ``final``) for the AFS choice."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose one of {', '.join(METRICS)})")
    tea, t_fine = solvers.prepare(model, teacher, num_steps=num_steps_tea, schedule_type=schedule_type,
                                  schedule_rho=schedule_rho, **(teacher_options or {}))
    if not tea.teacher:
        raise ValueError(f'{teacher!r} cannot be a teacher')
    seeds = list(range(DEFAULTS['seeds_start'], DEFAULTS['seeds_start'] + num_warmup)) if seeds is None else seeds
    model.check_seeds(seeds)
    t_fine = t_fine.tolist()
    cost = torch.zeros(len(t_fine), len(t_fine), dtype=torch.float64)
    chunks = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
    for part in tqdm(chunks, unit='batch', disable=not progress, desc='teacher trajectories'):
        latents, cond = seeded_inputs(model, part)
        traj, ds = teacher_run(model, tea, t_fine, latents, cond)
        cost += batch_costs(traj, ds, t_fine, metric) * len(part)
    return dict(cost=cost / len(seeds), t_fine=t_fine, seeds=seeds, latents=latents, cond=cond, final=traj[-1])


def schedule_from_costs(model, costs, spec, nfe, afs=False, coeff=DEFAULTS['coeff']):
    """(t_steps, fine indices) of the GITS schedule for the built plain solver ``spec`` at ``nfe`` from
    a :func:`cost_matrix` result."""
    if not (coeff > 0 and math.isfinite(coeff)):
        raise ValueError(f'coeff must be a positive number, got {coeff}')
    t_fine = costs['t_fine']
    indices = dp_path(costs['cost'].numpy(), intervals_for(spec, nfe, afs), coeff)
    if afs:
        indices = _afs_point(model, spec, t_fine, indices, costs['latents'], costs['cond'], costs['final'])
    return [t_fine[i] for i in indices], indices


def search(model, solver='ipndm', nfe=5, afs=False, coeff=DEFAULTS['coeff'], solver_options=None, **cost_options):
    """Search a GITS schedule (:func:`cost_matrix` with ``cost_options``, then the DP); returns a dict
    with the built ``spec``, the ``t_steps`` (float64 list), the fine-grid ``indices``, the fine grid
    ``t_fine``, the ``cost`` matrix, the ``seeds`` and the ``seconds`` it took."""
    started = time.time()
    spec, _ = solvers.prepare(model, solver, num_steps=2, **(solver_options or {}))
    intervals_for(spec, nfe, afs)    # refuse an NFE the solver cannot make before the teacher runs
    costs = cost_matrix(model, **cost_options)
    t_steps, indices = schedule_from_costs(model, costs, spec, nfe, afs, coeff)
    return dict(spec=spec, t_steps=t_steps, indices=indices, t_fine=costs['t_fine'], cost=costs['cost'],
                seeds=costs['seeds'], seconds=time.time() - started)


def _afs_point(model, spec, t_fine, indices, latents, cond, target):
    """The DP path with one fine point inserted between its first two, the one whose AFS run lands
    closest (mean L2 over the last warm-up batch) to the teacher's final samples."""
    best, best_dist = indices, math.inf
    for k in range(1, indices[1]):
        cand = [indices[0], k] + indices[1:]
        x = solvers.sample(model, latents.double(), cond, solver=spec, t_steps=[t_fine[i] for i in cand], afs=True)
        dist = (x - target).flatten(1).norm(dim=1).mean().item()
        if dist < best_dist:
            best, best_dist = cand, dist
    return best


def gits_card(model, result, afs, options, dataset_name=None, model_path=None):
    """The schedule card of a :func:`search` result; ``options``: the search settings for its provenance."""
    spec = result['spec']
    provenance = dict(method='gits', **options, fine_grid=[float(t) for t in result['t_fine']],
                      indices=result['indices'], seeds=format_int_list(result['seeds']),
                      search_seconds=round(result['seconds'], 2))
    model_info = dict(dataset_name=dataset_name, model_path=model_path)
    return C.build_card(model, spec, result['t_steps'], afs, model_info=model_info, schedule=dict(kind='gits'),
                        provenance=provenance)


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', help=f"Model preset ({', '.join(dataset_names())})", type=str, required=True)
@click.option('--model_path', help='Model file or URL overriding the preset', type=str)
@click.option('--solver', help='The plain solver the schedule is for', type=click.Choice(list(solvers.PLAIN)),
              default='ipndm')
@click.option('--nfe', help='Model calls of the run', type=click.IntRange(min=1), default=5)
@click.option('--afs', help='Insert a free AFS step between the first two points (NFE unchanged)', type=bool,
              default=False)
@click.option('--max_order', help='Multistep order of the solver (default: its highest)', type=int)
@click.option('--variant', help='unipc: bh1 or bh2', type=click.Choice(list(solver_utils.UNIPC_VARIANTS)))
@click.option('--deis_mode', help='deis: tab, rhoab or logrho', type=click.Choice(list(solver_utils.DEIS_MODES)))
@click.option('--teacher', help='Teacher solver of the fine trajectories', type=click.Choice(list(solvers.TEACHERS)),
              default=DEFAULTS['teacher'])
@click.option('--num_steps_tea', help='Points of the fine teacher grid', type=click.IntRange(min=3),
              default=DEFAULTS['num_steps_tea'])
@click.option('--num_warmup', help='Teacher trajectories (warm-up samples)', type=click.IntRange(min=1),
              default=DEFAULTS['num_warmup'])
@click.option('--seeds', help='Search seeds [default: 200000 onwards, --num_warmup of them]', type=str)
@click.option('--metric', help='Cost of a jump', type=click.Choice(METRICS), default=DEFAULTS['metric'])
@click.option('--coeff', help='DP weight of the later steps', type=float, default=DEFAULTS['coeff'])
@click.option('--schedule_type', help='Base schedule of the fine grid', type=click.Choice(list(solver_utils.SCHEDULES)),
              default=DEFAULTS['schedule_type'])
@click.option('--schedule_rho', help='Its exponent', type=float, default=DEFAULTS['schedule_rho'])
@click.option('--batch', help='Trajectories per batch', type=click.IntRange(min=1), default=64)
@click.option('--out', help='Card file to write (JSON)', type=str, required=True)
@click.option('--progress/--no-progress', default=True)
def main(dataset_name, model_path, solver, nfe, afs, max_order, variant, deis_mode, teacher, num_steps_tea, num_warmup,
         seeds, metric, coeff, schedule_type, schedule_rho, batch, out, progress):
    """Search a GITS time schedule and write it as a schedule card."""
    try:
        seed_list = parse_seeds(seeds) if seeds is not None else None
        model = load_model(dataset_name, model_path)
        given = dict(max_order=max_order, variant=variant, deis_mode=deis_mode)
        options = {k: v for k, v in given.items() if v is not None}
        spec_options = {k: v for k, v in options.items() if k in solvers.solver_class(solver).options}
        if set(options) - set(spec_options):
            raise ValueError(f"--{next(iter(set(options) - set(spec_options)))} is no option of {solver}")
        result = search(model, solver, nfe, afs, coeff, spec_options, teacher=teacher, num_steps_tea=num_steps_tea,
                        num_warmup=num_warmup, metric=metric, schedule_type=schedule_type, schedule_rho=schedule_rho,
                        seeds=seed_list, batch=batch, progress=progress)
        settings = dict(solver=solver, nfe=nfe, afs=afs, teacher=teacher, num_steps_tea=num_steps_tea,
                        num_warmup=len(result['seeds']), metric=metric, coeff=coeff, schedule_type=schedule_type,
                        schedule_rho=schedule_rho)
        card = gits_card(model, result, afs, settings, dataset_name, model_path)
        C.save_card(card, out)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    click.echo(f"Wrote {out}: GITS schedule for {solver} at NFE {card['nfe']}, {len(card['t_steps'])} points "
               f"{[round(t, 4) for t in card['t_steps']]} (fine points {result['indices']} of {num_steps_tea}), "
               f"searched in {result['seconds']:.1f} s")


if __name__ == '__main__':
    main()
