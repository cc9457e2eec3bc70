"""Frechet Inception Distance, CLIP score and friends. Runs under plain python or torchrun (images
are split across processes). The libraries are metrics/frechet.py and metrics/clip_score.py; every
calc and clip run appends its value and provenance to metrics.jsonl beside the images
(metrics/provenance.py).

Examples:
    # FID of 50k samples against EDM's CIFAR-10 reference statistics
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=samples/cifar10/amed_nfe5 \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    # CLIP score of Stable Diffusion samples (seeds 0-29999) against the MS-COCO captions, caption i for seed i
    torchrun --standalone --nproc_per_node=8 fid.py clip --images=samples/ms_coco/amed \\
        --prompt_path=MS-COCO_val2014_30k_captions.csv

    # reference statistics of a dataset (folder or zip of PNG/JPEG)
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    # the built-in analytic model: exact data samples and a download-free pixel-space distance
    python fid.py toydata --dest=toydata --num=10000
    python fid.py ref --metric=pixel --data=toydata --dest=toy-pixel.npz
    python fid.py calc --metric=pixel --images=samples/toy/ipndm_nfe5 --ref=toy-pixel.npz
"""

import functools

import click

import cli
from metrics import clip_score
from models import clip as clip_models
from torch_utils import distributed as dist
from torch_utils.misc import SEED_LIMIT
from generation import generate
from metrics import frechet
from metrics.image_sets import start


def _run_options(min_num, num_help='default: all'):
    """Options of every command that reads an image set: --num, --seed, --batch, --workers, --device, --progress."""
    return [
        click.option('--num', '--num_images', 'num', help=f'Use a seeded random subset of this many images '
                     f'({num_help}; under torchrun write --num_images)', type=click.IntRange(min=min_num)),
        click.option('--seed', help='Seed of the --num subset', type=click.IntRange(0, SEED_LIMIT - 1), default=0),
        click.option('--batch', help='Images per batch and process', type=click.IntRange(min=1), default=64),
        click.option('--workers', help='Image-loading worker processes per process (0: load in-process)',
                     type=click.IntRange(min=0), default=2),
        click.option('--device', help='cpu or cuda (default: cuda when available)',
                     type=click.Choice(['cpu', 'cuda'])),
        click.option('--progress/--no-progress', help='Show a progress bar', default=True),
    ]


def _stats_options(fn, num_help='default: all'):
    """Options shared by calc and ref."""
    return cli.apply(fn, [
        click.option('--metric', help='fid: Inception features; pixel: 8x8 average-pooled pixels (FD-pixel8); '
                     'spectrum: log band powers of the power spectrum, which see noise and blur (FD-spectrum); '
                     'pixel and spectrum download nothing', type=click.Choice(list(frechet.METRICS)), default='fid'),
        click.option('--detector', help='FID detector: .pkl (pickled network) or .pth (FID Inception-v3 state '
                     'dict), path or URL  [default: NVIDIA\'s inception-2015-12-05.pkl, as EDM]', type=str),
        *_run_options(min_num=2, num_help=num_help),
    ])


_METRICS_FILE = click.option('--metrics_file', help='Append the value and its provenance (one JSON line) here  '
                             '[default: metrics.jsonl in the image folder, or beside the zip]', type=str)


@click.group(epilog=cli.epilog(__doc__[__doc__.index('Examples:'):]))
def main():
    """Metrics of image sets: calc (Frechet distance to reference statistics), clip (CLIP score
    against captions), ref (statistics of an image set) and toydata (exact samples of the built-in
    analytic model). calc and clip append each value with its provenance to metrics.jsonl."""


@main.command(context_settings=dict(show_default=True))
@click.option('--images', help='Images: folder (recursive) or zip of PNG/JPEG', type=str, required=True)
@click.option('--ref', help='Reference statistics (.npz), path or URL', type=str, required=True)
@functools.partial(_stats_options, num_help=f'default: {frechet.STANDARD_NUM}, as EDM; when fewer are found, all '
                   'of them, with a warning in the output and in metrics.jsonl')
@_METRICS_FILE
@cli.user_errors
def calc(images, ref, metric, detector, num, seed, batch, workers, device, progress, metrics_file):
    """Frechet distance of --images to the statistics --ref (printed as 'FID: %g' or 'FD-pixel8: %g'),
    also appended with its provenance to the metrics file."""
    frechet.compute_fd(images, ref, metric=metric, detector=detector, num=num, seed=seed, batch=batch,
                       device=device, workers=workers, progress=progress, metrics_file=metrics_file,
                       expected=frechet.STANDARD_NUM if num is None else None)


@main.command(context_settings=dict(show_default=True))
@click.option('--images', help='Images named <seed>.png (as sample.py writes them): folder (recursive) or zip',
              type=str, required=True)
@click.option('--prompt_path', help='Captions CSV (column text), caption i for seed i  [default: the MS-COCO '
              'val2014 30k captions, ./src/prompts/MS-COCO_val2014_30k_captions.csv or downloaded]', type=str)
@click.option('--model', help=f'CLIP model: {", ".join(clip_models.PRETRAINED)} (released laion2b weights), or an '
              'open_clip model-config .json (needs --weights)', type=str, default=clip_models.DEFAULT_MODEL)
@click.option('--weights', help='open_clip checkpoint (.bin/.pt/.safetensors), path or URL  [default: '
              './src/clip/<model>-<tag>/open_clip_pytorch_model.bin, else the released file, downloaded once]',
              type=str)
@functools.partial(cli.apply, options=_run_options(min_num=1))
@_METRICS_FILE
@cli.user_errors
def clip(images, prompt_path, model, weights, num, seed, batch, workers, device, progress, metrics_file):
    """CLIP score: mean of 100 cos(image embedding, caption embedding) over --images, caption i for
    seed i (printed as 'CLIP score (<model>): %g'), also appended with its provenance to the metrics file."""
    clip_score.compute_clip_score(images, prompt_path, model=model, weights=weights, num=num, seed=seed, batch=batch,
                                  device=device, workers=workers, progress=progress, metrics_file=metrics_file)


@main.command(context_settings=dict(show_default=True))
@click.option('--data', help='Images: folder (recursive) or zip of PNG/JPEG', type=str, required=True)
@click.option('--dest', help='Output statistics (.npz with mu, sigma, metric)', type=str, required=True)
@click.option('--overwrite', help='Replace --dest if it exists', is_flag=True)
@_stats_options
@cli.user_errors
def ref(data, dest, overwrite, metric, detector, num, seed, batch, workers, device, progress):
    """Statistics (mean and covariance of the features) of --data, written to --dest (checked before
    the feature pass; an existing --dest is refused unless --overwrite)."""
    frechet.compute_ref(data, dest, metric=metric, detector=detector, num=num, seed=seed, batch=batch,
                        device=device, workers=workers, progress=progress, overwrite=overwrite)


@main.command(context_settings=dict(show_default=True))
@click.option('--dest', help='Output folder for the PNGs', type=str, required=True)
@click.option('--num', '--num_images', 'num', help='Number of images (under torchrun write --num_images)',
              type=click.IntRange(min=1), required=True)
@click.option('--seed', help='Seed of the data samples', type=click.IntRange(0, SEED_LIMIT - 1), default=0)
@click.option('--dataset_name', help='Built-in model', type=click.Choice(['toy', 'toy_cond']), default='toy')
@click.option('--overwrite', help='Replace the images of another seed or model in --dest (they are removed first)',
              is_flag=True)
@click.option('--progress/--no-progress', help='Show a progress bar', default=True)
@cli.user_errors
def toydata(dest, num, seed, dataset_name, overwrite, progress):
    """Write --num exact data samples of the built-in analytic model as PNGs (for `ref --metric=pixel`),
    with a manifest.json: a --dest holding images of another seed or model, or images without a
    manifest, is refused unless --overwrite. --dest is locked while it is written; SIGINT/SIGTERM
    stop after the current chunk (exit 128 + the signal number) and say how to continue."""
    start('cpu')
    generate.write_toy_data(dest, num, seed=seed, dataset_name=dataset_name, progress=progress, overwrite=overwrite)


if __name__ == '__main__':
    cli.run(main)
