"""Pictures: the error-against-NFE plot and the sample strip of the quickstart, and the training
curves of a run folder.

    python -m evaluation.plots training exps/00000-toy-4-5-ipndm-ipndm-2-poly7.0-afs   # -> training.png there
    python -m evaluation.plots strip --dataset_name=photo_unet --nfe=5 --out=strip.png [--predictor_path=0 ...]

The plots need matplotlib (``pip install -r requirements-plots.txt``); without it they are skipped
with one line. The strip is drawn with PIL and needs nothing more.
"""

import json
import math
import os

import click
import numpy as np
import torch
from PIL import Image, ImageDraw

from generation.generate import to_uint8

#: Built-in models whose samples are low-contrast textures: their strips are contrast-stretched.
STRETCHED = ('toy', 'toy_cond', 'toy_unet')

MATPLOTLIB_MISSING = 'Plot skipped: matplotlib is not installed (pip install -r requirements-plots.txt)'


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (after one line) when it is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(MATPLOTLIB_MISSING)
        return None
    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches='tight', metadata={'Software': None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def plot_error_vs_nfe(rows, nfes, path, title):
    """Error against NFE on a log scale: ``rows`` are (label, {nfe: error}) as in the quickstart's
    table. Returns ``path``, or None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = 'osD^vP*Xh'
    for i, (label, values) in enumerate(rows):
        xs = [n for n in nfes if n in values and math.isfinite(values[n])]
        style = '-' if label.startswith('AMED') else '--'
        ax.plot(xs, [values[n] for n in xs], style, marker=markers[i % len(markers)], label=label)
    ax.set_yscale('log')
    ax.set_xticks(list(nfes))
    ax.set_xlabel('NFE (model evaluations)')
    ax.set_ylabel('RMS error (log scale)')
    ax.set_title(title, fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def contrast_stretch(images, reference, low=1.0, high=99.0):
    """Map the ``low``..``high`` percentile range of each reference image (per channel) to [-1, 1]
    and apply the same map to every image of its column, so that all rows stay comparable.
    ``images``: (R, B, C, H, W); ``reference``: (B, C, H, W)."""
    ref = reference.double().flatten(2)
    lo = torch.quantile(ref, low / 100, dim=2)[..., None, None]
    hi = torch.quantile(ref, high / 100, dim=2)[..., None, None]
    return (images.double() - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


def sample_strip(rows, reference, path, scale=3, stretch=True):
    """One PNG: the reference samples in the first row and one row per solver below, the same seeds
    in the same columns. ``rows``: (label, (B, C, H, W) samples in [-1, 1]); ``reference``: the
    reference solver's samples of the same noise. With ``stretch``, each column gets the contrast
    stretch of :func:`contrast_stretch` (stated in the picture's first label)."""
    labels = [('reference ODE solution' + (' (contrast-stretched)' if stretch else ''))] + [label for label, _ in rows]
    images = torch.stack([reference] + [x for _, x in rows])
    if stretch:
        images = contrast_stretch(images, reference)
    r, b, _, h, w = images.shape
    tiles = to_uint8(images.flatten(0, 1)).reshape(r, b, h, w, -1)
    gap = 2
    label_width = 12 + max(int(ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength(label)) for label in labels)
    canvas = Image.new('RGB', (label_width + b * (w * scale + gap), r * (h * scale + gap)), 'white')
    draw = ImageDraw.Draw(canvas)
    for i in range(r):
        y = i * (h * scale + gap)
        draw.text((4, y + h * scale // 2 - 6), labels[i], fill='black')
        for j in range(b):
            tile = Image.fromarray(tiles[i, j]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_width + j * (w * scale + gap), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def read_stats(run_dir):
    """The tick records of a run folder's stats.jsonl, in order (ValueError when it has none)."""
    path = os.path.join(run_dir, 'stats.jsonl')
    if not os.path.isfile(path):
        raise ValueError(f'{run_dir} has no stats.jsonl: not a training run folder')
    with open(path, encoding='utf-8') as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f'{path} holds no tick yet')
    return records


def plot_training(run_dir, path=None):
    """The loss curve (mean and +-std per tick) and the tick statistics of the predictor's outputs
    (r, scale_dir, scale_time) and of the time per tick, from a run folder's stats.jsonl. Returns
    the PNG's path (default ``training.png`` in the run folder), or None when matplotlib is missing."""
    records = read_stats(run_dir)
    path = path or os.path.join(run_dir, 'training.png')
    plt = _pyplot()
    if plt is None:
        return None
    kimg = np.array([rec['Progress/kimg']['mean'] for rec in records])
    panels = [('Loss/loss', 'loss', True), ('Pred/r', 'r', False), ('Pred/scale_dir', 'scale_dir', False),
              ('Pred/scale_time', 'scale_time', False), ('Timing/sec_per_tick', 'seconds per tick', False)]
    panels = [p for p in panels if any(p[0] in rec for rec in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (key, name, log) in zip(axes[0], panels):
        have = [i for i, rec in enumerate(records) if key in rec]
        x = kimg[have]
        mean = np.array([records[i][key]['mean'] for i in have])
        std = np.array([records[i][key]['std'] for i in have])
        ax.plot(x, mean, marker='o', markersize=3)
        ax.fill_between(x, mean - std, mean + std, alpha=0.25)
        if log and (mean > 0).all():
            ax.set_yscale('log')
        ax.set_title(name + (' (mean, +-std)' if key != 'Timing/sec_per_tick' else ''), fontsize=9)
        ax.set_xlabel('kimg')
        ax.grid(True, alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=9)
    return _save(fig, path)


@click.group()
def main():
    """Pictures of training runs (the quickstart draws its own)."""


@main.command(context_settings=dict(show_default=True))
@click.option('--dataset_name', help='Built-in model',
              type=click.Choice(['toy', 'toy_cond', 'toy_unet', 'photo_unet']), default='photo_unet')
@click.option('--nfe', help='NFE of every solver (odd: AFS is used)', type=click.IntRange(min=3), default=5)
@click.option('--seeds', help='Number of seeds (columns), from seed 0', type=click.IntRange(1, 64), default=8)
@click.option('--predictor_path', 'predictors', help='AMED predictors to add as rows (snapshot, run folder or '
              'experiment number; trained at --nfe on this model)', multiple=True)
@click.option('--out', help='PNG to write', type=str, default='strip.png')
@click.option('--stretch/--no-stretch', default=None, help='Contrast-stretch each column  [default: on the toy models, '
              'whose samples are low-contrast textures; not on photo_unet]')
def strip(dataset_name, nfe, seeds, predictors, out, stretch):
    """A strip of the same seeds: the reference ODE solution, then every plain solver of the
    quickstart's table (and each --predictor_path) at --nfe."""
    import solvers
    from evaluation import accuracy
    from models.presets import load_model
    from predictors import load_predictor
    if nfe % 2 == 0:
        raise click.ClickException('--nfe must be odd (AFS saves one evaluation)')
    model = load_model(dataset_name)
    latents, cond, reference = accuracy.reference_set(model, range(seeds))
    rows = []
    for spec in predictors:
        try:
            loaded = load_predictor(spec)
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
        s = loaded.solver
        its_nfe = solvers.count_nfe(s.solver, s.num_steps, s.afs, True)
        if its_nfe != nfe:
            raise click.ClickException(f'{spec} samples at NFE {its_nfe}, not --nfe={nfe}')
        x = accuracy.sample_all(model, latents, cond, predictor=loaded.predictor, **s.sample_kwargs())
        rows.append((f'AMED ({s.solver}, predictor {spec}), NFE {nfe}', x))
    rows += [(f'{label}, NFE {nfe}', x) for label, x in accuracy.baseline_samples(model, latents, cond, nfe)]
    stretch = dataset_name in STRETCHED if stretch is None else stretch
    print(f"Strip{' (contrast-stretched)' if stretch else ''}: {sample_strip(rows, reference.float(), out, stretch=stretch)}")


@main.command()
@click.argument('run_dir', type=str)
@click.option('--out', help='PNG to write  [default: training.png in RUN_DIR]', type=str)
def training(run_dir, out):
    """Plot the loss curve and tick statistics of the training run in RUN_DIR (its stats.jsonl)."""
    try:
        path = plot_training(run_dir, out)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if path:
        print(f'Training curves: {path}')


if __name__ == '__main__':
    main()
