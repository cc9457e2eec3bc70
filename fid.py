"""Frechet Inception Distance and friends. Runs under plain python or torchrun (images are split
across processes). The library is training/fid_lib.py.

Examples:

    # FID of 50k samples against EDM's CIFAR-10 reference statistics
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=samples/cifar10/amed_nfe5 \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    # reference statistics of a dataset (folder or zip of PNG/JPEG)
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    # the built-in analytic model: exact data samples and a download-free pixel-space distance
    python fid.py toydata --dest=toydata --num=10000
    python fid.py ref --metric=pixel --data=toydata --dest=toy-pixel.npz
    python fid.py calc --metric=pixel --images=samples/toy/ipndm_nfe5 --ref=toy-pixel.npz
"""

import functools

import click

from torch_utils import distributed as dist
from training import fid_lib


def _one_line_errors(fn):
    """Turn the library's user errors into click's one-line 'Error: ...'."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (fid_lib.FIDError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
        finally:
            dist.shutdown()
    return wrapper


def _stats_options(fn):
    """Options shared by calc and ref."""
    options = [
        click.option('--metric', help='fid: Inception features; pixel: 8x8 average-pooled pixels (FD-pixel8, '
                     'no download)', type=click.Choice(list(fid_lib.METRICS)), default='fid'),
        click.option('--detector', help='FID detector: .pkl (pickled network) or .pth (FID Inception-v3 state '
                     'dict), path or URL  [default: NVIDIA\'s inception-2015-12-05.pkl, as EDM]', type=str),
        click.option('--num', '--num_images', 'num', help='Use a seeded random subset of this many images '
                     '(default: all; under torchrun write --num_images)', type=click.IntRange(min=2)),
        click.option('--seed', help='Seed of the --num subset', type=click.IntRange(0, 2**32 - 1), default=0),
        click.option('--batch', help='Images per batch and process', type=click.IntRange(min=1), default=64),
        click.option('--workers', help='Image-loading worker processes per process (0: load in-process)',
                     type=click.IntRange(min=0), default=2),
        click.option('--device', help='cpu or cuda (default: cuda when available)',
                     type=click.Choice(['cpu', 'cuda'])),
        click.option('--progress/--no-progress', help='Show a progress bar', default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group()
def main():
    """FID tools: calc (distance of an image set to reference statistics), ref (statistics of an
    image set) and toydata (exact samples of the built-in analytic model)."""


@main.command(context_settings=dict(show_default=True))
@click.option('--images', help='Images: folder (recursive) or zip of PNG/JPEG', type=str, required=True)
@click.option('--ref', help='Reference statistics (.npz), path or URL', type=str, required=True)
@_stats_options
@_one_line_errors
def calc(images, ref, metric, detector, num, seed, batch, workers, device, progress):
    """Frechet distance of --images to the statistics --ref (printed as 'FID: %g' or 'FD-pixel8: %g')."""
    fid_lib.compute_fd(images, ref, metric=metric, detector=detector, num=num, seed=seed, batch=batch,
                       device=device, workers=workers, progress=progress)


@main.command(context_settings=dict(show_default=True))
@click.option('--data', help='Images: folder (recursive) or zip of PNG/JPEG', type=str, required=True)
@click.option('--dest', help='Output statistics (.npz with mu, sigma, metric)', type=str, required=True)
@_stats_options
@_one_line_errors
def ref(data, dest, metric, detector, num, seed, batch, workers, device, progress):
    """Statistics (mean and covariance of the features) of --data, written to --dest."""
    fid_lib.compute_ref(data, dest, metric=metric, detector=detector, num=num, seed=seed, batch=batch,
                        device=device, workers=workers, progress=progress)


@main.command(context_settings=dict(show_default=True))
@click.option('--dest', help='Output folder for the PNGs', type=str, required=True)
@click.option('--num', '--num_images', 'num', help='Number of images (under torchrun write --num_images)',
              type=click.IntRange(min=1), required=True)
@click.option('--seed', help='Seed of the data samples', type=click.IntRange(min=0), default=0)
@click.option('--dataset_name', help='Built-in model', type=click.Choice(['toy', 'toy_cond']), default='toy')
@click.option('--progress/--no-progress', help='Show a progress bar', default=True)
@_one_line_errors
def toydata(dest, num, seed, dataset_name, progress):
    """Write --num exact data samples of the built-in analytic model as PNGs (for `ref --metric=pixel`)."""
    fid_lib.start('cpu')
    fid_lib.write_toy_data(dest, num, seed=seed, dataset_name=dataset_name, progress=progress)


if __name__ == '__main__':
    main()
