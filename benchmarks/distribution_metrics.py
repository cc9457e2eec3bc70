"""Which download-free distribution metric sees noise and blur: the measurement behind FD-spectrum.

    python benchmarks/distribution_metrics.py --num=4000 --out=docs/metrics/choice.json

On two independent sets of data (crops of the photographs held out of photo_unet's training, and
exact samples of the analytic mixture), each candidate metric is computed between set A and

* set B (the noise floor: two independent draws of the same distribution),
* set B plus Gaussian noise of std 0.02 (in the models' [-1, 1] units: 2.55 grey levels),
* set B blurred by a 3x3 box filter (edges replicated),

all quantised to uint8 as PNGs would be. A metric that sees noise and blur moves far above its floor
under both; FD-pixel8 (8x8 average pooling) hardly moves. Data seeds: photographs 1 and 2, mixture
7 and 8 (the loss study's data sets); noise seed 3. No choice was made on any other data.
"""

import json
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import frechet  # noqa: E402

NOISE_STD = 0.02
DATA_SEEDS = (1, 2)
NOISE_SEED = 3

#: The candidates: CLI-free feature extractors on uint8 images.
CANDIDATES = {
    'FD-pixel8': lambda: frechet.PixelFeatures(8),
    'FD-pixel16': lambda: frechet.PixelFeatures(16),
    'FD-spectrum (Hann window)': lambda: frechet.SpectrumFeatures(window=True),
    'FD-spectrum (no window)': lambda: frechet.SpectrumFeatures(window=False),
}


def add_noise(images, std=NOISE_STD, seed=NOISE_SEED):
    """[-1, 1] images plus Gaussian noise of standard deviation ``std`` (seeded)."""
    return images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=images.dtype)


def blur3(images):
    """A 3x3 box blur of (N, C, H, W) images, edges replicated."""
    c = images.shape[1]
    kernel = torch.full((c, 1, 3, 3), 1 / 9, dtype=images.dtype)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode='replicate')
    return torch.nn.functional.conv2d(padded, kernel, groups=c)


def fd(metric, a, b):
    """Frechet distance between [-1, 1] image sets ``a`` and ``b`` under a no-network metric (a name or an extractor)."""
    return frechet.image_fd(a, frechet.image_stats(b, metric), metric)


def data_sets(name, num):
    """Two independent sets of ``num`` images of the named data: 'photographs' (held-out crops) or 'mixture'."""
    if name == 'photographs':
        from models.photo_unet import held_out_data
        source = held_out_data()
        return [source.sample(num, generator=torch.Generator().manual_seed(s)).float() for s in DATA_SEEDS]
    from models.toy import GaussianMixture
    source = GaussianMixture()
    return [source.sample(num, generator=torch.Generator().manual_seed(s)).float() for s in (7, 8)]


def measure(a, b, candidates=CANDIDATES):
    """{candidate: {'floor', 'noise', 'blur'}} for data sets ``a`` and ``b``."""
    perturbed = {'floor': b, 'noise': add_noise(b), 'blur': blur3(b)}
    return {name: {k: fd(make(), a, x) for k, x in perturbed.items()} for name, make in candidates.items()}


@click.command(context_settings=dict(show_default=True))
@click.option('--num', type=click.IntRange(min=100), default=4000, help='images per data set')
@click.option('--out', type=str, help='write the results as JSON here')
def main(num, out):
    """Measure candidate metrics' noise floors and their response to noise and to blur."""
    torch.set_num_threads(1)
    res = dict(command='python benchmarks/distribution_metrics.py ' + ' '.join(sys.argv[1:]), num=num, results={})
    for data in ('photographs', 'mixture'):
        a, b = data_sets(data, num)
        res['results'][data] = measure(a, b)
    print(f'| {num} vs {num} images | data | floor (A vs B) | B + noise 0.02 | B blurred 3x3 | noise / floor | '
          'blur / floor |\n|---|---|---|---|---|---|---|')
    for data, rows in res['results'].items():
        for name, r in rows.items():
            print(f"| {name} | {data} | {r['floor']:.4g} | {r['noise']:.4g} | {r['blur']:.4g} | "
                  f"{r['noise'] / r['floor']:.1f} | {r['blur'] / r['floor']:.1f} |")
    if out:
        os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
        with open(out, 'wt') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
