"""Image generation with a trained predictor, a solver card or a plain solver: the library behind
sample.py (:func:`plan_sampling` validates and loads, :func:`generate_images` samples and writes),
and the exact data samples of the built-in analytic model (:func:`write_toy_data`, ``fid.py toydata``).

Latents and labels come from one generator per seed (:class:`torch_utils.misc.StackedRandomGenerator`),
so an image depends only on its seed: not on the batch size, not on the number of processes.
"""

import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import solver_utils
import solvers
from dnnlib.util import read_settings_text
from models import toy
from models.base import seeded_inputs
from models.presets import load_model
from generation import manifest
from generation.manifest import seed_path
from torch_utils import distributed as dist
from torch_utils import locks
from torch_utils.misc import SeedSet, atomic_write, check_output_dir, check_seed, parse_seeds
from torch_utils.stopping import StopSignals, Stopped, agree_stop, continue_command, signal_name, write_error
from predictors import experiments, load_predictor, snapshot
from predictors.settings import SolverSettings

TOY_CHUNK = 100   # toy data are drawn in chunks of this many images, one generator per chunk

def to_uint8(images):
    """[-1, 1] float images (B, C, H, W) -> uint8 (B, H, W, C), as EDM: x * 127.5 + 128, clipped."""
    return (images.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_writer(image):
    """``write(path)`` that saves the uint8 (H, W, C) ``image`` as a PNG (for :func:`atomic_write`)."""
    img = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, 'L' if image.shape[2] == 1 else 'RGB')
    return lambda p: img.save(p, format='PNG')


def npz_writer(**arrays):
    """``write(path)`` that saves ``arrays`` as an .npz under exactly that name (for :func:`atomic_write`)."""
    def write(p):
        with open(p, 'wb') as f:
            np.savez(f, **arrays)
    return write


def save_png(path, image):
    atomic_write(path, png_writer(image))


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


def parse_t_steps(text):
    """An explicit schedule from the command line: a JSON file holding a list of noise levels (or an
    object with a ``t_steps`` list, as a solver card), or the levels themselves, comma-separated
    (brackets allowed). ValueError (one line) otherwise; the levels are checked by
    :func:`solvers.check_t_steps`."""
    text = str(text).strip()
    if os.path.isfile(text):
        try:
            data = json.loads(read_settings_text(text, 'schedule file'))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'--t_steps {text}: not a JSON list of noise levels ({e})') from None
        if isinstance(data, dict):
            data = data.get('t_steps')
        where = f'--t_steps {text}'
    else:
        try:
            data = [float(v) for v in text.strip('[]').split(',') if v.strip()]
        except ValueError:
            raise ValueError(f'--t_steps {text!r}: neither a file nor a comma-separated list of noise levels') from None
        where = '--t_steps'
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in data):
        raise ValueError(f'{where}: expected a list of finite noise levels')
    try:
        return solvers.check_t_steps(data).tolist()
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from None


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
    denoise_to_zero: bool = False
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
    lock: object = None

    def release(self, cleanup=False):
        """Release the lock on ``outdir`` (rank 0 holds it from the folder check to the end)."""
        if self.lock is not None:
            self.lock.release(cleanup=cleanup)

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
                  guidance_rate=None, overwrite=False, resume=False, denoise_to_zero=False, **solver_options):
    """Validate a sampling run and load what it needs; write nothing. ValueError (or
    FileNotFoundError) with one line naming the problem.

    The run samples with a predictor (``predictor_path``: snapshot, run folder, experiment number
    or published pickle, :func:`predictors.load_predictor`), a solver card (``card``,
    :mod:`predictors.card`), or a plain solver on ``dataset_name`` with ``solver_options``
    (solver, num_steps, the schedule options, afs and the solver's options; defaults
    :data:`PLAIN_DEFAULTS`). A predictor or card carries its own solver settings, model and guidance:
    giving them again is an error. ``seeds``: a list or a string such as ``'0-63'`` or ``'1,2,5-10'``.
    ``outdir``, ``overwrite``, ``resume`` and ``denoise_to_zero``: see :func:`build_plan`."""
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
        if 't_steps' in given:
            given['t_steps'] = parse_t_steps(given['t_steps'])
            clash = [k for k in SolverSettings.SCHEDULE_KEYS if k in given]
            if clash:
                raise ValueError(f'--t_steps sets the whole schedule: drop --{clash[0]}')
        solver_utils.check_rho_used(given.get('schedule_type'), given.get('schedule_rho'))
        run_settings = plain_settings(given)
    model = load_model(dataset_name, model_path, guidance_type, guidance_rate, classifier_path=classifier_path,
                       prompt_path=prompt_path, use_fp16=use_fp16, device=device, prompt=prompt)
    model_identity = dict(dataset_name=dataset_name, model_path=model_path, guidance_type=guidance_type,
                          guidance_rate=guidance_rate, classifier_path=classifier_path, prompt=prompt,
                          prompt_path=prompt_path, use_fp16=bool(use_fp16))
    return build_plan(model, seed_list, outdir, run_settings, predictor, settings, origin=origin,
                      model_identity=model_identity, grid=grid, subdirs=subdirs, return_inters=return_inters,
                      batch=batch, device=device, overwrite=overwrite, resume=resume,
                      denoise_to_zero=bool(denoise_to_zero))


def plain_settings(options):
    """The :class:`SolverSettings` of a plain run from the options given (None: the default;
    :data:`PLAIN_DEFAULTS`, then the schedule's and the solver's)."""
    o = dict(PLAIN_DEFAULTS, **{k: v for k, v in options.items() if v is not None})
    opts = {k: o.pop(k) for k in solvers.OPTIONS if k in o}
    return SolverSettings(options=opts, **o)


def build_plan(model, seeds, outdir, run_settings, predictor=None, settings=None, origin=None, model_identity=None,
               grid=False, subdirs=True, return_inters=False, batch=64, device=torch.device('cpu'), overwrite=False,
               resume=False, denoise_to_zero=False):
    """The :class:`SamplingPlan` of a loaded ``model`` with ``run_settings`` (a
    :class:`~predictors.settings.SolverSettings`, or a dict it reads: a predictor's ``settings``),
    validated once, before anything is written.

    ``origin`` says where ``predictor`` came from (kind, sha256 of its file); without it a predictor
    module is identified by the sha256 of its weights. ``outdir`` None means the default folder, which
    names the predictor (its run folder and snapshot, or its card) or the plain solver's full
    settings: ``samples/[grids/]<dataset>/<name>``. The folder's manifest must match this run's
    configuration (:mod:`generation.manifest`) unless ``overwrite``; ``resume`` skips the seeds
    whose PNG is already complete. ``denoise_to_zero`` ends each run with one more model call,
    x <- D(x; sigma_min), counted in the NFE."""
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
    nfe = solvers.count_nfe(spec, len(t_steps), afs, predictor is not None, denoise_to_zero,
                            calls_per_eval=model.calls_per_eval)
    label = spec.name if predictor is None or spec.name == 'amed' else 'amed-' + spec.name
    origin = origin or (None if predictor is None else dict(kind='predictor object', sha256=_weights_sha256(predictor)))
    label += '-card' if origin and origin['kind'] == 'card' else ''
    dataset = getattr(model, 'dataset_name', None) or settings.get('dataset_name') or 'model'
    if outdir is None:
        name = _origin_folder(origin) if origin and 'file' in origin else \
            f'{label}_nfe{nfe}_' + _settings_tag(spec, t_steps, run_settings, denoise_to_zero)
        outdir = os.path.join('samples', *(['grids'] if grid else []), dataset, name)
    identity = {k: v for k, v in (origin or dict(kind='plain')).items() if k not in ('file', 'given')}
    config = dict(source=identity, model=model_identity or dict(dataset_name=dataset),
                  solver=dict(SolverSettings.resolved(spec, t_steps, afs).to_dict(),
                              **(dict(denoise_to_zero=True) if denoise_to_zero else {})),
                  layout=dict(grid=bool(grid), subdirs=bool(subdirs), return_inters=bool(return_inters)))
    check_output_dir(outdir)
    lock = locks.lock_on_rank0(outdir, f'--outdir {outdir}', wait=1.0)
    try:
        existing = manifest.check_folder(outdir, config, overwrite=overwrite, resume=resume)
        todo = None
        if resume:
            done = set(manifest.complete_seeds(outdir, seeds, subdirs, return_inters)) if existing is not None \
                else set()
            todo = [s for s in seeds if s not in done]
        solvers.warn_sigma_range(model, t_steps)
    except BaseException:
        if lock is not None:
            lock.release(cleanup=True)
        raise
    return SamplingPlan(model=model, seeds=seeds, outdir=outdir, solver=spec, t_steps=t_steps, afs=afs,
                        denoise_to_zero=denoise_to_zero, predictor=predictor, settings=settings, run_settings=run_settings,
                        label=label, nfe=nfe,
                        grid=grid, subdirs=subdirs, return_inters=return_inters, batch=batch, device=device,
                        config=config, existing=existing, overwrite=overwrite, todo=todo, lock=lock)


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


def _settings_tag(spec, t_steps, run_settings, denoise_to_zero=False):
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
    if denoise_to_zero:
        parts.append('dtz')
    parts += [f'{opt}{value}' for opt, value in solvers.options_of(spec).items()]
    return '-'.join(parts)


def _prepare(outdir, config, seeds, existing, overwrite):
    """Rank 0 prepares the folder (:func:`generation.manifest.prepare_folder`); a failed write is
    one line on every rank."""
    err = None
    if dist.is_main():
        try:
            manifest.prepare_folder(outdir, config, seeds, existing, overwrite)
        except OSError as e:
            err = write_error(os.path.join(outdir, manifest.MANIFEST), e) + '; nothing was sampled'
    dist.raise_on_any(err, OSError)


def write_batches(outdir, batches, produce, total, what, progress=True, unit='batch', resume=('--resume',)):
    """The writing loop of sample.py and ``fid.py toydata``: for each of this rank's ``batches``,
    ``produce(batch)`` yields ``(seed, [(path, write), ...])`` and each file is written atomically
    (``write(tmp_path)``). A seed counts as saved once all its files are (a seed without files, as
    in a grid, is the caller's to record). ``resume``: the options that continue the command.

    SIGINT/SIGTERM end the loop after the current batch, a failed write (full disk, read-only
    folder, file-size limit) at once; all ranks stop at the same batch (:func:`agree_stop`). The
    saved seeds are then added to the manifest (rank 0), and :class:`torch_utils.stopping.Stopped`
    says what was saved and how to continue. Returns the saved seeds (a SeedSet, all ranks, on
    rank 0; None elsewhere)."""
    saved, failure, signum = [], None, 0
    bar = tqdm(batches, unit=unit, disable=not (progress and dist.is_main()), dynamic_ncols=True)
    with StopSignals() as signals:
        for batch in bar:
            if len(batch) > 0:
                for seed, files in produce(batch):
                    try:
                        for path, write in files:
                            atomic_write(path, write)
                    except OSError as e:
                        failure = write_error(path, e)
                        break
                    if files:
                        saved.append(seed)
            signum, failure = agree_stop(signals.signum, failure)
            if signum or failure:
                break
    bar.close()
    parts = dist.gather_objects(str(SeedSet(saved)))
    written, listed = None, f'listed in {manifest.MANIFEST}'
    if dist.is_main():
        written = SeedSet()
        for part in parts:
            written = written | SeedSet(part)
        if written:
            try:
                manifest.record_written(outdir, written)
            except OSError as e:
                listed = f'not yet listed in {manifest.MANIFEST}: {write_error(manifest.MANIFEST, e)}'
                failure = failure or write_error(os.path.join(outdir, manifest.MANIFEST), e)
    count = len(written) if written is not None else 0
    if signum or failure:
        cause = f'{signal_name(signum)}: stopped' if signum and not failure else failure
        raise Stopped(f'{cause}; {count} of the {total} {what} of this run are saved (complete files, {listed}); '
                      f'continue with: {continue_command(add=resume)}', 128 + signum if signum and not failure else 1)
    return written


@torch.no_grad()
def generate_images(plan, progress=True):
    """Sample one image per seed of ``plan`` (:func:`plan_sampling`) and write PNGs (and trajectories).

    First, rank 0, which holds the folder's lock since :func:`plan_sampling`, writes the folder's
    manifest (``manifest.json``: the run's configuration and seeds; with ``overwrite`` after
    removing the folder's old sample files). This rank then handles its share of the seeds to do
    (:func:`torch_utils.distributed.rank_seeds`; with ``resume`` the seeds whose files were
    complete are skipped). Writes ``outdir/<seed//1000*1000>/<seed>.png`` (``subdirs``) or
    ``outdir/<seed>.png``; with ``grid`` a single ``outdir/grid.png`` of all seeds in seed order
    instead; with ``return_inters`` also ``<seed>.npz`` holding the trajectory at the grid points
    (``trajectory`` (N, C, H, W) float32 and ``sigmas`` (N,)). Stops cleanly on SIGINT/SIGTERM or
    a failed write (:func:`write_batches`, :class:`torch_utils.stopping.Stopped`). Returns the
    number of images written by this rank; the lock is released at the end."""
    try:
        return _generate_images(plan, progress)
    finally:
        plan.release()


def _generate_images(plan, progress):
    model, outdir, device = plan.model, plan.outdir, plan.device
    dist.barrier()   # every rank has planned (and, with resume, listed what is done) before anything is written
    _prepare(outdir, plan.config, plan.seeds, plan.existing, plan.overwrite)
    collected = []
    written = [0]
    sigmas = np.append(plan.t_steps.numpy(), [0.0] * plan.denoise_to_zero)   # the denoised sample last

    def produce(batch_seeds):
        seeds_list = batch_seeds.tolist()
        latents, cond = seeded_inputs(model, seeds_list, device)
        out = solvers.sample(model, latents, cond, solver=plan.solver, t_steps=plan.t_steps, afs=plan.afs,
                             predictor=plan.predictor, denoise_to_zero=plan.denoise_to_zero,
                             return_inters=plan.return_inters)
        x = out[-1] if plan.return_inters else out
        images = to_uint8(model.decode(x))
        for j, seed in enumerate(seeds_list):
            files = []
            if plan.grid:
                collected.append((seed, images[j]))
            else:
                files.append((seed_path(outdir, seed, 'png', plan.subdirs), png_writer(images[j])))
            if plan.return_inters:
                traj = out[:, j].float().cpu().numpy()
                files.append((seed_path(outdir, seed, 'npz', plan.subdirs),
                              npz_writer(trajectory=traj, sigmas=sigmas)))
            written[0] += 1
            yield seed, files

    todo = plan.seeds if plan.todo is None else plan.todo
    write_batches(outdir, dist.rank_seeds(todo, plan.batch), produce, len(todo), 'images', progress,
                  resume=() if plan.grid else ('--resume',))
    if plan.grid:
        gathered = dist.gather_objects(collected)
        err = None
        if dist.is_main():
            allimgs = sorted((item for part in gathered for item in part), key=lambda item: item[0])
            path = os.path.join(outdir, 'grid.png')
            try:
                save_png(path, make_grid(np.stack([img for _, img in allimgs])))
                manifest.record_written(outdir, SeedSet(plan.seeds))
            except OSError as e:
                err = write_error(path, e) + '; run the same command again'
        dist.raise_on_any(err, OSError)
    dist.barrier()
    return written[0]


def write_toy_data(dest, num, seed=0, dataset_name='toy', progress=True, overwrite=False):
    """Write ``num`` exact data samples of a built-in analytic model as PNGs (``dest/000000/000000.png``...).

    Image i comes from chunk i // 100, drawn as ``model.sample(100, generator)`` with a generator
    seeded from (seed, chunk) by numpy's SeedSequence, so it depends only on (seed, i), not on
    ``num`` or the number of processes, and its noise is unrelated to sample.py's seed i.
    Pixels: x * 127.5 + 128, clipped to uint8 (as sample.py). Chunks are split across ranks.

    The folder gets a sample manifest (:mod:`generation.manifest`: the model and the seed, with the
    image indices as its seeds), so it never mixes two data sets: a folder holding images of another
    seed or model, or images without a manifest, is refused before anything is written unless
    ``overwrite`` (which removes them first). Rank 0 holds ``dest`` under a lock
    (:mod:`torch_utils.locks`) from the check to the end; SIGINT/SIGTERM and failed writes stop
    cleanly (:func:`write_batches`)."""
    if num < 1:
        raise ValueError(f'--num must be at least 1, got {num}')
    check_seed(seed, '--seed')
    config = dict(source=dict(kind='toydata', seed=int(seed)), model=dict(dataset_name=dataset_name),
                  layout=dict(grid=False, subdirs=True, return_inters=False))
    check_output_dir(dest, '--dest')
    lock = locks.lock_on_rank0(dest, f'--dest {dest}', wait=1.0)
    try:
        existing = manifest.check_folder(dest, config, overwrite=overwrite, option='--dest')
        model = toy.build(dataset_name)
    except BaseException:
        if lock is not None:
            lock.release(cleanup=True)
        raise
    try:
        dist.barrier()   # every rank has checked the folder before rank 0 changes it
        _prepare(dest, config, range(num), existing, overwrite)

        def produce(chunk):
            c = int(chunk[0])
            state = np.random.SeedSequence([seed, c]).generate_state(2, np.uint32)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            images = to_uint8(model.sample(TOY_CHUNK, gen))
            for j in range(min(TOY_CHUNK, num - c * TOY_CHUNK)):
                i = c * TOY_CHUNK + j
                yield i, [(seed_path(dest, i, 'png'), png_writer(images[j]))]

        write_batches(dest, dist.rank_seeds(range(-(-num // TOY_CHUNK)), 1), produce, num, 'images', progress,
                      unit='chunk', resume=())
        dist.barrier()
    finally:
        if lock is not None:
            lock.release()
    dist.print0(f'Wrote {num} exact samples of {dataset_name} to {dest}')
