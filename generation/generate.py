"""Image generation with a trained predictor or a plain solver (the library behind sample.py).

Latents and labels come from one generator per seed (:class:`torch_utils.misc.StackedRandomGenerator`),
so an image depends only on its seed: not on the batch size, not on the number of processes.
"""

import os

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import solver_utils
import solvers
from models import toy
from torch_utils import distributed as dist
from torch_utils.misc import StackedRandomGenerator, atomic_write

TOY_CHUNK = 100   # toy data are drawn in chunks of this many images, one generator per chunk

SOLVER_KEYS = ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'sigma_min', 'sigma_max', 'afs',
               'max_order', 'predict_x0', 'lower_order_final', 'thresholding', 't_steps')


def solver_kwargs_from_settings(settings):
    return {k: settings[k] for k in SOLVER_KEYS if k in settings}


def nfe_of(solver_kwargs, model, with_predictor):
    return solver_utils.count_nfe(solver_kwargs['solver'], solver_kwargs['num_steps'], solver_kwargs.get('afs', False),
                                  with_predictor, calls_per_eval=model.calls_per_eval)


def to_uint8(images):
    """[-1, 1] float images (B, C, H, W) -> uint8 (B, H, W, C), as EDM: x * 127.5 + 128, clipped."""
    return (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(path, image):
    img = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, 'L' if image.shape[2] == 1 else 'RGB')
    atomic_write(path, lambda p: img.save(p, format='PNG'))


def make_grid(images, ncol=None):
    """Tile uint8 images (N, H, W, C) into one image, row-major, ncol = ceil(sqrt(N)) by default."""
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = -(-n // ncol)
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def seed_path(outdir, seed, ext, subdirs=True):
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.{ext}')


@torch.no_grad()
def generate_images(model, seeds, outdir, solver_kwargs, predictor=None, batch=64, grid=False, subdirs=True,
                    return_inters=False, device=torch.device('cpu'), progress=True):
    """Sample one image per seed and write PNGs (and trajectories) under ``outdir``.

    This rank handles its share of the seeds (:func:`torch_utils.distributed.rank_seeds`).
    Writes ``outdir/<seed//1000*1000>/<seed>.png`` (``subdirs``) or ``outdir/<seed>.png``; with
    ``grid`` a single ``outdir/grid.png`` of all seeds in seed order instead; with
    ``return_inters`` also ``<seed>.npz`` holding the trajectory at the grid points
    (``trajectory`` (N, C, H, W) float32 and ``sigmas`` (N,)). Returns the number of images
    written by this rank."""
    kw = dict(solver_kwargs)
    batches = dist.rank_seeds(seeds, batch)
    collected = []
    _, t_steps = solvers.prepare(model, predictor=predictor, **{k: v for k, v in kw.items() if k != 'afs'})
    written = 0
    bar = tqdm(batches, unit='batch', disable=not (progress and dist.is_main()), dynamic_ncols=True)
    for batch_seeds in bar:
        if len(batch_seeds) == 0:
            continue
        seeds_list = batch_seeds.tolist()
        rnd = StackedRandomGenerator(device, seeds_list)
        latents = rnd.randn([len(seeds_list), *model.img_shape])
        cond = model.sample_cond(rnd, len(seeds_list))
        out = solvers.sample(model, latents, cond, predictor=predictor, return_inters=return_inters, **kw)
        x = out[-1] if return_inters else out
        images = to_uint8(model.decode(x))
        for j, seed in enumerate(seeds_list):
            if grid:
                collected.append((seed, images[j]))
            else:
                save_png(seed_path(outdir, seed, 'png', subdirs), images[j])
            if return_inters:
                traj = out[:, j].float().cpu().numpy()
                atomic_write(seed_path(outdir, seed, 'npz', subdirs),
                              lambda p: np.savez(p, trajectory=traj, sigmas=t_steps.numpy()))
            written += 1
    if grid:
        gathered = dist.gather_objects(collected)
        if dist.is_main():
            allimgs = sorted((item for part in gathered for item in part), key=lambda item: item[0])
            save_png(os.path.join(outdir, 'grid.png'), make_grid(np.stack([img for _, img in allimgs])))
    dist.barrier()
    return written


def write_toy_data(dest, num, seed=0, dataset_name='toy', progress=True):
    """Write ``num`` exact data samples of a built-in analytic model as PNGs (``dest/000000/000000.png``...).

    Image i comes from chunk i // 100, drawn as ``model.sample(100, generator)`` with a generator
    seeded from (seed, chunk) by numpy's SeedSequence, so it depends only on (seed, i), not on
    ``num`` or the number of processes, and its noise is unrelated to sample.py's seed i.
    Pixels: x * 127.5 + 128, clipped to uint8 (as sample.py). Chunks are split across ranks."""
    if num < 1:
        raise ValueError(f'--num must be at least 1, got {num}')
    try:
        model = toy.build(dataset_name)
    except ValueError as e:
        raise ValueError(str(e)) from None
    chunks = dist.rank_seeds(range(-(-num // TOY_CHUNK)), 1)
    for chunk in tqdm(chunks, unit='chunk', disable=not (progress and dist.is_main()), dynamic_ncols=True):
        if len(chunk) == 0:
            continue
        c = int(chunk[0])
        state = np.random.SeedSequence([seed, c]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        images = to_uint8(model.sample(TOY_CHUNK, gen))
        for j in range(min(TOY_CHUNK, num - c * TOY_CHUNK)):
            i = c * TOY_CHUNK + j
            save_png(seed_path(dest, i, 'png'), images[j])
    dist.barrier()
    dist.print0(f'Wrote {num} exact samples of {dataset_name} to {dest}')
