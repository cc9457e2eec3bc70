"""The loss study of docs/loss_study.md: AMED trained with the official per-interval loss and with
the trajectory loss, against plain solvers, on the built-in analytic model.

    python benchmarks/loss_study.py table  --out=docs/loss_study/table.json      # the main table
    python benchmarks/loss_study.py explore --recipe=ipndm --nfe=5 --set lr=1e-2  # one exploration cell
    python benchmarks/loss_study.py fd --out=docs/loss_study/fd.json              # FD-pixel8 at NFE 5

Seeds (kept apart, as a research protocol should): training draws its own per-batch seeds from
``--seed`` (training/training_loop.sample_seeds); ``explore`` reports on the VALIDATION seeds
200000-200255, the only ones any choice was made on; ``table`` and ``fd`` report on the
EVALUATION seeds 100000-100255 and 300000-309999, which never fed back into a choice.
Error = mean per-sample RMS pixel difference to the exact ODE solution from the same noise.
"""

import json
import os
import sys
import tempfile
import time

import click
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import solvers  # noqa: E402
from models.presets import TRAINING_DATA, load_model, training_data  # noqa: E402
from evaluation import accuracy, compare as comparison  # noqa: E402
from metrics import frechet  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from predictors.settings import SolverSettings  # noqa: E402

SEED_SETS = {'validation': range(200000, 200256), 'evaluation': range(100000, 100256)}
FD_SEEDS = range(300000, 310000)
FD_DATA_SEEDS = (7, 8)     # two independent sets of exact data for the FD noise floor


def seed_set(model, name, cache_dir, num=None):
    """Latents, conditioning and exact ODE solutions of a named seed set, or of its first ``num``
    seeds (exact solutions cached per model name, seed set and :func:`evaluation.accuracy.model_fingerprint`)."""
    seeds = SEED_SETS[name][:num]
    latents, cond = accuracy.seeded_inputs(model, seeds)
    tag = (getattr(model, 'dataset_name', None) or type(model).__name__) + ('' if num is None else f'-{num}')
    # Keyed by the model's outputs too: a retrained checkpoint of the same name gets its own file.
    path = os.path.join(cache_dir, f'exact-{tag}-{name}-{accuracy.model_fingerprint(model, latents, cond)}.pt')
    if os.path.exists(path):
        exact = torch.load(path, weights_only=True)
    else:
        exact = accuracy.exact_solution(model, latents, model.sigma_max, model.sigma_min, cond)
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(exact, path)
    return latents, cond, exact


def train(recipe, nfe, loss, overrides, kimg, batch, seed, outdir, dataset_name='toy'):
    """Train one predictor with ``recipe`` (a key of :data:`evaluation.accuracy.AMED_RECIPES`) and the
    ``overrides``; returns (predictor, settings, seconds)."""
    t0 = time.time()
    _, predictor, settings = accuracy.train_recipe(dict(accuracy.AMED_RECIPES[recipe], **overrides), nfe,
                                                   dataset_name=dataset_name, batch=batch, total_kimg=kimg, tick_kimg=kimg,
                                                   outdir=outdir, seed=seed, loss=loss)
    return predictor, settings, time.time() - t0


def parse_overrides(pairs):
    out = {}
    for pair in pairs:
        key, _, value = pair.partition('=')
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@click.group()
def main():
    """AMED loss study on the built-in analytic model."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dist.init('cpu')


@main.command()
@click.option('--recipes', default='ipndm,dpmpp,amed', show_default=True)
@click.option('--losses', default='interval,trajectory', show_default=True)
@click.option('--nfe', 'nfes', default='3,5,7,9', show_default=True)
@click.option('--kimg', type=float, default=10.0, show_default=True, help='the paper recipe: 10k trajectories')
@click.option('--batch', type=int, default=64, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--seeds', 'seed_name', type=click.Choice(list(SEED_SETS)), default='evaluation', show_default=True)
@click.option('--set', 'overrides', multiple=True, help='training option override key=value (JSON value)')
@click.option('--out', type=str, help='write the results as JSON here')
@click.option('--cache', type=str, default='samples/loss_study', show_default=True)
def table(recipes, losses, nfes, kimg, batch, seed, seed_name, overrides, out, cache):
    """AMED rows for every recipe and loss, plus the plain baselines, at each NFE."""
    model = load_model('toy')
    latents, cond, exact = seed_set(model, seed_name, cache)
    nfes = [int(n) for n in nfes.split(',')]
    overrides = parse_overrides(overrides)
    rows, results = [], []

    def save(results):   # after every cell, so an interrupted run keeps what it measured
        if out:
            with open(out, 'wt') as f:
                json.dump(dict(command=' '.join(sys.argv), seeds=seed_name, results=results), f, indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        for recipe in [r for r in recipes.split(',') if r]:
            for loss in losses.split(','):
                values = {}
                for nfe in nfes:
                    predictor, settings, seconds = train(recipe, nfe, loss, overrides, kimg, batch, seed, tmp)
                    err = accuracy.solver_error(model, latents, exact, cond, predictor=predictor,
                                                **SolverSettings.from_dict(settings).sample_kwargs())
                    values[nfe] = err
                    results.append(dict(recipe=recipe, loss=loss, nfe=nfe, error=err, train_seconds=seconds))
                    print(f'{recipe} {loss} NFE {nfe}: {err:.4f} (trained in {seconds:.1f} s)', flush=True)
                    save(results)
                rows.append((f'{accuracy.AMED_LABELS[recipe]}, {loss} loss', values))
    for label, kwargs in accuracy.BASELINES:
        values = {}
        for nfe in nfes:
            num_steps = accuracy.steps_for_nfe(kwargs['solver'], nfe, afs=True, with_predictor=False)
            values[nfe] = accuracy.solver_error(model, latents, exact, cond, num_steps=num_steps, afs=True, **kwargs)
            results.append(dict(recipe=label, loss=None, nfe=nfe, error=values[nfe]))
        rows.append((label, values))
    save(results)
    print(accuracy.format_table(rows, nfes, title=f'RMS error ({seed_name} seeds, {len(latents)} samples)'))


@main.command()
@click.option('--recipe', default='ipndm', show_default=True)
@click.option('--nfe', 'nfes', default='5', show_default=True)
@click.option('--kimg', type=float, default=2.0, show_default=True)
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--set', 'overrides', multiple=True, help='training option override key=value (JSON value)')
@click.option('--cache', type=str, default='samples/loss_study', show_default=True)
def explore(recipe, nfes, kimg, batch, seed, overrides, cache):
    """One exploration cell on the VALIDATION seeds: trajectory loss with overrides, one line per NFE."""
    model = load_model('toy')
    latents, cond, exact = seed_set(model, 'validation', cache)
    ov = parse_overrides(overrides)
    loss = ov.pop('loss', 'trajectory')
    with tempfile.TemporaryDirectory() as tmp:
        for nfe in [int(n) for n in nfes.split(',')]:
            predictor, settings, seconds = train(recipe, nfe, loss, ov, kimg, batch, seed, tmp)
            err = accuracy.solver_error(model, latents, exact, cond, predictor=predictor,
                                        **SolverSettings.from_dict(settings).sample_kwargs())
            base = dict(accuracy.BASELINES)['iPNDM']
            ref = accuracy.solver_error(model, latents, exact, cond, afs=True, **base,
                                        num_steps=accuracy.steps_for_nfe('ipndm', nfe, True, False))
            print(f'RESULT recipe={recipe} nfe={nfe} kimg={kimg} batch={batch} seed={seed} '
                  f'loss={loss} {" ".join(overrides)} error={err:.4f} ipndm={ref:.4f} ratio={err / ref:.3f} '
                  f'train_s={seconds:.1f}', flush=True)


@main.command()
@click.argument('files', nargs=-1, required=True)
def merge(files):
    """One markdown table from the JSON files of several ``table`` runs (AMED rows in file order,
    baselines once), with each AMED row's ratio to plain iPNDM at the same NFE."""
    amed, base, commands = {}, {}, []
    for path in files:
        with open(path) as f:
            data = json.load(f)
        commands.append(data['command'])
        words = data['command'].split()
        sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == '--set'] + \
            [w[len('--set='):] for w in words if w.startswith('--set=')]
        suffix = f" ({', '.join(sets)})" if sets else ''
        for r in data['results']:
            if r['loss'] is None:
                base.setdefault(r['recipe'], {})[r['nfe']] = r['error']
            else:
                label = f"{accuracy.AMED_LABELS[r['recipe']]}, {r['loss']} loss{suffix}"
                amed.setdefault(label, {})[r['nfe']] = r['error']
    nfes = sorted({n for v in list(amed.values()) + list(base.values()) for n in v})
    order = sorted(amed, key=lambda k: (list(accuracy.AMED_LABELS.values()).index(k.split(',')[0]), k))
    rows = [(k, amed[k]) for k in order] + list(base.items())
    print(accuracy.format_table(rows, nfes, title='RMS error (evaluation seeds, 256 samples)'))
    print()
    ipndm = base['iPNDM']
    ratios = [(k, {n: amed[k][n] / ipndm[n] for n in amed[k]}) for k in order]
    print(accuracy.format_table(ratios, nfes, title='ratio to plain iPNDM'))
    print('\nCommands: ' + '; '.join(f'`{c}`' for c in commands))


def pixel_stats(images):
    """FD-pixel8 statistics (mu, sigma) of [-1, 1] images, quantised to uint8 as a PNG would be."""
    return frechet.image_stats(images, 'pixel')


@main.command()
@click.option('--recipes', default='ipndm,dpmpp,amed', show_default=True)
@click.option('--losses', default='interval,trajectory', show_default=True)
@click.option('--nfe', type=int, default=5, show_default=True)
@click.option('--kimg', type=float, default=10.0, show_default=True)
@click.option('--batch', type=int, default=64, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--out', type=str, help='write the results as JSON here')
def fd(recipes, losses, nfe, kimg, batch, seed, out):
    """FD-pixel8 of 10k samples (evaluation seeds 300000-309999) against 10k exact data samples."""
    model = load_model('toy')
    data = [model.sample(len(FD_SEEDS), generator=torch.Generator().manual_seed(s)) for s in FD_DATA_SEEDS]
    ref_mu, ref_sigma = pixel_stats(data[0])
    results = [dict(label='exact data (second set): noise floor',
                    fd=frechet.frechet_distance(*pixel_stats(data[1]), ref_mu, ref_sigma))]
    latents, _ = accuracy.seeded_inputs(model, FD_SEEDS)

    def fd_of(predictor=None, **kwargs):
        x = accuracy.sample_all(model, latents, predictor=predictor, batch=500, **kwargs)
        return frechet.frechet_distance(*pixel_stats(x), ref_mu, ref_sigma)

    with tempfile.TemporaryDirectory() as tmp:
        for recipe in [r for r in recipes.split(',') if r]:
            for loss in losses.split(','):
                predictor, settings, _ = train(recipe, nfe, loss, {}, kimg, batch, seed, tmp)
                value = fd_of(predictor, **SolverSettings.from_dict(settings).sample_kwargs())
                results.append(dict(label=f'{accuracy.AMED_LABELS[recipe]}, {loss} loss', fd=value))
                print(results[-1], flush=True)
    for label, kwargs in accuracy.BASELINES:
        num_steps = accuracy.steps_for_nfe(kwargs['solver'], nfe, afs=True, with_predictor=False)
        results.append(dict(label=label, fd=fd_of(num_steps=num_steps, afs=True, **kwargs)))
        print(results[-1], flush=True)
    print(f'| FD-pixel8, NFE {nfe}, 10k samples vs 10k exact data | FD |\n|---|---|')
    for r in results:
        print(f"| {r['label']} | {r['fd']:.5f} |")
    if out:
        with open(out, 'wt') as f:
            json.dump(dict(command=' '.join(sys.argv), nfe=nfe, results=results), f, indent=1)


#: EDM's CIFAR-10 network (DDPM++, VP; edm-cifar10-32x32-uncond-vp), random weights.
CIFAR10_CONFIG = dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', precond='VPPrecond',
                      model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                      augment_dim=9)


VARIANTS = {'interval': 'interval loss (step k=1 of a multistep student: one student step with gradients)',
            'trajectory': 'trajectory loss', 'checkpointing': 'trajectory loss, --checkpointing=True'}


@main.command()
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--num_steps', type=int, default=4, show_default=True)
@click.option('--variant', type=click.Choice(list(VARIANTS)), help='measure one variant (in this process)')
def memory(batch, num_steps, variant):
    """Peak memory of one forward + backward pass, per trajectory, on EDM's CIFAR-10 network with
    random weights (iPNDM plugin, AFS): the interval loss, the trajectory loss, and with
    checkpointing. Each variant runs in a fresh process; peak RSS minus the RSS before the pass."""
    import resource
    import subprocess
    if variant is None:
        from models.networks_edm import build_from_config
        params = sum(p.numel() for p in build_from_config(CIFAR10_CONFIG).parameters()) / 1e6
        print(f'| EDM CIFAR-10 network ({params:.1f}M parameters), iPNDM plugin, N={num_steps} (NFE {2 * (num_steps - 1) - 1}), '
              f'batch {batch} | peak MiB per trajectory |\n|---|---|')
        for v, label in VARIANTS.items():
            out = subprocess.run([sys.executable, __file__, 'memory', f'--batch={batch}', f'--num_steps={num_steps}',
                                  f'--variant={v}'], capture_output=True, text=True, check=True).stdout
            print(f'| {label} | {float(out.split()[-1]):.1f} |', flush=True)
        return
    from models.edm import EDMDenoiser
    from models.networks_edm import build_from_config
    from training import AMEDLoss
    from predictors.networks import AMEDPredictor
    torch.manual_seed(0)
    model = EDMDenoiser(build_from_config(CIFAR10_CONFIG, device='cpu'))
    loss_fn = AMEDLoss(model, 'ipndm', 'ipndm', num_steps=num_steps, M=1, afs=True)
    predictor = AMEDPredictor(scale_time=0.2)
    latents = torch.randn([batch, *model.img_shape])
    with torch.no_grad():   # the state at t_1 and (stand-in) targets; the warm-up also fills the allocator
        state = solvers.step(model, loss_fn.student, solvers.SolverState(latents * loss_fn.t_student[0]),
                             loss_fn.t_student, predictor=predictor, afs=True)[0]
        solvers.step(model, loss_fn.student, state, loss_fn.t_student, predictor=predictor)
    targets = [latents * loss_fn.t_student[0]] + [state.x] * (num_steps - 1)
    before = psutil.Process().memory_info().rss
    if variant == 'interval':
        loss = loss_fn(predictor, state, targets[2])[0]
    else:
        loss = loss_fn.trajectory(predictor, targets, checkpointing=variant == 'checkpointing')[0]
    loss.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print((peak - before) / batch / 2 ** 20)


# ----------------------------------------------------------------------------
# Every built-in model, every learned method over training seeds, two metrics.

#: The no-network distribution metrics reported next to the per-sample error.
DIST_METRICS = ('pixel', 'spectrum')
FD_REF_SEED = 9       # the data set the FD columns compare with
FD_FLOOR_SEED = 10    # a second, independent data set: the FD noise floor
#: The built-in models the comparison runs on (those with training data to compare against), in the
#: order of its tables.
BUILTIN_MODELS = tuple(TRAINING_DATA)


def _done(path):
    """The cells already in the JSONL file ``path`` (so an interrupted run resumes)."""
    if not path or not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r['model'], r['label'], r['nfe'], r['train_seed']) for r in map(json.loads, f) if r.get('label')}


def append_row(path, record):
    """Print ``record`` as one JSON line and append it to the file ``path`` (none: only print)."""
    print(json.dumps(record), flush=True)
    if path:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(path, 'at') as f:
            f.write(json.dumps(record) + '\n')


@main.command()
@click.option('--model', 'dataset_name', type=click.Choice(BUILTIN_MODELS), default='toy',
              show_default=True)
@click.option('--nfe', 'nfes', default='3,5,7', show_default=True)
@click.option('--recipes', default='amed,ipndm', show_default=True, help='learned rows, comma-separated: amed (AMED-Solver), ipndm (AMED-Plugin), dpmpp, recommended (its own '
              'loss and table predictor); each recipe\'s solver part and learning rate')
@click.option('--losses', default='interval,trajectory', show_default=True)
@click.option('--train_seeds', default='0,1,2', show_default=True, help='one training run per seed')
@click.option('--amed_nfe', default=None, help='NFEs of the learned rows (default: --nfe)')
@click.option('--kimg', type=float, default=2.0, show_default=True, help='training trajectories (thousands)')
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--num', type=click.IntRange(1, 256), default=64, show_default=True,
              help='evaluation seeds 100000.. for the per-sample error')
@click.option('--fd_num', type=click.IntRange(2, len(FD_SEEDS)), default=1000, show_default=True,
              help='evaluation seeds 300000.. for the distribution metrics')
@click.option('--plain/--no-plain', default=True, show_default=True, help='the plain solvers\' rows')
@click.option('--solvers', default=None, help='only these plain solvers (labels, comma-separated; default: all)')
@click.option('--out', type=str, help='append one JSON line per cell here (cells already there are skipped)')
@click.option('--cache', type=str, default='samples/loss_study', show_default=True)
def compare(dataset_name, nfes, recipes, losses, train_seeds, amed_nfe, kimg, batch, num, fd_num, plain, solvers, out,
            cache):
    """Plain solvers and AMED (each recipe, loss and training seed) on one built-in model: RMS error to
    the reference ODE solution and FD-pixel8 / FD-spectrum against the model's training data."""
    model = load_model(dataset_name)
    t0 = time.time()
    latents, cond, exact = seed_set(model, 'evaluation', cache, num)
    print(f'reference of {num} samples: {time.time() - t0:.0f} s', flush=True)
    data = training_data(dataset_name)
    ref = data.sample(fd_num, generator=torch.Generator().manual_seed(FD_REF_SEED)).float()
    ref_stats = {m: frechet.image_stats(ref, m) for m in DIST_METRICS}
    fd_latents, fd_cond = accuracy.seeded_inputs(model, FD_SEEDS[:fd_num])
    done = _done(out)
    # The command as recorded: without --cache, a local scratch folder that does not change the numbers.
    command = ' '.join(a for a in sys.argv if not a.startswith('--cache='))
    base = dict(model=dataset_name, num=num, fd_num=fd_num, command=command)

    def record(label, nfe, train_seed, predictor=None, extra=None, **kwargs):
        t = time.time()
        x = accuracy.sample_all(model, latents, cond, predictor=predictor, **kwargs)
        y = accuracy.sample_all(model, fd_latents, fd_cond, predictor=predictor, batch=250, **kwargs)
        row = dict(base, label=label, nfe=nfe, train_seed=train_seed, error=accuracy.rms_error(x, exact),
                   **{f'fd_{m}': frechet.image_fd(y, ref_stats[m], m) for m in DIST_METRICS},
                   eval_seconds=time.time() - t, **(extra or {}))
        append_row(out, row)

    if (dataset_name, 'data (second set)', 0, None) not in done:
        other = data.sample(fd_num, generator=torch.Generator().manual_seed(FD_FLOOR_SEED)).float()
        append_row(out, dict(base, label='data (second set)', nfe=0, train_seed=None, error=None,
                          **{f'fd_{m}': frechet.image_fd(other, ref_stats[m], m) for m in DIST_METRICS}))
    nfes = [int(n) for n in nfes.split(',')]
    wanted = (lambda label: True) if solvers is None else (lambda label: label in solvers.split(','))
    if plain:
        for nfe in nfes:   # in the order given: the first NFE's rows complete first
            for label, opts in comparison.PLAIN:
                if (dataset_name, label, nfe, None) not in done and wanted(label):
                    record(label, nfe, None, **comparison.plain_options(opts, nfe))
        todo = [nfe for nfe in nfes if any((dataset_name, label, nfe, None) not in done and wanted(label)
                                           for label, _ in comparison.GITS)]
        if todo:   # one cost matrix for every NFE; its search seeds are not evaluation seeds
            info, runs = comparison.gits_runs(model, todo)
            for label, nfe, opts in runs:
                if (dataset_name, label, nfe, None) not in done and wanted(label):
                    record(label, nfe, None, extra=dict(gits_seeds=info['seeds'], gits_seconds=info['seconds_cost_matrix']),
                           **opts)
    amed_nfes = [int(n) for n in (amed_nfe or ','.join(map(str, nfes))).split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        for nfe in amed_nfes:
            for recipe in [r for r in recipes.split(',') if r]:
                fixed = accuracy.AMED_RECIPES[recipe].get('loss')   # a recipe that names its loss trains only that
                for loss in [fixed] if fixed else losses.split(','):
                    label = f'{accuracy.AMED_LABELS[recipe]}, {loss} loss'
                    for seed in [int(x) for x in train_seeds.split(',')]:
                        if (dataset_name, label, nfe, seed) in done:
                            continue
                        predictor, settings, seconds = train(recipe, nfe, loss, {}, kimg, batch, seed, tmp,
                                                             dataset_name=dataset_name)
                        check = settings.get('check') or {}   # training's own verdict, against its teacher
                        record(label, nfe, seed, predictor=predictor, extra=dict(kimg=kimg, batch=batch,
                               train_seconds=seconds, check_ratio=check.get('ratio')),
                               **SolverSettings.from_dict(settings).sample_kwargs())


def _cell(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    if len(values) == 1:
        return fmt % values[0]
    return f'{fmt % (sum(values) / len(values))} ({fmt % min(values)}-{fmt % max(values)})'


def _labels(rows):
    """The methods of ``rows`` in table order: the plain solvers as evaluation.compare lists them
    (then GITS), any other plain row, then the learned rows in the order they were measured."""
    canonical = [label for label, _ in comparison.PLAIN + comparison.GITS]
    seen = list(dict.fromkeys(r['label'] for r in rows if r['nfe']))
    learned = {r['label'] for r in rows if r['nfe'] and r.get('train_seed') is not None}
    return sorted(seen, key=lambda label: (label in learned, canonical.index(label) if label in canonical else
                                           len(canonical), seen.index(label)))


#: The columns of ``report --ratios``: key of a compare row, and its title.
RATIO_METRICS = {'error': 'per-sample error', 'fd_spectrum': 'FD-spectrum'}


def ratio_tables(rows, base_label='iPNDM', metrics=tuple(RATIO_METRICS)):
    """Markdown: for the per-sample error and FD-spectrum, each method's value as a ratio to
    ``base_label``'s at the same NFE on the same model, one column per (model, NFE); learned rows
    as mean (min-max) over training seeds."""
    models = sorted(dict.fromkeys(r['model'] for r in rows),
                    key=lambda m: (BUILTIN_MODELS.index(m) if m in BUILTIN_MODELS else len(BUILTIN_MODELS), m))
    cols = [(m, n) for m in models for n in sorted({r['nfe'] for r in rows if r['model'] == m and r['nfe']})]
    labels = [label for label in _labels(rows) if label != base_label]
    lines = []
    for key in metrics:
        title = RATIO_METRICS[key]
        base = {(r['model'], r['nfe']): r[key] for r in rows if r['label'] == base_label}
        lines += [f'| {title} / {base_label} | ' + ' | '.join(f'{m} NFE {n}' for m, n in cols) + ' |',
                  '|---|' + '---|' * len(cols),
                  f'| {base_label} (absolute) | ' + ' | '.join('%.4g' % base[c] if c in base else '-' for c in cols) + ' |']
        for label in labels:
            cells = [_cell([r[key] / base[c] for r in rows if (r['model'], r['nfe']) == c and r['label'] == label
                            and r[key] is not None], '%.2f') if c in base else '-' for c in cols]
            if any(c != '-' for c in cells):
                lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


@main.command()
@click.argument('files', nargs=-1, required=True)
@click.option('--ratios', is_flag=True, help='one table per metric over all models: each method as a ratio to '
              'plain iPNDM at the same NFE (the README\'s summary)')
@click.option('--metric', type=click.Choice(list(RATIO_METRICS)), default=None,
              help='with --ratios: only this metric\'s table')
def report(files, ratios, metric):
    """Markdown tables from the JSONL files of ``compare``: per model, RMS error, FD-pixel8 and FD-spectrum
    by NFE; learned rows as mean (min-max) over training seeds, with their count."""
    rows = []
    for path in files:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    if ratios:
        print(ratio_tables(rows, metrics=[metric] if metric else tuple(RATIO_METRICS)))
        return
    for model in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == model]
        nfes = sorted({r['nfe'] for r in mine if r['nfe']})
        labels = _labels(mine)
        floor = next((r for r in mine if not r['nfe']), None)
        print(f"\n#### {model} (per-sample error: {mine[0]['num']} samples; FD: {mine[0]['fd_num']} samples against "
              f"{mine[0]['fd_num']} of the training data)\n")
        for key, title, fmt in (('error', 'RMS error to the reference', '%.4f'), ('fd_pixel', 'FD-pixel8', '%.4g'),
                                ('fd_spectrum', 'FD-spectrum', '%.4g')):
            print(f"| {title} | " + ' | '.join(f'NFE {n}' for n in nfes) + ' | training seeds |')
            print('|---|' + '---|' * (len(nfes) + 1))
            for label in labels:
                cells = [[r[key] for r in mine if r['label'] == label and r['nfe'] == n] for n in nfes]
                seeds = sorted({r['train_seed'] for r in mine if r['label'] == label and r['train_seed'] is not None})
                print(f'| {label} | ' + ' | '.join(_cell(c, fmt) for c in cells) +
                      f" | {','.join(map(str, seeds)) or '-'} |")
            if floor and key != 'error':
                print(f"| data against data (noise floor) | {fmt % floor[key]} |" + ' |' * len(nfes))
            print()


if __name__ == '__main__':
    main()
