"""Quickstart on a built-in model: train AMED predictors, compare AMED-Solver and AMED-Plugin (iPNDM)
with plain solvers by their error to the reference ODE solution, and draw the results.

    python -m evaluation.quickstart                         # the analytic mixture
    python -m evaluation.quickstart --dataset_name=toy_unet  # the learned toy U-Net

Everything runs on CPU and nothing is downloaded. quickstart.sh runs the first in the checkout's
virtual environment. It writes, beside the grid (``--grid``): ``error_vs_nfe.png`` (the table as a
log-scale plot; needs matplotlib) and ``strip.png`` (the same seeds from the reference solution and
from every row of the table at NFE 5, contrast-stretched).

The reference is RK4 in log sigma at :data:`REFERENCE_STEPS_PER_UNIT` steps per unit; the
quickstart solves it again at half the steps and prints how much that changes it, next to the
smallest error it measures. Both are cached in the dnnlib cache folder (``--cache_dir``; keyed by
the model's output, the seeds and the steps), so a second run starts training at once.
"""

import hashlib
import os
import time

import click
import torch

import dnnlib
from evaluation import accuracy, plots
from generation import generate
from models.presets import load_model
from models.toy import AnalyticDenoiser
from torch_utils import distributed as dist
from predictors.settings import SolverSettings

#: The two AMED recipes of the paper (CIFAR-10), with AFS, each trained with the official
#: per-interval loss and with the trajectory loss.
RECIPES = [(f'{accuracy.AMED_LABELS[name]}, {loss} loss', dict(accuracy.AMED_RECIPES[name], loss=loss))
           for name in ('amed', 'ipndm') for loss in ('interval', 'trajectory')]

#: RK4 steps per unit of log sigma of the quickstart's reference (85 steps from sigma 80 to 0.002).
#: Accurate to about 1e-5 relative on the analytic mixture (see models.toy.solve_pf_ode), four
#: orders below the errors the table reports; every run prints the halving check.
REFERENCE_STEPS_PER_UNIT = 8

STRIP_SEEDS = 8


def model_fingerprint(model, latents, cond):
    """sha256 of the model's denoised output on a few of the latents: a cache key that changes
    when the model does."""
    with torch.no_grad():
        c = None if cond is None else cond[:2]
        out = model(latents[:2] * 10.0, torch.full((2,), 10.0), c)
    return hashlib.sha256(out.double().cpu().numpy().tobytes()).hexdigest()[:16]


def reference(model, dataset_name, num, device, cache_dir):
    """(latents, cond, reference solution, RMS change when the steps are halved), cached on disk."""
    latents, cond = accuracy.seeded_inputs(model, range(num), device)
    key = f'{dataset_name}-n{num}-spu{REFERENCE_STEPS_PER_UNIT}-{model_fingerprint(model, latents, cond)}'
    path = os.path.join(cache_dir, f'reference-{key}.pt')
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if torch.equal(cached['latents'], latents):
            return latents, cond, cached['exact'], cached['halving_change']
    exact, half = (accuracy.exact_solution(model, latents, model.sigma_max, model.sigma_min, cond, steps_per_unit=spu)
                   for spu in (REFERENCE_STEPS_PER_UNIT, REFERENCE_STEPS_PER_UNIT // 2))
    change = accuracy.rms_error(half, exact)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(dict(latents=latents, exact=exact, halving_change=change), path + '.tmp')
    os.replace(path + '.tmp', path)
    return latents, cond, exact, change


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', type=click.Choice(['toy', 'toy_cond', 'toy_unet']), default='toy')
@click.option('--nfe', 'nfes', help='NFE values (odd: AFS is used) [default: 3,5,7,9; 5 on toy_unet]', type=str)
@click.option('--kimg', help='Training trajectories per predictor (thousands)', type=float, default=2.0)
@click.option('--batch', help='Training batch', type=int, default=32)
@click.option('--num', help='Evaluation samples', type=int, default=64)
@click.option('--outdir', help='Where the training runs go', type=str, default='./exps')
@click.option('--cache_dir', help='Where the reference solutions are cached  [default: quickstart/ in the dnnlib '
              'cache folder, $DNNLIB_CACHE_DIR or ~/.cache/dnnlib]', type=str)
@click.option('--grid', 'grid_path', type=str,
              help='Grid PNG of the AMED-Plugin (trajectory loss) samples at NFE 5 (or the first --nfe); the '
              'plot and the strip go beside it  [default: samples/quickstart/grid.png; '
              'samples/quickstart-<dataset>/grid.png for the others]')
@click.option('--check', help='Held-out trajectories of each run\'s end-of-training check (0: none)', type=int,
              default=64)
@click.option('--progress/--no-progress', default=False)
def main(dataset_name, nfes, kimg, batch, num, outdir, cache_dir, grid_path, check, progress):
    """Train, print the error table, draw the grid, the plot and the strip."""
    start = time.time()
    device = dist.init('cpu')
    model = load_model(dataset_name, device=device)
    exact_model = isinstance(model, AnalyticDenoiser)   # a network call costs ~1000x the analytic denoiser
    nfes = [int(v) for v in (nfes or ('3,5,7,9' if exact_model else '5')).split(',')]
    grid_path = grid_path or ('./samples/quickstart/grid.png' if dataset_name == 'toy' else
                              f'./samples/quickstart-{dataset_name}/grid.png')
    folder = os.path.dirname(grid_path) or '.'
    if any(n % 2 == 0 or n < 3 for n in nfes):
        raise click.ClickException('--nfe values must be odd and >= 3 (AFS saves one evaluation)')
    latents, cond, exact, halving_change = reference(model, dataset_name, num, device,
                                                     cache_dir or dnnlib.util.make_cache_dir_path('quickstart'))
    kind = 'Exact' if exact_model else 'Reference'
    print(f'{kind} ODE solutions of {num} samples (RK4, {REFERENCE_STEPS_PER_UNIT} steps per unit of log sigma): '
          f'{time.time() - start:.1f} s')

    rows = []
    strip_rows = []   # (label, the first STRIP_SEEDS samples at the strip's NFE)
    grid_run = None   # (predictor, settings) of the grid's run
    grid_nfe = 5 if 5 in nfes else nfes[0]

    def measure(label, nfe, predictor=None, **kwargs):
        x = accuracy.sample_all(model, latents, cond, predictor=predictor, **kwargs)
        if nfe == grid_nfe:
            strip_rows.append((f'{label}, NFE {nfe}', x[:STRIP_SEEDS]))
        return accuracy.rms_error(x, exact)

    for label, recipe in RECIPES:
        values = {}
        for nfe in nfes:
            t0 = time.time()
            _, predictor, settings = accuracy.train_recipe(recipe, nfe, device, progress=progress,
                                                           dataset_name=dataset_name, batch=batch, total_kimg=kimg,
                                                           tick_kimg=kimg, outdir=outdir, desc='quickstart',
                                                           check=check)
            values[nfe] = measure(label, nfe, predictor, **SolverSettings.from_dict(settings).sample_kwargs())
            print(f'{label} NFE {nfe}: trained in {time.time() - t0:.1f} s, RMS error {values[nfe]:.4f}')
            if recipe['sampler_stu'] == 'ipndm' and recipe['loss'] == 'trajectory' and nfe == grid_nfe:
                grid_run = predictor, settings
        rows.append((label, values))
    for label, kwargs in accuracy.BASELINES:
        values = {}
        for nfe in nfes:
            num_steps = accuracy.steps_for_nfe(kwargs['solver'], nfe, afs=True, with_predictor=False)
            values[nfe] = measure(label, nfe, num_steps=num_steps, afs=True, **kwargs)
        rows.append((label, values))

    if grid_run is not None:
        predictor, settings = grid_run
        plan = generate.build_plan(model, range(64), folder, settings, predictor,
                                   settings, grid=True)
        generate.generate_images(plan, progress=False)
        if os.path.basename(grid_path) != 'grid.png':
            os.replace(os.path.join(folder, 'grid.png'), grid_path)
        print(f'Grid of 64 samples (AMED-Plugin on iPNDM, trajectory loss, NFE {grid_nfe}): {grid_path}')
    title = f'RMS error to {kind.lower()} ODE solution ({dataset_name}, {num} samples)'
    strip = plots.sample_strip(strip_rows, exact[:STRIP_SEEDS].float(), os.path.join(folder, 'strip.png'))
    print(f'Strip of seeds 0-{STRIP_SEEDS - 1}, reference and every solver at NFE {grid_nfe} (contrast-stretched): {strip}')
    plot = plots.plot_error_vs_nfe(rows, nfes, os.path.join(folder, 'error_vs_nfe.png'), title)
    if plot:
        print(f'Plot of the table: {plot}')
    print()
    print(accuracy.format_table(rows, nfes, title=title))
    smallest = min(v for _, values in rows for v in values.values())
    print(f'\nReference check: halving its steps changes it by {halving_change:.1e} (RMS), '
          f'{smallest / max(halving_change, 1e-300):.0e} times below the smallest error above ({smallest:.4f}).')
    print(f'Total time: {time.time() - start:.0f} s')
    dist.shutdown()


if __name__ == '__main__':
    main()
