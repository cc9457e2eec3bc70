"""Every baseline at equal NFE on one built-in model: the error to the reference ODE solution of the
plain solvers on their paper schedules, of iPNDM and UniPC on GITS schedules, and of AMED-Solver and
AMED-Plugin (trained on the spot with the paper's recipes, over several training seeds, or given)::

    python -m evaluation.compare --dataset_name=toy --out=docs/baselines/toy.json --plot=docs/baselines/toy.png

* **Evaluation seeds** (``--seeds``, default 0-63) only measure: no choice (GITS search, training,
  calibration) ever sees them. GITS searches on its own seeds (200000 onwards) and AMED trains on
  random trajectories of its training seed; the output names all of them.
* **Learned methods** are trained once per training seed (``--train_seeds=0,1,2``); the table shows
  the mean and the JSON every value with min and max. Given predictors (``--predictor``) are
  evaluated at their own NFE.
* **Metrics** are columns of :data:`METRICS`: a function ``(model, samples, reference, cond) ->
  float`` per name. ``rms`` (mean per-sample RMS pixel error to the reference solution) is the
  default; a distribution metric is added by registering it there (``--metrics=rms,<name>``).
* Odd NFE use AFS, as the paper's tables. The JSON holds every number with the command's settings;
  the PNG (matplotlib, optional) shows error against NFE on log scales, one line per method.
"""

import json
import os
import sys
import time

import click
import numpy as np

import solvers
from evaluation import accuracy, gits
from models.presets import dataset_names, load_model
from predictors import SolverSettings, load_predictor
from torch_utils.misc import atomic_write, format_int_list, parse_int_list, parse_seeds

#: The plain solvers on their paper schedules: :data:`evaluation.accuracy.PLAIN`.
PLAIN = accuracy.PLAIN
#: The solvers run on GITS schedules (searched without AFS, as the GITS recipes).
GITS = [('iPNDM + GITS', dict(solver='ipndm', max_order=4)), ('UniPC-3 + GITS', dict(solver='unipc', max_order=3))]
#: The learned methods: (label, recipe of evaluation.accuracy.AMED_RECIPES).
LEARNED = [('AMED-Solver', 'amed'), ('AMED-Plugin (iPNDM)', 'ipndm')]


def rms_metric(model, samples, reference, cond=None):
    return accuracy.rms_error(samples, reference)


#: Metric columns by name: ``(model, samples, reference, cond) -> float``.
METRICS = {'rms': rms_metric}


def _summary(values):
    return dict(mean=float(np.mean(values)), min=float(np.min(values)), max=float(np.max(values)),
                values=[float(v) for v in values])


class Evaluator:
    """The evaluation seeds' latents, conditions and reference solutions, and the metric columns."""

    def __init__(self, model, seeds, metrics, batch=64):
        self.model, self.seeds, self.metrics, self.batch = model, seeds, metrics, batch
        self.latents, self.cond, self.reference = accuracy.reference_set(model, seeds)

    def __call__(self, predictor=None, **solver_kwargs):
        samples = accuracy.sample_all(self.model, self.latents, self.cond, predictor, self.batch, **solver_kwargs)
        return {name: METRICS[name](self.model, samples, self.reference, self.cond) for name in self.metrics}


def run(model, dataset_name, model_path=None, nfes=(3, 5, 7, 9), seeds=range(64), metrics=('rms',), train_seeds=(0,), kimg=2.0, train_batch=32,
        gits_options=None, predictors=(), methods=('plain', 'gits', 'learned'), progress=False, log=print):
    """The comparison on ``model`` (loaded from ``dataset_name`` and ``model_path``, which training
    reloads) as a dict (see the module docstring); ``methods`` picks the groups."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (choose from {', '.join(METRICS)})")
    started = time.time()
    evaluate = Evaluator(model, list(seeds), list(metrics))
    rows = {}
    info = dict(eval_seeds=format_int_list(seeds), metrics=list(metrics), nfes=list(nfes))

    def record(label, nfe, values):
        rows.setdefault(label, {})[str(nfe)] = {m: _summary([v[m] for v in values]) for m in metrics}

    if 'plain' in methods:
        for label, opts in PLAIN:
            for nfe in nfes:
                record(label, nfe, [evaluate(**plain_options(opts, nfe))])
            log(f'{label}: done ({time.time() - started:.0f} s)')
    if 'gits' in methods:
        info['gits'], runs = gits_runs(model, nfes, gits_options, progress)
        for label, nfe, opts in runs:
            record(label, nfe, [evaluate(**opts)])
        log(f'GITS: done ({time.time() - started:.0f} s; cost matrix {info["gits"]["seconds_cost_matrix"]} s)')
    if 'learned' in methods:
        info['train_seeds'] = list(train_seeds)
        info['train'] = dict(kimg=kimg, batch=train_batch)
        for label, recipe in LEARNED:
            for nfe in nfes:
                values = []
                for seed in train_seeds:
                    extra = dict(model_path=model_path) if model_path else {}
                    _, predictor, settings = accuracy.train_recipe(
                        accuracy.AMED_RECIPES[recipe], nfe, progress=progress, dataset_name=dataset_name, seed=seed,
                        total_kimg=kimg, tick_kimg=kimg, batch=train_batch, outdir=os.path.join('exps', 'compare'),
                        desc=f'compare-seed{seed}', **extra)
                    values.append(evaluate(predictor, **_run_kwargs(settings)))
                record(label, nfe, values)
            log(f'{label}: done ({time.time() - started:.0f} s)')
    for path in predictors:
        loaded = load_predictor(path)
        nfe = loaded.solver.nfe(loaded.predictor is not None)
        record(f'given: {path}', nfe, [evaluate(loaded.predictor, **loaded.solver.sample_kwargs())])
    info['seconds'] = round(time.time() - started, 1)
    return dict(model=dataset_name, info=info, results=rows)


def plain_options(opts, nfe):
    """The sampling options of the plain solver ``opts`` (an entry of :data:`PLAIN`) at ``nfe``
    evaluations: AFS at odd NFE (the official convention) and the matching number of time points."""
    afs = nfe % 2 == 1
    n = accuracy.steps_for_nfe(solvers.make_solver(opts['solver'], **_solver_opts(opts)), nfe, afs, False)
    return dict(opts, afs=afs, num_steps=n)


def gits_runs(model, nfes, gits_options=None, progress=False):
    """Search the GITS schedules of :data:`GITS` on ``model`` at each NFE (one cost matrix for all).
    Returns (info: the search's settings, seeds, time and schedules; runs: a list of
    (label, nfe, sampling options))."""
    t0 = time.time()
    cost_options = {k: v for k, v in (gits_options or {}).items() if k != 'coeff'}
    coeff = (gits_options or {}).get('coeff', gits.DEFAULTS['coeff'])
    costs = gits.cost_matrix(model, progress=progress, **cost_options)
    info = dict(seconds_cost_matrix=round(time.time() - t0, 1), seeds=format_int_list(costs['seeds']),
                **{k: v for k, v in dict(gits.DEFAULTS, **(gits_options or {})).items()
                   if k not in ('seeds_start', 'seeds')}, schedules={})
    runs = []
    for label, opts in GITS:
        spec = solvers.make_solver(opts['solver'], **_solver_opts(opts))
        for nfe in nfes:
            t_steps, _ = gits.schedule_from_costs(model, costs, spec, nfe, coeff=coeff)
            info['schedules'][f'{label} NFE {nfe}'] = [round(t, 6) for t in t_steps]
            runs.append((label, nfe, dict(solver=spec, t_steps=t_steps)))
    return info, runs


def _solver_opts(opts):
    return {k: v for k, v in opts.items() if k in solvers.OPTIONS}


def _run_kwargs(settings):
    return SolverSettings.from_dict(settings).sample_kwargs()


def table(result, metric='rms'):
    """A markdown table of ``metric``: mean (and min-max over training seeds where there are several)."""
    nfes = result['info']['nfes']
    lines = [f'| {metric} | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |', '|---|' + '---|' * len(nfes)]
    for label, per_nfe in result['results'].items():
        cells = []
        for n in nfes:
            s = per_nfe.get(str(n), {}).get(metric)
            if s is None:
                cells.append('-')
            elif len(s['values']) > 1:
                cells.append(f"{s['mean']:.4f} ({s['min']:.4f}-{s['max']:.4f})")
            else:
                cells.append(f"{s['mean']:.4f}")
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(result, path, metric='rms'):
    """Error against NFE (log scales), one line per method; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.get_cmap('tab20').colors)
    for label, per_nfe in result['results'].items():
        pts = sorted((int(n), v[metric]) for n, v in per_nfe.items() if metric in v)
        if not pts:
            continue
        xs = [n for n, _ in pts]
        ax.plot(xs, [s['mean'] for _, s in pts], marker='o', label=label,
                linestyle='--' if 'GITS' in label else '-')
        if any(len(s['values']) > 1 for _, s in pts):
            ax.fill_between(xs, [s['min'] for _, s in pts], [s['max'] for _, s in pts], alpha=0.2)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(result['info']['nfes'])
    ax.set_xticklabels([str(n) for n in result['info']['nfes']])
    ax.set_xlabel('NFE')
    ax.set_ylabel(f'{metric} error to the reference solution')
    ax.set_title(f"{result['model']}: evaluation seeds {result['info']['eval_seeds']}")
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format='png', dpi=110))
    plt.close(fig)
    return True


@click.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', help=f"Built-in model ({', '.join(dataset_names())})", type=str, default='toy')
@click.option('--model_path', help='Model file overriding the preset', type=str)
@click.option('--nfe', 'nfes', help='NFE values (odd ones use AFS)', type=str, default='3,5,7,9')
@click.option('--seeds', help='Evaluation seeds (never used for a choice)', type=str, default='0-63')
@click.option('--metrics', help=f"Metric columns ({', '.join(METRICS)})", type=str, default='rms')
@click.option('--methods', help='Groups to run: plain, gits, learned', type=str, default='plain,gits,learned')
@click.option('--train_seeds', help='Training seeds of each learned method', type=str, default='0')
@click.option('--kimg', help='Training trajectories per predictor (thousands)', type=click.FloatRange(min=0,
              min_open=True), default=2.0)
@click.option('--train_batch', help='Training batch', type=click.IntRange(min=1), default=32)
@click.option('--num_warmup', help='GITS: teacher trajectories', type=click.IntRange(min=1),
              default=gits.DEFAULTS['num_warmup'])
@click.option('--num_steps_tea', help='GITS: fine grid points', type=click.IntRange(min=3),
              default=gits.DEFAULTS['num_steps_tea'])
@click.option('--metric_gits', help='GITS: cost metric', type=click.Choice(gits.METRICS), default=gits.DEFAULTS['metric'])
@click.option('--coeff', help='GITS: DP coefficient', type=float, default=gits.DEFAULTS['coeff'])
@click.option('--predictor', 'predictors', help='A trained predictor to add (repeatable)', multiple=True)
@click.option('--out', help='JSON file of all numbers', type=str)
@click.option('--plot', 'plot_path', help='PNG of error against NFE (needs matplotlib)', type=str)
@click.option('--progress/--no-progress', default=False)
def main(dataset_name, model_path, nfes, seeds, metrics, methods, train_seeds, kimg, train_batch, num_warmup,
         num_steps_tea, metric_gits, coeff, predictors, out, plot_path, progress):
    """Print the error of every baseline at each NFE; write JSON and a plot."""
    try:
        nfe_list = parse_int_list(nfes)
        if not nfe_list or any(n < 1 for n in nfe_list):
            raise ValueError(f'--nfe must list positive integers, got {nfes!r}')
        groups = [m.strip() for m in methods.split(',') if m.strip()]
        bad = [g for g in groups if g not in ('plain', 'gits', 'learned')]
        if bad:
            raise ValueError(f'unknown method group {bad[0]!r} (plain, gits, learned)')
        model = load_model(dataset_name, model_path)
        result = run(model, dataset_name, model_path, nfe_list, parse_seeds(seeds), [m.strip() for m in metrics.split(',')],
                     parse_int_list(train_seeds), kimg, train_batch,
                     dict(num_warmup=num_warmup, num_steps_tea=num_steps_tea, metric=metric_gits, coeff=coeff),
                     predictors, groups, progress, log=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    result['command'] = 'python -m evaluation.compare ' + ' '.join(sys.argv[1:])
    for metric in result['info']['metrics']:
        print(table(result, metric))
    print(f"Evaluation seeds {result['info']['eval_seeds']}; training seeds {result['info'].get('train_seeds', '-')}; "
          f"GITS search seeds {result['info'].get('gits', {}).get('seeds', '-')}; {result['info']['seconds']} s")
    if out:
        text = json.dumps(result, indent=1, allow_nan=False)
        atomic_write(out, lambda p: open(p, 'w').write(text + '\n'))
    if plot_path and not plot(result, plot_path):
        print('matplotlib is not installed: no plot written', file=sys.stderr)


if __name__ == '__main__':
    main()
