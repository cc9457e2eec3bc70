"""Quickstart on a built-in model: train AMED predictors, sample a grid, and compare AMED-Solver
and AMED-Plugin (iPNDM) with plain solvers by their error to the reference ODE solution.

    python -m evaluation.quickstart                         # the analytic mixture (exact solution)
    python -m evaluation.quickstart --dataset_name=toy_unet  # the learned toy U-Net (RK4 reference)

Everything runs on CPU in a few minutes; nothing is downloaded. quickstart.sh runs the first after
installing.
"""

import os
import time

import click

from evaluation import accuracy
from generation import generate
from models.presets import load_model
from models.toy import AnalyticDenoiser
from torch_utils import distributed as dist
from torch_utils.misc import parse_seeds
from predictors.settings import SolverSettings

#: The two AMED recipes of the paper (REFERENCE.md section 15, CIFAR-10), with AFS, each trained
#: with the official per-interval loss and with the trajectory loss.
RECIPES = [(f'{accuracy.AMED_LABELS[name]}, {loss} loss', dict(accuracy.AMED_RECIPES[name], loss=loss))
           for name in ('amed', 'ipndm') for loss in ('interval', 'trajectory')]


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', type=click.Choice(['toy', 'toy_cond', 'toy_unet']), default='toy')
@click.option('--nfe', 'nfes', help='NFE values (odd: AFS is used) [default: 3,5,7,9; 5 on toy_unet]', type=str)
@click.option('--kimg', help='Training trajectories per predictor (thousands) [default: 2; 1 on toy_unet]', type=float)
@click.option('--batch', help='Training batch', type=int, default=32)
@click.option('--num', help='Evaluation samples', type=int, default=64)
@click.option('--outdir', help='Where the runs go', type=str, default='./exps')
@click.option('--grid', 'grid_path', type=str,
              help='Grid PNG of the AMED-Plugin (trajectory loss) samples at NFE 5 (or the first --nfe) '
              '[default: samples/quickstart/grid.png; samples/quickstart-<dataset>/grid.png for the others]')
@click.option('--grid_seeds', help='Seeds of the grid', type=str, default='0-63', show_default=True)
@click.option('--progress/--no-progress', default=False)
def main(dataset_name, nfes, kimg, batch, num, outdir, grid_path, grid_seeds, progress):
    """Train, sample a grid, print the error table."""
    start = time.time()
    device = dist.init('cpu')
    model = load_model(dataset_name, device=device)
    exact_model = isinstance(model, AnalyticDenoiser)   # a network call costs ~1000x the analytic denoiser
    nfes = [int(v) for v in (nfes or ('3,5,7,9' if exact_model else '5')).split(',')]
    kimg = (2.0 if exact_model else 1.0) if kimg is None else kimg
    grid_path = grid_path or ('./samples/quickstart/grid.png' if dataset_name == 'toy' else
                              f'./samples/quickstart-{dataset_name}/grid.png')
    if any(n % 2 == 0 or n < 3 for n in nfes):
        raise click.ClickException('--nfe values must be odd and >= 3 (AFS saves one evaluation)')
    latents, cond, exact = accuracy.reference_set(model, range(num), device)
    kind = 'Exact' if exact_model else 'Reference'
    print(f'{kind} ODE solutions of {num} samples: {time.time() - start:.1f} s')

    rows = []
    grid_run = None   # (predictor, settings) of the grid's run
    grid_nfe = 5 if 5 in nfes else nfes[0]
    for label, recipe in RECIPES:
        values = {}
        for nfe in nfes:
            t0 = time.time()
            _, predictor, settings = accuracy.train_recipe(recipe, nfe, device, progress=progress,
                                                           dataset_name=dataset_name, batch=batch, total_kimg=kimg,
                                                           tick_kimg=kimg, outdir=outdir, desc='quickstart')
            values[nfe] = accuracy.solver_error(model, latents, exact, cond, predictor=predictor,
                                                **SolverSettings.from_dict(settings).sample_kwargs())
            print(f'{label} NFE {nfe}: trained in {time.time() - t0:.1f} s, RMS error {values[nfe]:.4f}')
            if recipe['sampler_stu'] == 'ipndm' and recipe['loss'] == 'trajectory' and nfe == grid_nfe:
                grid_run = predictor, settings
        rows.append((label, values))
    for label, kwargs in accuracy.BASELINES:
        values = {}
        for nfe in nfes:
            num_steps = accuracy.steps_for_nfe(kwargs['solver'], nfe, afs=True, with_predictor=False)
            values[nfe] = accuracy.solver_error(model, latents, exact, cond, num_steps=num_steps, afs=True, **kwargs)
        rows.append((label, values))

    if grid_run is not None:
        predictor, settings = grid_run
        folder = os.path.dirname(grid_path) or '.'
        plan = generate.build_plan(model, parse_seeds(grid_seeds), folder, settings, predictor,
                                   settings, grid=True)
        generate.generate_images(plan, progress=False)
        if os.path.basename(grid_path) != 'grid.png':
            os.replace(os.path.join(folder, 'grid.png'), grid_path)
        print(f'Grid of {len(plan.seeds)} samples (AMED-Plugin on iPNDM, trajectory loss, NFE {grid_nfe}): {grid_path}')
    print()
    print(accuracy.format_table(rows, nfes, title=f'RMS error to {kind.lower()} ODE solution ({dataset_name}, {num} samples)'))
    print(f'\nTotal time: {time.time() - start:.0f} s')
    dist.shutdown()


if __name__ == '__main__':
    main()
