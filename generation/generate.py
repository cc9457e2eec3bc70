"""Image generation with a trained predictor, a solver card or a plain solver: the library behind
sample.py (:func:`plan_sampling` validates and loads, :func:`generate_images` samples and writes),
and the exact data samples of the built-in analytic model (:func:`write_toy_data`, ``fid.py toydata``).

Latents and labels come from one generator per seed (:class:`torch_utils.misc.StackedRandomGenerator`),
so an image depends only on its seed: not on the batch size, not on the number of processes.
"""

import dataclasses
import hashlib
import os

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import solver_utils
import solvers
from models import toy
from models.base import seeded_inputs
from models.presets import load_model
from generation import manifest
from generation.manifest import seed_path
from torch_utils import distributed as dist
from torch_utils.misc import atomic_write, check_output_dir, check_seed, parse_seeds
from predictors import experiments, load_predictor, snapshot
from predictors.settings import SolverSettings

TOY_CHUNK = 100   # toy data are drawn in chunks of this many images, one generator per chunk

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


#: Defaults of a plain-solver run of sample.py (no predictor); the schedule's are solver_utils'.
PLAIN_DEFAULTS = dict(solver='ipndm', num_steps=6, afs=False)


@dataclasses.dataclass
class SamplingPlan:
    """Everything a sampling run needs, validated: what :func:`plan_sampling` returns and
    :func:`generate_images` runs. ``solver`` and ``t_steps`` are the built solver and its schedule
    (:func:`solvers.prepare`), ``settings`` the predictor's or card's settings (empty for a plain
    solver) and ``run_settings`` the :class:`~predictors.settings.SolverSettings` they came from."""
    model: torch.nn.Module
    seeds: list
    outdir: str
    solver: solvers.Solver
    t_steps: torch.Tensor
    afs: bool = False
    predictor: object = None
    settings: dict = dataclasses.field(default_factory=dict)
    run_settings: SolverSettings = None
    label: str = ''
    nfe: int = 0
    grid: bool = False
    subdirs: bool = True
    return_inters: bool = False
    batch: int = 64
    device: torch.device = torch.device('cpu')
    config: dict = dataclasses.field(default_factory=dict)
    existing: dict = None
    overwrite: bool = False
    todo: list = None

    def describe(self):
        """One line: what is sampled, how and where."""
        skipped = len(self.seeds) - len(self.todo) if self.todo is not None else 0
        count = f'{len(self.todo)} images ({skipped} of {len(self.seeds)} seeds already done)' if skipped else \
            f'{len(self.seeds)} images'
        return (f"Sampling {count} with {self.label} ({self.nfe} NFE, {len(self.t_steps)} time points, "
                f"{'explicit' if self.run_settings.t_steps is not None else self.run_settings.schedule_type} schedule) on "
                f"{dist.get_world_size()} process(es) -> {self.outdir}")


def plan_sampling(predictor_path=None, card=None, dataset_name=None, model_path=None, seeds='0-63', outdir=None,
                  grid=False, subdirs=True, return_inters=False, batch=64, classifier_path=None, prompt=None,
                  prompt_path=None, use_fp16=False, device=torch.device('cpu'), guidance_type=None,
                  guidance_rate=None, overwrite=False, resume=False, **solver_options):
    """Validate a sampling run and load what it needs; write nothing. ValueError (or
    FileNotFoundError) with one line naming the problem.

    The run samples with a predictor (``predictor_path``: snapshot, run folder, experiment number
    or published pickle, :func:`predictors.load_predictor`), a solver card (``card``,
    :mod:`predictors.card`), or a plain solver on ``dataset_name`` with ``solver_options``
    (solver, num_steps, the schedule options, afs and the solver's options; defaults
    :data:`PLAIN_DEFAULTS`). A predictor or card carries its own solver settings, model and guidance:
    giving them again is an error. ``seeds``: a list or a string such as ``'0-63'`` or ``'1,2,5-10'``.
    ``outdir``, ``overwrite`` and ``resume``: see :func:`build_plan`."""
    given = {k: v for k, v in solver_options.items() if v is not None}
    unknown = set(given) - set(SolverSettings.KEYS) - {'t_steps'}
    if unknown:
        raise TypeError(f"plan_sampling() got unknown option(s) {', '.join(sorted(unknown))}")
    source = 'card' if card is not None else 'predictor' if predictor_path is not None else None
    seed_list = parse_seeds(seeds)
    if predictor_path is not None and card is not None:
        raise ValueError('give either --predictor_path or --card, not both')
    if source is not None:
        given.update({k: v for k, v in dict(guidance_type=guidance_type, guidance_rate=guidance_rate).items()
                      if v is not None})
        if given:
            raise ValueError(f"--{next(iter(given))} comes from the {source}; drop it or sample without "
                             f"--{'card' if card is not None else 'predictor_path'}")
    elif dataset_name is None:
        raise ValueError('give --predictor_path, --card, or --dataset_name and plain solver options')
    if outdir is not None:
        check_output_dir(outdir)

    predictor, settings, origin = None, {}, None
    if source is not None:
        loaded = load_predictor(card if card is not None else predictor_path, device=device)
        if card is not None and loaded.source['kind'] != 'card':
            raise ValueError(f'--card {card} is not a solver card (a .json file); give a predictor as --predictor_path')
        predictor, settings, run_settings = loaded.predictor, loaded.settings, loaded.solver
        origin = {k: loaded.source[k] for k in ('kind', 'given', 'sha256', 'file')}
        dataset_name = dataset_name or settings.get('dataset_name')
        if dataset_name is None:
            raise ValueError(f'the {source} names no model: give --dataset_name')
        guidance_type, guidance_rate = settings.get('guidance_type'), settings.get('guidance_rate')
    else:
        solver_utils.check_rho_used(given.get('schedule_type'), given.get('schedule_rho'))
        run_settings = plain_settings(given)
    model = load_model(dataset_name, model_path, guidance_type, guidance_rate, classifier_path=classifier_path,
                       prompt_path=prompt_path, use_fp16=use_fp16, device=device, prompt=prompt)
    model_identity = dict(dataset_name=dataset_name, model_path=model_path, guidance_type=guidance_type,
                          guidance_rate=guidance_rate, classifier_path=classifier_path, prompt=prompt,
                          prompt_path=prompt_path, use_fp16=bool(use_fp16))
    return build_plan(model, seed_list, outdir, run_settings, predictor, settings, origin=origin,
                      model_identity=model_identity, grid=grid, subdirs=subdirs, return_inters=return_inters,
                      batch=batch, device=device, overwrite=overwrite, resume=resume)


def plain_settings(options):
    """The :class:`SolverSettings` of a plain run from the options given (None: the default;
    :data:`PLAIN_DEFAULTS`, then the schedule's and the solver's)."""
    o = dict(PLAIN_DEFAULTS, **{k: v for k, v in options.items() if v is not None})
    opts = {k: o.pop(k) for k in solvers.OPTIONS if k in o}
    return SolverSettings(options=opts, **o)


def build_plan(model, seeds, outdir, run_settings, predictor=None, settings=None, origin=None, model_identity=None,
               grid=False, subdirs=True, return_inters=False, batch=64, device=torch.device('cpu'), overwrite=False,
               resume=False):
    """The :class:`SamplingPlan` of a loaded ``model`` with ``run_settings`` (a
    :class:`~predictors.settings.SolverSettings`, or a dict it reads: a predictor's ``settings``),
    validated once, before anything is written.

    ``origin`` says where ``predictor`` came from (kind, sha256 of its file); without it a predictor
    module is identified by the sha256 of its weights. ``outdir`` None means the default folder, which
    names the predictor (its run folder and snapshot, or its card) or the plain solver's full
    settings: ``samples/[grids/]<dataset>/<name>``. The folder's manifest must match this run's
    configuration (:mod:`generation.manifest`) unless ``overwrite``; ``resume`` skips the seeds
    whose PNG is already complete."""
    settings = settings or {}
    if predictor is not None:
        snapshot.check_compatible(settings, model)
    seeds = list(seeds)
    model.check_seeds(seeds)
    if resume and grid:
        raise ValueError('--resume continues per-seed PNGs; it does not apply to --grid')
    if not isinstance(run_settings, SolverSettings):
        run_settings = SolverSettings.from_dict(run_settings)
    afs = run_settings.afs
    spec, t_steps = run_settings.prepare(model, predictor)
    nfe = solvers.count_nfe(spec.name, len(t_steps), afs, predictor is not None, calls_per_eval=model.calls_per_eval)
    label = spec.name if predictor is None or spec.name == 'amed' else 'amed-' + spec.name
    origin = origin or (None if predictor is None else dict(kind='predictor object', sha256=_weights_sha256(predictor)))
    label += '-card' if origin and origin['kind'] == 'card' else ''
    dataset = getattr(model, 'dataset_name', None) or settings.get('dataset_name') or 'model'
    if outdir is None:
        name = _origin_folder(origin) if origin and 'file' in origin else \
            f'{label}_nfe{nfe}_' + _settings_tag(spec, t_steps, run_settings)
        outdir = os.path.join('samples', *(['grids'] if grid else []), dataset, name)
    identity = {k: v for k, v in (origin or dict(kind='plain')).items() if k not in ('file', 'given')}
    config = dict(source=identity, model=model_identity or dict(dataset_name=dataset),
                  solver=SolverSettings.resolved(spec, t_steps, afs).to_dict(),
                  layout=dict(grid=bool(grid), subdirs=bool(subdirs), return_inters=bool(return_inters)))
    existing = manifest.check_folder(outdir, config, overwrite=overwrite, resume=resume)
    todo = None
    if resume:
        done = set(manifest.complete_seeds(outdir, seeds, subdirs)) if existing is not None else set()
        todo = [s for s in seeds if s not in done]
    solvers.warn_sigma_range(model, t_steps)
    return SamplingPlan(model=model, seeds=seeds, outdir=outdir, solver=spec, t_steps=t_steps, afs=afs,
                        predictor=predictor, settings=settings, run_settings=run_settings, label=label, nfe=nfe,
                        grid=grid, subdirs=subdirs, return_inters=return_inters, batch=batch, device=device,
                        config=config, existing=existing, overwrite=overwrite, todo=todo)


def _weights_sha256(predictor):
    """sha256 over the names and bytes of a predictor module's tensors (its identity without a file)."""
    digest = hashlib.sha256()
    state = predictor.state_dict() if hasattr(predictor, 'state_dict') else {}
    for name, value in state.items():
        digest.update(name.encode('utf-8'))
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _origin_folder(origin):
    """The default sample folder name of a predictor or card file: its run folder and snapshot
    (``00003-toy-...-afs/network-snapshot-000002``) or, for a card, ``card-<name>``."""
    stem = os.path.splitext(os.path.basename(origin['file']))[0]
    if origin['kind'] == 'card':
        return f'card-{stem}'
    run = os.path.basename(os.path.dirname(origin['file']))
    return os.path.join(run, stem) if run else stem


def _settings_tag(spec, t_steps, run_settings):
    """A plain solver's full settings as a folder name part: time points, schedule, sigma range,
    AFS and every solver option (e.g. ``n6-poly7.0-sigma0.002-80-afs-max_order4``)."""
    parts = [f'n{len(t_steps)}']
    if run_settings.t_steps is not None:
        parts.append('explicit')
    else:
        parts.append(experiments.schedule_tag(run_settings.schedule_type, run_settings.schedule_rho))
    parts.append(f'sigma{float(t_steps[-1]):g}-{float(t_steps[0]):g}')
    if run_settings.afs:
        parts.append('afs')
    parts += [f'{opt}{value}' for opt, value in solvers.options_of(spec).items()]
    return '-'.join(parts)


@torch.no_grad()
def generate_images(plan, progress=True):
    """Sample one image per seed of ``plan`` (:func:`plan_sampling`) and write PNGs (and trajectories).

    First, rank 0 writes the folder's manifest (``manifest.json``: the run's configuration and
    seeds; with ``overwrite`` after removing the folder's old sample files). This rank then handles
    its share of the seeds to do (:func:`torch_utils.distributed.rank_seeds`; with ``resume`` the
    seeds whose PNG was complete are skipped). Writes ``outdir/<seed//1000*1000>/<seed>.png``
    (``subdirs``) or ``outdir/<seed>.png``; with ``grid`` a single ``outdir/grid.png`` of all seeds in
    seed order instead; with ``return_inters`` also ``<seed>.npz`` holding the trajectory at the grid
    points (``trajectory`` (N, C, H, W) float32 and ``sigmas`` (N,)). Returns the number of images
    written by this rank."""
    model, outdir, device = plan.model, plan.outdir, plan.device
    dist.barrier()   # every rank has planned (and, with resume, listed what is done) before anything is written
    if dist.is_main():
        manifest.prepare_folder(outdir, plan.config, plan.seeds, plan.existing, plan.overwrite)
    dist.barrier()
    batches = dist.rank_seeds(plan.seeds if plan.todo is None else plan.todo, plan.batch)
    collected = []
    written = 0
    bar = tqdm(batches, unit='batch', disable=not (progress and dist.is_main()), dynamic_ncols=True)
    for batch_seeds in bar:
        if len(batch_seeds) == 0:
            continue
        seeds_list = batch_seeds.tolist()
        latents, cond = seeded_inputs(model, seeds_list, device)
        out = solvers.sample(model, latents, cond, solver=plan.solver, t_steps=plan.t_steps, afs=plan.afs,
                             predictor=plan.predictor, return_inters=plan.return_inters)
        x = out[-1] if plan.return_inters else out
        images = to_uint8(model.decode(x))
        for j, seed in enumerate(seeds_list):
            if plan.grid:
                collected.append((seed, images[j]))
            else:
                save_png(seed_path(outdir, seed, 'png', plan.subdirs), images[j])
            if plan.return_inters:
                traj = out[:, j].float().cpu().numpy()
                atomic_write(seed_path(outdir, seed, 'npz', plan.subdirs),
                             lambda p: np.savez(p, trajectory=traj, sigmas=plan.t_steps.numpy()))
            written += 1
    if plan.grid:
        gathered = dist.gather_objects(collected)
        if dist.is_main():
            allimgs = sorted((item for part in gathered for item in part), key=lambda item: item[0])
            save_png(os.path.join(outdir, 'grid.png'), make_grid(np.stack([img for _, img in allimgs])))
    dist.barrier()
    return written


def write_toy_data(dest, num, seed=0, dataset_name='toy', progress=True, overwrite=False):
    """Write ``num`` exact data samples of a built-in analytic model as PNGs (``dest/000000/000000.png``...).

    Image i comes from chunk i // 100, drawn as ``model.sample(100, generator)`` with a generator
    seeded from (seed, chunk) by numpy's SeedSequence, so it depends only on (seed, i), not on
    ``num`` or the number of processes, and its noise is unrelated to sample.py's seed i.
    Pixels: x * 127.5 + 128, clipped to uint8 (as sample.py). Chunks are split across ranks.

    The folder gets a sample manifest (:mod:`generation.manifest`: the model and the seed, with the
    image indices as its seeds), so it never mixes two data sets: a folder holding images of another
    seed or model, or images without a manifest, is refused before anything is written unless
    ``overwrite`` (which removes them first)."""
    if num < 1:
        raise ValueError(f'--num must be at least 1, got {num}')
    check_seed(seed, '--seed')
    config = dict(source=dict(kind='toydata', seed=int(seed)), model=dict(dataset_name=dataset_name),
                  layout=dict(grid=False, subdirs=True, return_inters=False))
    existing = manifest.check_folder(dest, config, overwrite=overwrite, option='--dest')
    model = toy.build(dataset_name)
    dist.barrier()   # every rank has checked the folder before rank 0 changes it
    if dist.is_main():
        manifest.prepare_folder(dest, config, range(num), existing, overwrite)
    dist.barrier()
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
