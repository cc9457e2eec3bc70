"""From training options to a finished run: validation, the run folder, logging, the loop.

``train.py`` parses options into a dict and calls :func:`plan_training` (or, for ``--resume``,
:func:`plan_resume`) and :func:`run_training`; the quickstart calls the same functions.
"""

import math
import os

import solver_utils
import solvers
from generation.generate import parse_t_steps
from models.presets import load_model
from torch_utils import distributed as dist
from torch_utils import locks
from torch_utils.stopping import write_error
from torch_utils.misc import check_name_length, check_output_dir
from predictors import experiments
from predictors.networks import KINDS, build_predictor, check_half_width
from predictors import load_predictor
from predictors.settings import SolverSettings
from predictors.snapshot import resolve_run_dir
from training.state import STATE_FILE, load_training_state
from training.loss import LOSS_OPTIONS, LOSSES, AMEDLoss, make_loss
from training.recipes import recipe_options
from training.training_loop import TrainingDiverged, TrainingFailed, TrainingInterrupted, split_batch, training_loop

#: Defaults of every training option (the official README's parameter table, plus ours). None: the model's
#: (sigma range) or the solver's (its options, :mod:`solvers`).
DEFAULTS = dict(
    dataset_name=None, model_path=None, outdir='./exps', desc=None, batch=64, batch_gpu=None, total_kimg=10.0,
    lr=5e-3, seed=0, scale_dir=0.01, scale_time=0.0, tick_kimg=1.0, snap_kimg=1.0, sampler_stu='amed',
    sampler_tea='heun', num_steps=4, M=1, afs=False, sigma_min=None, sigma_max=None,
    schedule_type=solver_utils.SCHEDULE_TYPE, schedule_rho=solver_utils.SCHEDULE_RHO, **dict.fromkeys(solvers.OPTIONS),
    guidance_type=None, guidance_rate=None, classifier_path=None, prompt_path=None, prompt=None, predictor_path=None,
    use_fp16=False, loss='interval', **LOSS_OPTIONS, check=64, predictor='network', recipe=None, t_steps=None)


class Logger:
    """Writes messages to log.txt (rank 0) and to the console."""

    def __init__(self, path):
        self.file = open(path, 'at') if path else None

    def __call__(self, msg, console=True):
        if console:
            print(msg, flush=True)
        if self.file is not None:
            self.file.write(msg + '\n')
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


_INTS = dict(batch=1, batch_gpu=1, seed=0, num_steps=2, M=1, max_order=1, check=0)
_FLOATS = dict(total_kimg=True, lr=True, tick_kimg=True, snap_kimg=False, scale_dir=False, scale_time=False,
               schedule_rho=True, sigma_min=True, sigma_max=True, inter_weight=False, soft_radius=False,
               guidance_rate=None)
_BOOLS = ('afs', 'checkpointing', 'use_fp16', *(n for n in solvers.OPTIONS if solvers.option_type(n) is bool))
_OPTIONAL = ('batch_gpu', 'sigma_min', 'sigma_max', 'guidance_rate', *solvers.OPTIONS)


def check_option_types(o):
    """ValueError (one line naming the option) when an option has the wrong type: what the CLI's
    option types ensure, for options that come from elsewhere (a stored training_options.json,
    the library): integers, finite numbers (positive where a zero makes no sense), booleans."""
    for name, value in o.items():
        if value is None and name in _OPTIONAL:
            continue
        if name in _INTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[name]:
                raise ValueError(f'{name} must be an integer of at least {_INTS[name]}, got {value!r}')
        elif name in _FLOATS:
            positive = _FLOATS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    (positive is not None and (value <= 0 if positive else value < 0)):
                kind = 'a finite number' + {True: ' > 0', False: ' >= 0', None: ''}[positive]
                raise ValueError(f'{name} must be {kind}, got {value!r}')
        elif name in _BOOLS and not isinstance(value, bool):
            raise ValueError(f'{name} must be true or false, got {value!r}')


def plan_training(options, device):
    """Validate ``options`` (ValueError naming the problem), load the model, and return the plan:
    a dict with the model, the loss/predictor arguments, the snapshot settings and the run name
    function. Writes nothing."""
    t_steps = options.get('t_steps')
    if t_steps is not None:   # an explicit student schedule: its length is num_steps
        t_steps = parse_t_steps(t_steps) if isinstance(t_steps, str) else solvers.check_t_steps(t_steps).tolist()
        options = {'num_steps': len(t_steps), **options, 't_steps': t_steps}   # AMEDLoss checks a given one
    steps = options.get('num_steps', {**DEFAULTS, **recipe_options(options.get('recipe'))}['num_steps'])
    o = {**DEFAULTS, **recipe_options(options.get('recipe'), steps), **options}
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    check_option_types(o)
    if o['predictor'] not in KINDS:
        raise ValueError(f"unknown predictor {o['predictor']!r} (choose one of {', '.join(KINDS)})")
    for opt in ('scale_dir', 'scale_time'):
        check_half_width(opt, o[opt])
    if not (o['snap_kimg'] >= 0 and math.isfinite(o['snap_kimg'])):
        raise ValueError(f"--snap must be a finite number of kimg >= 0 (0: only the final snapshot), "
                         f"got {o['snap_kimg']}")
    loss_options = {k: o[k] for k in LOSS_OPTIONS}
    make_loss(o['loss'], None, **loss_options)      # the loss and its options, checked before any model loads
    solver_utils.check_rho_used(o['schedule_type'], o['schedule_rho'])
    split_batch(o['batch'], o['batch_gpu'], dist.get_world_size())

    def name_fn(run_id, calls_per_eval):
        nfe = experiments.training_nfe(o['num_steps'], o['afs'], calls_per_eval)
        return experiments.run_name(run_id, o['dataset_name'], o['num_steps'], nfe, o['sampler_stu'], o['sampler_tea'],
                                    o['M'], 'explicit' if o['t_steps'] else o['schedule_type'], o['schedule_rho'],
                                    o['afs'], o['desc'],
                                    trajectory=LOSSES[o['loss']].run_tag is not None)
    # Before any model loads: the run folder can be made. Its name is checked with the NFE of a
    # guided model (two calls per evaluation), the longest it can be.
    check_output_dir(o['outdir'])
    check_name_length(o['outdir'], name_fn(experiments.next_run_id(o['outdir']), 2), '--desc')

    model = load_model(o['dataset_name'], o['model_path'], o['guidance_type'], o['guidance_rate'],
                       o['classifier_path'], o['prompt_path'], use_fp16=o['use_fp16'], device=device,
                       prompt=o['prompt'])
    loss_kwargs = {k: o[k] for k in ('sampler_stu', 'sampler_tea', 'M', 'afs', *SolverSettings.SCHEDULE_KEYS,
                                     't_steps', *solvers.OPTIONS)}
    loss_fn = AMEDLoss(model, **loss_kwargs)   # validates every solver and schedule option; built once
    objective = make_loss(o['loss'], loss_fn, **loss_options)
    nfe = experiments.training_nfe(o['num_steps'], o['afs'], model.calls_per_eval)

    student = loss_fn.student
    solver_settings = SolverSettings(o['sampler_stu'], num_steps=o['num_steps'], options=solvers.options_of(student),
                                     schedule_type=o['schedule_type'], schedule_rho=o['schedule_rho'],
                                     sigma_min=loss_fn.t_student[-1], sigma_max=loss_fn.t_student[0], afs=o['afs'],
                                     t_steps=o['t_steps'])
    settings = dict(
        solver_settings.to_dict(), sampler_tea=o['sampler_tea'], M=o['M'], loss=o['loss'], nfe=nfe,
        guidance_type=o['guidance_type'], guidance_rate=o['guidance_rate'], dataset_name=o['dataset_name'],
        model_path=o['model_path'], img_shape=list(model.img_shape), label_dim=int(model.label_dim))
    predictor_kwargs = dict(scale_dir=o['scale_dir'], scale_time=o['scale_time'])
    if o['predictor'] == 'table':
        predictor_kwargs.update(kind='table', t_steps=loss_fn.t_student)
    init_state = None
    if o['predictor_path'] is not None:
        init_state = initial_weights(o['predictor_path'], settings, predictor_kwargs)
    options = dict(o, device=str(device), world_size=dist.get_world_size(), loss_kwargs=loss_kwargs,
                   predictor_kwargs=predictor_kwargs, settings=settings)
    solvers.warn_sigma_range(model, loss_fn.t_student)
    return dict(model=model, loss_fn=loss_fn, objective=objective, options=options, device=device, init_state=init_state,
                name_fn=lambda run_id: name_fn(run_id, model.calls_per_eval))


def initial_weights(spec, settings, predictor_kwargs):
    """Weights to start training from: a predictor (ours or published; path, run folder or
    experiment number) trained for the same student, number of steps and model."""
    predictor, loaded, _, _ = load_predictor(spec)
    for key in ('solver', 'num_steps', 'dataset_name'):
        if loaded.get(key) != settings[key]:
            raise ValueError(f"--predictor_path was trained with {key}={loaded.get(key)!r}, this run uses {settings[key]!r}")
    state = getattr(predictor, 'net', predictor).state_dict()
    target = build_predictor(predictor_kwargs)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--predictor_path has other scale heads than --scale_dir/--scale_time ask for "
                         f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    return {k: v.clone() for k, v in target.state_dict().items()}


def plan_resume(spec, device):
    """The plan of an unfinished run (folder or experiment number) with the options stored in its
    training_options.json; the run continues in its folder from its training state (from the
    start when it stopped before the first one was saved)."""
    run_dir = resolve_run_dir(spec)
    # Held from the check that the run is unfinished to its end: a second --resume is refused.
    lock = locks.lock_on_rank0(run_dir, f'run {run_dir}', wait=1.0)
    try:
        stored = experiments.read_run_options(run_dir)
        if experiments.incomplete_reason(run_dir) is None:
            raise ValueError(f'run {run_dir} is complete: nothing to resume')
        try:
            check_option_types({k: stored[k] for k in DEFAULTS if k in stored})
        except ValueError as e:
            raise ValueError(f'{os.path.join(run_dir, experiments.OPTIONS_FILE)}: {e}') from None
        plan = plan_training({k: stored[k] for k in DEFAULTS if k in stored}, device)
        state_path = os.path.join(run_dir, STATE_FILE)
        state = load_training_state(state_path) if os.path.exists(state_path) else None
        experiments.check_state_belongs(state, plan['options'], state_path)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    world = stored.get('world_size')
    if isinstance(world, int) and world != dist.get_world_size():
        dist.print0(f'Note: {run_dir} was trained on {world} process(es) and resumes on {dist.get_world_size()}: '
                    f'the result equals an uninterrupted run only up to rounding (about 1e-5); resume on {world} '
                    f'process(es) for bit-for-bit equality')
    plan.update(run_dir=run_dir, resume=state, lock=lock)
    return plan


def release(plan):
    """Release the run folder's lock that :func:`plan_resume` or :func:`run_training` took (idempotent)."""
    lock = plan.get('lock') if plan else None
    if lock is not None:
        lock.release()


def run_training(plan, progress=True):
    """Create the run folder (rank 0; a resumed plan keeps its own), write training_options.json
    and log.txt, train, and save the snapshot. Returns (run_dir, snapshot path) on rank 0 and
    (None, None) elsewhere. Rank 0 holds the run folder under a lock (:mod:`torch_utils.locks`)
    until the end; a new run's experiment number is reserved under a lock of ``outdir``.
    :class:`TrainingInterrupted`, :class:`TrainingDiverged` and :class:`TrainingFailed` (a failed
    write) are noted in log.txt and passed on."""
    o = plan['options']
    run_dir = None
    try:
        if dist.is_main():
            run_dir = plan.get('run_dir')
            if run_dir is None:
                run_dir, plan['lock'] = experiments.make_run_dir(o['outdir'], plan['name_fn'])
                try:
                    experiments.write_run_options(run_dir, dict(o, run_dir=run_dir, kimg=0, complete=False))
                except OSError as e:
                    raise TrainingFailed(f"{write_error(os.path.join(run_dir, experiments.OPTIONS_FILE), e)}; "
                                         f"nothing was trained") from None
        return _run(plan, run_dir, progress)
    finally:
        release(plan)


def _run(plan, run_dir, progress):
    o = plan['options']
    resume = plan.get('resume')
    log = Logger(os.path.join(run_dir, 'log.txt') if run_dir else None)
    try:
        s = o['settings']
        if dist.is_main():
            log(f'Run folder: {run_dir}')
            if plan.get('run_dir') is not None:
                log(f"Resuming at {resume['position']['cur_nimg'] / 1000 if resume else 0:g} kimg")
            log(f"Student {o['sampler_stu']} (NFE {s['nfe']}), teacher {o['sampler_tea']} with M={o['M']}, "
                f"{o['loss']} loss, "
                + (f"explicit schedule {', '.join(f'{t:g}' for t in s['t_steps'])}, " if s.get('t_steps') else
                   f"{o['schedule_type']} schedule, sigma {s['sigma_min']:g}..{s['sigma_max']:g}, ") +
                f"{dist.get_world_size()} process(es) on {plan['device']}")
        try:
            _, path = training_loop(plan['model'], run_dir, plan['objective'], o['predictor_kwargs'], s,
                                    batch=o['batch'], batch_gpu=o['batch_gpu'], total_kimg=o['total_kimg'], lr=o['lr'],
                                    seed=o['seed'], device=plan['device'], tick_kimg=o['tick_kimg'],
                                    snap_kimg=o['snap_kimg'], progress=progress, log=log,
                                    init_state=plan.get('init_state'), resume=resume,
                                    identity=experiments.run_identity(o), check_num=o['check'])
        except (TrainingInterrupted, TrainingDiverged, TrainingFailed) as e:
            if dist.is_main():
                log(str(e), console=False)
            raise
        if dist.is_main():
            log(f'Saved {path}')
    finally:
        log.close()
    return run_dir, path
