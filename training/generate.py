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
from torch_utils import distributed as dist
from torch_utils.misc import StackedRandomGenerator, atomic_write
from training import experiments

SOLVER_KEYS = ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'sigma_min', 'sigma_max', 'afs',
               'max_order', 'predict_x0', 'lower_order_final', 'thresholding', 't_steps')


def load_predictor(spec, device='cpu'):
    """Load a predictor from a snapshot path, run folder or experiment number.

    Returns (predictor, settings) where settings hold everything the sampler needs."""
    path = experiments.resolve_predictor_path(spec)
    if path.endswith('.pkl'):
        from training.legacy import load_published_predictor
        return load_published_predictor(path, device=device)
    from training.snapshot import load_snapshot
    return load_snapshot(path, device=device)


def check_compatible(settings, model):
    """Raise ValueError (one line) when a predictor was trained for another model."""
    if settings.get('dataset_name') not in (None, getattr(model, 'dataset_name', None)):
        raise ValueError(f"the predictor was trained for dataset {settings['dataset_name']!r}, "
                         f"not {getattr(model, 'dataset_name', None)!r}")
    if tuple(settings.get('img_shape', model.img_shape)) != tuple(model.img_shape):
        raise ValueError(f"the predictor was trained for images of shape {tuple(settings['img_shape'])}, "
                         f"the model makes {tuple(model.img_shape)}")
    if int(settings.get('label_dim', model.label_dim)) != int(model.label_dim):
        raise ValueError(f"the predictor was trained for label_dim {settings['label_dim']}, "
                         f"the model has {model.label_dim}")


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
