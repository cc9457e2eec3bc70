"""The recipe study of docs/recipes.md: AMED training recipes on every built-in model, over several
training seeds, against plain iPNDM at the same NFE.

    python benchmarks/recipes.py run --model=toy --nfe=5 --train_seeds=0,1,2 --set M=5   # validation seeds
    python benchmarks/recipes.py run --model=toy --recipe=recommended --seeds=evaluation --out=...
    python benchmarks/recipes.py check-spread --model=toy                                 # the check's spread
    python benchmarks/recipes.py teachers --model=toy                                     # the teachers' own error

Seeds (train on training seeds, choose on validation seeds, report on evaluation seeds): training draws its per-batch seeds from each training
seed (training/training_loop.sample_seeds); ``--seeds=validation`` (sampling seeds
200000-200255, the default) is where every choice was made, ``--seeds=evaluation`` (100000-100255)
only reports. Error = mean per-sample RMS pixel difference to the model's reference ODE solution
from the same noise (exact on ``toy``, a converged RK4 solve on the U-Nets). Every result is
appended as one JSON line to ``--out`` with the command that made it.
"""

import json
import os
import sys
import tempfile
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loss_study import SEED_SETS, append_row, parse_overrides, seed_set  # noqa: E402
from evaluation import accuracy  # noqa: E402
from models.presets import load_model  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training import check, plan_training  # noqa: E402
from predictors.settings import SolverSettings  # noqa: E402


def recipe_options(name):
    """The training options of a named recipe (the paper's, by student: amed, ipndm, dpmpp)."""
    if name in accuracy.AMED_RECIPES:
        return dict(accuracy.AMED_RECIPES[name])
    raise click.BadParameter(f"unknown recipe {name!r} (choose one of {', '.join(accuracy.AMED_RECIPES)})")


def ipndm_error(model, latents, cond, exact, nfe):
    base = dict(accuracy.BASELINES)['iPNDM']
    return accuracy.solver_error(model, latents, exact, cond, afs=True, **base,
                                 num_steps=accuracy.steps_for_nfe('ipndm', nfe, True, False))


def train_warm(opts, nfe, dataset_name, batch, kimg, warm_kimg, outdir, seed):
    """Train ``opts`` at ``nfe`` for ``kimg`` (accuracy.train_recipe), the first ``warm_kimg`` of it
    with the interval loss (none: 0), the rest with ``opts``' loss from that predictor and training
    seed + 1000 (other trajectories). Returns (snapshot path, predictor, settings)."""
    common = dict(dataset_name=dataset_name, batch=batch, outdir=outdir)
    if not warm_kimg:
        return accuracy.train_recipe(opts, nfe, total_kimg=kimg, tick_kimg=kimg, seed=seed, **common)
    if not 0 < warm_kimg < kimg:
        raise click.BadParameter(f'--warm_kimg must be between 0 and --kimg ({kimg}), got {warm_kimg}')
    first, _, _ = accuracy.train_recipe(dict(opts, loss='interval'), nfe, total_kimg=warm_kimg, tick_kimg=warm_kimg,
                                        seed=seed, check=0, **common)
    return accuracy.train_recipe(dict(opts, predictor_path=first), nfe, total_kimg=kimg - warm_kimg,
                                 tick_kimg=kimg - warm_kimg, seed=seed + 1000, **common)


def summary(ratios):
    r = np.asarray(ratios)
    return f'{r.mean():.3f} ({r.min():.3f}-{r.max():.3f}, {len(r)} seeds)'


@click.group()
def main():
    """AMED recipes on the built-in models."""
    dist.init('cpu')


@main.command()
@click.option('--model', 'dataset_name', default='toy', show_default=True)
@click.option('--recipe', default='ipndm', show_default=True)
@click.option('--nfe', 'nfes', default='5', show_default=True)
@click.option('--train_seeds', default='0,1,2', show_default=True)
@click.option('--kimg', type=float, default=2.0, show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--loss', default='trajectory', show_default=True)
@click.option('--set', 'overrides', multiple=True, help='training option override key=value (JSON value)')
@click.option('--seeds', 'seed_names', default='validation', show_default=True,
              help='seed sets each predictor is measured on: validation, evaluation or both (comma-separated)')
@click.option('--num', default='256', show_default=True, help='samples of each seed set (comma-separated, one per set)')
@click.option('--tag', default='', help='a label for the JSON lines')
@click.option('--warm_kimg', type=float, default=0.0, show_default=True,
              help='a warm start: the first this many kimg of --kimg with the interval loss, the rest with --loss '
              'from that predictor (on other trajectories: training seed + 1000)')
@click.option('--out', default='docs/recipes/results.jsonl', show_default=True)
@click.option('--cache', default='samples/recipes', show_default=True)
def run(dataset_name, recipe, nfes, train_seeds, kimg, batch, loss, overrides, seed_names, num, tag, warm_kimg, out,
        cache):
    """Train the recipe (plus overrides) at each NFE and training seed; error and ratio to plain iPNDM
    on each seed set."""
    model = load_model(dataset_name)
    names = seed_names.split(',')
    nums = [int(n) for n in num.split(',')] * (len(names) if ',' not in num else 1)
    sets = {name: seed_set(model, name, cache, num=None if n == 256 else n)
            for name, n in zip(names, nums)}
    opts = dict(recipe_options(recipe), loss=loss, **parse_overrides(overrides))
    command = 'python benchmarks/recipes.py run ' + ' '.join(sys.argv[2:])
    for nfe in [int(n) for n in nfes.split(',')]:
        refs = {name: ipndm_error(model, *sets[name], nfe) for name in names}
        ratios = {name: [] for name in names}
        for seed in [int(s) for s in train_seeds.split(',')]:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                _, predictor, settings = train_warm(opts, nfe, dataset_name, batch, kimg, warm_kimg, tmp, seed)
                seconds = time.time() - t0
            for name in names:
                latents, cond, exact = sets[name]
                err = accuracy.solver_error(model, latents, exact, cond, predictor=predictor,
                                            **SolverSettings.from_dict(settings).sample_kwargs())
                ratios[name].append(err / refs[name])
                rec = dict(tag=tag, model=dataset_name, recipe=recipe, overrides=list(overrides), loss=loss, nfe=nfe,
                           kimg=kimg, batch=batch, train_seed=seed, seeds=name, num=len(latents), error=err,
                           ipndm=refs[name], ratio=err / refs[name], train_s=seconds, warm_kimg=warm_kimg,
                           check=settings.get('check'),
                           command=command)
                append_row(out, rec)
        for name in names:
            print(f'SUMMARY {dataset_name} NFE {nfe} {recipe} {loss} {" ".join(overrides)}: ratio '
                  f'{summary(ratios[name])} (iPNDM {refs[name]:.4f}, {name} seeds)', flush=True)


@main.command()
@click.option('--model', 'dataset_name', default='toy', show_default=True)
@click.option('--nfe', 'nfes', default='3,5,7', show_default=True)
@click.option('--seeds', 'seed_name', type=click.Choice(list(SEED_SETS)), default='evaluation', show_default=True)
@click.option('--num', type=int, default=256, show_default=True)
@click.option('--out', default='docs/recipes/baselines.jsonl', show_default=True)
@click.option('--cache', default='samples/recipes', show_default=True)
def baselines(dataset_name, nfes, seed_name, num, out, cache):
    """The plain solvers of the comparison (evaluation.accuracy.BASELINES) on a seed set: error and
    ratio to plain iPNDM at each NFE, one JSON line each."""
    model = load_model(dataset_name)
    latents, cond, exact = seed_set(model, seed_name, cache, num=None if num == 256 else num)
    for nfe in [int(n) for n in nfes.split(',')]:
        ref = ipndm_error(model, latents, cond, exact, nfe)
        for label, kwargs in accuracy.BASELINES:
            steps = accuracy.steps_for_nfe(kwargs['solver'], nfe, afs=True, with_predictor=False)
            err = accuracy.solver_error(model, latents, exact, cond, num_steps=steps, afs=True, **kwargs)
            rec = dict(model=dataset_name, solver=label, nfe=nfe, seeds=seed_name, num=len(latents), error=err,
                       ratio=err / ref, command='python benchmarks/recipes.py baselines ' + ' '.join(sys.argv[2:]))
            append_row(out, rec)


@main.command()
@click.option('--model', 'dataset_name', default='toy', show_default=True)
@click.option('--nfe', 'nfes', default='3,5,7', show_default=True)
@click.option('--M', 'ms', default='2,5,10,20', show_default=True, help='teacher points inserted per student interval')
@click.option('--seeds', 'seed_name', type=click.Choice(list(SEED_SETS)), default='validation', show_default=True)
@click.option('--num', type=int, default=256, show_default=True)
@click.option('--out', default='docs/recipes/teachers.jsonl', show_default=True)
@click.option('--cache', default='samples/recipes', show_default=True)
def teachers(dataset_name, nfes, ms, seed_name, num, out, cache):
    """The teacher's own error: the paper plugin's teacher (iPNDM, order 4, polynomial rho 7, no AFS:
    training's own teacher, ``AMEDLoss.teacher_targets``) with M points per student interval, as a
    ratio to plain iPNDM at the student's NFE; no training. One JSON line per NFE and M."""
    model = load_model(dataset_name)
    latents, cond, exact = seed_set(model, seed_name, cache, num=None if num == 256 else num)
    for nfe in [int(n) for n in nfes.split(',')]:
        ref = ipndm_error(model, latents, cond, exact, nfe)
        n = accuracy.steps_for_nfe('ipndm', nfe, afs=True, with_predictor=True)
        for m in [int(v) for v in ms.split(',')]:
            loss_fn = plan_training(dict(recipe_options('ipndm'), M=m, dataset_name=dataset_name, afs=True, num_steps=n,
                                         outdir=tempfile.gettempdir()), torch.device('cpu'))['loss_fn']
            final = torch.cat([loss_fn.teacher_targets(latents[i:i + 64], None if cond is None else cond[i:i + 64])[-1]
                               for i in range(0, len(latents), 64)])
            err = accuracy.rms_error(final, exact)
            rec = dict(model=dataset_name, nfe=nfe, M=m, teacher_points=len(loss_fn.t_teacher), seeds=seed_name,
                       num=len(latents), error=err, ipndm=ref, ratio=err / ref,
                       command='python benchmarks/recipes.py teachers ' + ' '.join(sys.argv[2:]))
            append_row(out, rec)


@main.command()
@click.argument('files', nargs=-1, required=True)
@click.option('--seeds', 'seed_name', type=click.Choice(list(SEED_SETS)), default='validation', show_default=True)
def summarize(files, seed_name):
    """A markdown table of ``run`` results (JSON lines): per model, setting (tag), NFE and training
    length, the ratio to plain iPNDM as mean (min-max) over training seeds, and the mean training time."""
    groups = {}
    for path in files:
        for line in open(path):
            rec = json.loads(line)
            if rec['seeds'] == seed_name:
                groups.setdefault((rec['model'], rec['tag'], rec['nfe'], rec['kimg']), []).append(rec)
    print(f'| model | setting | NFE | kimg | ratio to iPNDM, mean (min-max) | training seeds | iPNDM error | train s |')
    print('|---|---|---|---|---|---|---|---|')
    for (model, tag, nfe, kimg), recs in groups.items():
        r = np.asarray([x['ratio'] for x in recs])
        print(f"| {model} | {tag} | {nfe} | {kimg:g} | {r.mean():.3f} ({r.min():.3f}-{r.max():.3f}) | {len(r)} | "
              f"{recs[0]['ipndm']:.4f} | {np.mean([x['train_s'] for x in recs]):.0f} |")


@main.command('check-spread')
@click.option('--model', 'dataset_name', default='toy', show_default=True)
@click.option('--recipe', default='ipndm', show_default=True)
@click.option('--nfe', type=int, default=5, show_default=True)
@click.option('--kimg', type=float, default=2.0, show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--loss', default='trajectory', show_default=True)
@click.option('--set', 'overrides', multiple=True, help='training option override key=value (JSON value)')
@click.option('--sizes', default='8,16,32,64,128,256', show_default=True)
@click.option('--total', type=int, default=512, show_default=True, help='held-out trajectories split into sets')
@click.option('--out', default='docs/recipes/check_spread.jsonl', show_default=True)
@click.option('--cache', default='samples/recipes', show_default=True)
def check_spread(dataset_name, recipe, nfe, kimg, batch, loss, overrides, sizes, total, out, cache):
    """How many held-out trajectories the end-of-training check needs: the spread of its ratio over
    disjoint held-out sets of each size (from ``--total`` trajectories), beside the ratio against the
    reference solution on the evaluation seeds."""
    model = load_model(dataset_name)
    opts = dict(recipe_options(recipe), loss=loss, **parse_overrides(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        path, predictor, settings = accuracy.train_recipe(opts, nfe, dataset_name=dataset_name, batch=batch,
                                                          total_kimg=kimg, tick_kimg=kimg, outdir=tmp, check=0)
        train_s = time.time() - t0
    loss_fn = plan_training(dict(opts, dataset_name=dataset_name, afs=True, num_steps=settings['num_steps'],
                                 outdir=tempfile.gettempdir()), torch.device('cpu'))['loss_fn']
    seeds = check.held_out_seeds(12345, total)
    t0 = time.time()
    e_pred, e_base, _ = check.errors(loss_fn, predictor, seeds)
    check_s = time.time() - t0
    ratio_all, se_all, _ = check.ratio_of(e_pred, e_base)
    latents, cond, exact = seed_set(model, 'evaluation', cache)
    err = accuracy.solver_error(model, latents, exact, cond, predictor=predictor, **SolverSettings.from_dict(settings).sample_kwargs())
    truth = err / ipndm_error(model, latents, cond, exact, nfe)
    rows = []
    for size in [int(s) for s in sizes.split(',')]:
        sets = [check.ratio_of(e_pred[i:i + size], e_base[i:i + size]) for i in range(0, total - size + 1, size)]
        ratios = [r for r, _, _ in sets]
        rows.append(dict(size=size, sets=len(ratios), mean=float(np.mean(ratios)),
                         std=float(np.std(ratios, ddof=1)) if len(ratios) > 1 else None, min=min(ratios),
                         max=max(ratios), mean_se=float(np.mean([se for _, se, _ in sets])),
                         verdicts={w: [v for _, _, v in sets].count(w) for w in ('helps', 'unclear', 'does not help')}))
        print(json.dumps(rows[-1]), flush=True)
    rec = dict(model=dataset_name, recipe=recipe, overrides=list(overrides), loss=loss, nfe=nfe, kimg=kimg,
               batch=batch, rows=rows, ratio_all=ratio_all, se_all=se_all, truth_evaluation=truth,
               train_s=train_s, check_s_per_traj=check_s / total,
               command='python benchmarks/recipes.py check-spread ' + ' '.join(sys.argv[2:]))
    append_row(out, rec)


if __name__ == '__main__':
    main()
