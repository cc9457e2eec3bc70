"""Quickstart on a built-in model: train AMED predictors, compare AMED-Solver and AMED-Plugin (iPNDM)
with plain solvers by their error to the reference ODE solution, and draw the results.

    python -m evaluation.quickstart                         # the analytic mixture
    python -m evaluation.quickstart --dataset_name=toy_unet  # the learned toy U-Net

Everything runs on CPU and nothing is downloaded. quickstart.sh runs the first in the checkout's
virtual environment. It writes, beside the grid (``--grid``): ``table.md`` (the printed table),
``error_vs_nfe.png`` (the table as a log-scale plot; needs matplotlib), ``strip.png`` (the same
seeds from the reference solution and from every row of the table at NFE 5, contrast-stretched on
the toy models) and ``strip-<model>.png`` (the same for the plain solvers on ``--strip_model``, by
default the photograph model).

The table trains one predictor per AMED row and NFE: ``train.py --recipe=recommended`` (AMED-Plugin
on iPNDM as a per-interval table, trajectory loss) and the paper's AMED-Solver with its official
per-interval loss (:data:`TABLE_ROWS`; ``--all_recipes`` adds the paper's recipes with the other
loss each). The predictors train in ``--workers`` processes of one thread each, so the table does
not depend on the number of workers or threads.

The reference is RK4 in log sigma at :data:`REFERENCE_STEPS_PER_UNIT` steps per unit; the
quickstart solves it again at half the steps and prints how much that changes it, next to the
smallest error it measures. Both are cached in the dnnlib cache folder (``--cache_dir``; keyed by
the model's output, the seeds and the steps), so a second run starts training at once.
"""

import contextlib
import io
import multiprocessing
import os
import pickle
import queue
import resource
import signal
import time

import click
import torch
from tqdm import tqdm

import dnnlib
from evaluation import accuracy, plots
from models.presets import load_model
from models.toy import AnalyticDenoiser
from predictors import load_predictor
from predictors.settings import SolverSettings
from torch_utils import distributed as dist

#: The AMED recipes, with AFS: ``recommended`` (its loss and its table predictor are part of it),
#: then the two recipes of the paper (CIFAR-10), each with the official per-interval loss and with
#: the trajectory loss.
RECIPES = [(accuracy.AMED_LABELS['recommended'], dict(accuracy.AMED_RECIPES['recommended']))] + [
    (f'{accuracy.AMED_LABELS[name]}, {loss} loss', dict(accuracy.AMED_RECIPES[name], loss=loss))
    for name in ('amed', 'ipndm') for loss in ('interval', 'trajectory')]

#: The AMED rows of the table without ``--all_recipes``: the recommended recipe, and the paper's
#: AMED-Solver as the paper trains it.
TABLE_ROWS = (accuracy.AMED_LABELS['recommended'], 'AMED-Solver, interval loss')

#: RK4 steps per unit of log sigma of the quickstart's reference (85 steps from sigma 80 to 0.002).
#: Accurate to about 1e-5 relative on the analytic mixture (see models.toy.solve_pf_ode), four
#: orders below the errors the table reports; every run prints the halving check.
REFERENCE_STEPS_PER_UNIT = 8

STRIP_SEEDS = 8

def table_recipes(all_recipes=False):
    """(label, training options) of the table's AMED rows."""
    return [(label, recipe) for label, recipe in RECIPES if all_recipes or label in TABLE_ROWS]


def reference(model, dataset_name, num, device, cache_dir, halving=True):
    """(latents, cond, reference solution, RMS change when the steps are halved) of seeds 0..num-1,
    cached on disk; the change is None without ``halving`` (not computed unless the cache has it)."""
    latents, cond = accuracy.seeded_inputs(model, range(num), device)
    key = f'{dataset_name}-n{num}-spu{REFERENCE_STEPS_PER_UNIT}-{accuracy.model_fingerprint(model, latents, cond)}'
    path = os.path.join(cache_dir, f'reference-{key}.pt')
    cached = torch.load(path, weights_only=True) if os.path.isfile(path) else None
    if cached is not None and torch.equal(cached['latents'], latents):
        exact, change = cached['exact'], cached.get('halving_change')
        if change is not None or not halving:
            return latents, cond, exact, change
    else:
        exact = accuracy.exact_solution(model, latents, model.sigma_max, model.sigma_min, cond,
                                        steps_per_unit=REFERENCE_STEPS_PER_UNIT)
    change = None
    if halving:
        half = accuracy.exact_solution(model, latents, model.sigma_max, model.sigma_min, cond,
                                       steps_per_unit=REFERENCE_STEPS_PER_UNIT // 2)
        change = accuracy.rms_error(half, exact)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(dict(latents=latents, exact=exact, halving_change=change), path + '.tmp')
    os.replace(path + '.tmp', path)
    return latents, cond, exact, change


_MODELS = {}


def _model(name):
    """The built-in model ``name``, loaded once per process."""
    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


def train_and_sample(recipe, nfe, num, options):
    """Train one predictor (``accuracy.train_recipe``, its console lines kept to the run's log.txt)
    and sample seeds 0..num-1 with it. Returns (samples, snapshot path, settings)."""
    with contextlib.redirect_stdout(io.StringIO()):
        path, predictor, settings = accuracy.train_recipe(recipe, nfe, **options)
        model = _model(options['dataset_name'])
        latents, cond = accuracy.seeded_inputs(model, range(num))
        x = accuracy.sample_all(model, latents, cond, predictor=predictor,
                                **SolverSettings.from_dict(settings).sample_kwargs())
    return x, path, settings


def plain_strip(model_name, nfe, seeds, cache_dir):
    """(reference, [(label, samples)] of every plain solver at ``nfe``) of seeds 0..seeds-1 on
    ``model_name`` (its reference cached as the table's)."""
    model = _model(model_name)
    latents, cond, exact, _ = reference(model, model_name, seeds, torch.device('cpu'), cache_dir, halving=False)
    return exact, [(f'{label}, NFE {nfe}', x) for label, x in accuracy.baseline_samples(model, latents, cond, nfe)]


def timed(fn, *args):
    """(fn(*args), wall seconds, CPU seconds of this process)."""
    t0, c0 = time.time(), time.process_time()
    result = fn(*args)
    return result, time.time() - t0, time.process_time() - c0


class JobFailed(RuntimeError):
    """A job of :class:`Jobs` failed: one line naming the job, the error's type and message."""


def _run_job(job):
    """(key, result, wall seconds, CPU seconds) of one job; its failure as :class:`JobFailed`
    (every exception pickles back from a worker that way)."""
    key, fn, args = job
    try:
        return key, *timed(fn, *args)
    except Exception as e:
        raise JobFailed(f"{' NFE '.join(map(str, key)) if isinstance(key, tuple) else key}: "
                        f"{type(e).__name__}: {e}") from None


def _worker(tasks, results):
    """A worker process: one thread, Ctrl-C left to the main process (which ends the workers).
    Runs jobs from ``tasks`` until None (or until the main process is gone) and sends each answer
    to ``results`` as (ok, pickled result or message): pickled here, so that tensors travel by
    value, not as shared memory of a process that may have ended by the time they are read."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    parent = multiprocessing.parent_process()
    for job in iter(tasks.get, None):
        if not parent.is_alive():   # killed: nobody reads the answers
            return
        try:
            results.put((True, pickle.dumps(_run_job(job))))
        except Exception as e:
            results.put((False, str(e)))


class Jobs:
    """Jobs (key, function, arguments) run in ``workers`` spawned processes of one thread each,
    each taking the next job in the order listed (longest first) when it is free, or one by one in
    this process (already at one thread) for ``workers`` = 1; :meth:`results` yields (key, result,
    wall seconds, CPU seconds) as they finish. The same job gives the same digits either way. A
    context manager: leaving it by an exception (a failed job, Ctrl-C) kills the workers at once."""

    def __init__(self, jobs, workers):
        self.jobs, self.processes = list(jobs), []
        if workers > 1:
            ctx = multiprocessing.get_context('spawn')
            self.tasks, self.answers = ctx.Queue(), ctx.Queue()
            for job in self.jobs + [None] * workers:
                self.tasks.put(job)
            self.processes = [ctx.Process(target=_worker, args=(self.tasks, self.answers), daemon=True)
                              for _ in range(workers)]
            for p in self.processes:
                p.start()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for p in self.processes:
            if exc_type is not None:
                p.kill()
            p.join()
        if self.processes:
            self.tasks.cancel_join_thread()
            self.tasks = self.answers = self.processes = None   # their semaphores go now, not at exit

    def _answer(self):
        while True:
            try:
                return self.answers.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise JobFailed(f'a worker process ended with exit code {dead[0]}') from None

    def results(self):
        if not self.processes:
            yield from map(_run_job, self.jobs)
            return
        for _ in self.jobs:
            ok, answer = self._answer()
            if not ok:
                raise JobFailed(answer)
            yield pickle.loads(answer)


def cpu_seconds(who=resource.RUSAGE_SELF):
    """User + system CPU time of this process (or of its finished child processes: RUSAGE_CHILDREN)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', type=click.Choice(['toy', 'toy_cond', 'toy_unet']), default='toy')
@click.option('--nfe', 'nfes', help='NFE values (odd: AFS is used) [default: 3,5,7,9; 5 on toy_unet]', type=str)
@click.option('--kimg', help='Training trajectories per predictor (thousands)',
              type=click.FloatRange(min=0, min_open=True), default=2.0)
@click.option('--batch', help='Training batch', type=click.IntRange(min=1), default=32)
@click.option('--num', help='Evaluation samples', type=click.IntRange(min=1), default=64)
@click.option('--all_recipes', is_flag=True, help='Also train the paper\'s recipes with the other loss each: '
              'AMED-Solver with the trajectory loss, AMED-Plugin on iPNDM with both (5 AMED rows, not 2)')
@click.option('--workers', type=click.IntRange(min=1), help='Processes (one thread each) that train the predictors '
              'and the second strip; 1: all in this process  [default: the CPU cores this process may use]')
@click.option('--outdir', help='Where the training runs go', type=str, default='./exps')
@click.option('--cache_dir', help='Where the reference solutions are cached  [default: quickstart/ in the dnnlib '
              'cache folder, $DNNLIB_CACHE_DIR or ~/.cache/dnnlib]', type=str)
@click.option('--grid', 'grid_path', type=str,
              help='Grid PNG of the recommended recipe\'s samples at NFE 5 (or the first --nfe); table.md, '
              'the plot and the strips go beside it  [default: samples/quickstart/grid.png; '
              'samples/quickstart-<dataset>/grid.png for the others]')
@click.option('--strip_model', type=click.Choice(['photo_unet', 'toy_unet', 'toy', 'none']), default='photo_unet',
              help='Built-in model of the second strip: the reference and the plain solvers at the grid\'s NFE, '
              f'seeds 0-{STRIP_SEEDS - 1} (none: no second strip)')
@click.option('--check', help='Held-out trajectories of each run\'s end-of-training check (0: none)',
              type=click.IntRange(min=0),
              default=64)
@click.option('--progress/--no-progress', help='A progress bar over the trained predictors', default=False)
def main(dataset_name, nfes, kimg, batch, num, all_recipes, workers, outdir, cache_dir, grid_path, strip_model,
         check, progress):
    """Train, print the error table, draw the grid, the plot and the strips."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as in every worker: the digits do not depend on --workers
    try:
        run(dataset_name, nfes, kimg, batch, num, all_recipes, workers, outdir, cache_dir, grid_path, strip_model,
            check, progress)
    except JobFailed as e:
        raise click.ClickException(str(e)) from None
    finally:
        torch.set_num_threads(threads)


def run(dataset_name, nfes, kimg, batch, num, all_recipes, workers, outdir, cache_dir, grid_path, strip_model,
        check, progress):
    start = time.time()
    device = dist.init('cpu')
    model = _model(dataset_name)
    exact_model = isinstance(model, AnalyticDenoiser)   # a network call costs ~1000x the analytic denoiser
    nfes = [int(v) for v in (nfes or ('3,5,7,9' if exact_model else '5')).split(',')]
    grid_path = grid_path or ('./samples/quickstart/grid.png' if dataset_name == 'toy' else
                              f'./samples/quickstart-{dataset_name}/grid.png')
    folder = os.path.dirname(grid_path) or '.'
    if any(n % 2 == 0 or n < 3 for n in nfes):
        raise click.ClickException('--nfe values must be odd and >= 3 (AFS saves one evaluation)')
    cache_dir = cache_dir or dnnlib.util.make_cache_dir_path('quickstart')
    grid_nfe = 5 if 5 in nfes else nfes[0]
    recipes = table_recipes(all_recipes)

    # The jobs, longest first: the photograph strip (about as long as one predictor at NFE 7 on
    # toy), then the predictors by NFE, largest first.
    options = dict(dataset_name=dataset_name, batch=batch, total_kimg=kimg, tick_kimg=kimg, outdir=outdir,
                   desc='quickstart', check=check, progress=False)
    jobs = [] if strip_model == 'none' else [('strip', plain_strip, (strip_model, grid_nfe, STRIP_SEEDS, cache_dir))]
    jobs += [((label, nfe), train_and_sample, (recipe, nfe, num, options))
             for nfe in sorted(nfes, reverse=True) for label, recipe in recipes]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()   # not on macOS
    workers = min(workers or cores or 1, len(jobs)) or 1
    total = sum(1 for key, _, _ in jobs if key != 'strip')
    with Jobs(jobs, workers) as jobs:   # the workers start on the jobs while this process solves its reference
        latents, cond, exact, halving_change = reference(model, dataset_name, num, device, cache_dir)
        kind = 'Exact' if exact_model else 'Reference'
        print(f'{kind} ODE solutions of {num} samples (RK4, {REFERENCE_STEPS_PER_UNIT} steps per unit of log sigma): '
              f'{time.time() - start:.1f} s')
        baselines = {(label, nfe): x for nfe in nfes
                     for label, x in accuracy.baseline_samples(model, latents, cond, nfe)}

        samples, runs, photo = {}, {}, None
        print(f'Training {total} predictors ({len(recipes)} recipes x {len(nfes)} NFE, {kimg:g}k trajectories each) '
              f'in {workers} process(es)')
        with tqdm(total=total, unit='predictor', disable=not progress, dynamic_ncols=True) as bar:
            for key, result, seconds, cpu in jobs.results():
                if key == 'strip':
                    photo = result
                    bar.write(f'{strip_model}: reference and plain solvers of the strip in {seconds:.1f} s '
                              f'({cpu:.1f} s CPU)')
                    continue
                samples[key], runs[key], settings = result
                verdict = settings.get('check')
                verdict = f", check: {verdict['verdict']}" if verdict else ''
                bar.write(f'{key[0]} NFE {key[1]}: trained in {seconds:.1f} s ({cpu:.1f} s CPU){verdict}, '
                          f'RMS error {accuracy.rms_error(samples[key], exact):.4f}')
                bar.update(1)

    labels = [label for label, _ in recipes] + [label for label, _ in accuracy.BASELINES]
    found = {**samples, **baselines}
    rows = [(label, {nfe: accuracy.rms_error(found[label, nfe], exact) for nfe in nfes}) for label in labels]
    strip_rows = [(f'{label}, NFE {grid_nfe}', found[label, grid_nfe][:STRIP_SEEDS]) for label in labels]

    from generation import generate
    grid_key = (accuracy.AMED_LABELS['recommended'], grid_nfe)
    predictor, settings = load_predictor(runs[grid_key], verbose=False)[:2]
    plan = generate.build_plan(model, range(64), folder, settings, predictor, settings, grid=True)
    generate.generate_images(plan, progress=False)
    if os.path.basename(grid_path) != 'grid.png':
        os.replace(os.path.join(folder, 'grid.png'), grid_path)
    print(f'Grid of 64 samples ({grid_key[0]}, NFE {grid_nfe}): {grid_path}')
    title = f'RMS error to {kind.lower()} ODE solution ({dataset_name}, {num} samples)'
    strip = plots.sample_strip(strip_rows, exact[:STRIP_SEEDS].float(), os.path.join(folder, 'strip.png'),
                               stretch=dataset_name in plots.STRETCHED)
    print(f'Strip of seeds 0-{min(num, STRIP_SEEDS) - 1}, reference and every row at NFE {grid_nfe}: {strip}')
    if photo is not None:
        reference_x, photo_rows = photo
        strip = plots.sample_strip(photo_rows, reference_x.float(), os.path.join(folder, f'strip-{strip_model}.png'),
                                   stretch=strip_model in plots.STRETCHED)
        print(f'Strip of {strip_model}, seeds 0-{STRIP_SEEDS - 1}, reference and the plain solvers at NFE '
              f'{grid_nfe}: {strip}')
    plot = plots.plot_error_vs_nfe(rows, nfes, os.path.join(folder, 'error_vs_nfe.png'), title)
    if plot:
        print(f'Plot of the table: {plot}')
    table = accuracy.format_table(rows, nfes, title=title)
    with open(os.path.join(folder, 'table.md'), 'w', encoding='utf-8') as f:
        f.write(table + '\n')
    print(f'\n{table}')
    smallest = min(v for _, values in rows for v in values.values())
    print(f'\nReference check: halving its steps changes it by {halving_change:.1e} (RMS), '
          f'{smallest / max(halving_change, 1e-300):.0e} times below the smallest error above ({smallest:.4f}).')
    own, workers = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    print(f'Total time: {time.time() - start:.0f} s; CPU time (user + sys): {own + workers:.0f} s, of which '
          f'{own:.0f} s in this process')
    dist.shutdown()


if __name__ == '__main__':
    main()
