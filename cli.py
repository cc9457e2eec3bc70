"""What the command lines share, built from the registries: the solver options (from each solver
class's :class:`solvers.Option` data), the schedule options, the model options (from the presets
of :mod:`models.presets`), and one error policy for every command (train.py, sample.py, fid.py,
``python -m integrations.card``).

A new solver option or model preset appears in every CLI by being declared; nothing here lists
them by name.
"""

import functools
import sys

import click

import solver_utils
import solvers
from models.presets import PRESETS, dataset_names
from torch_utils import distributed as dist
from torch_utils.misc import FiniteFloat
from torch_utils.stopping import Stopped

#: The errors a library raises for bad input: each becomes one line 'Error: ...' and exit code 1.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


def one_line(e):
    """The first line of an error's message (its type when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run(command):
    """Run a click ``command`` as a script's entry point: click's own handling of arguments,
    errors and exit codes, then the process ends through :func:`torch_utils.distributed.exit_process`
    (which a torchrun worker needs to end cleanly)."""
    try:
        command()   # click's standalone mode ends every run with SystemExit
    except SystemExit as e:
        dist.exit_process(e.code)
    dist.exit_process(0)


def user_errors(fn):
    """The one error policy of the CLIs: a library's user error (:data:`USER_ERRORS`) becomes
    click's one-line 'Error: ...' with exit code 1; work stopped by a signal or a failed write
    (:class:`torch_utils.stopping.Stopped`) prints what was saved and exits with its code; and the
    process group is shut down however the command ends."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(one_line(e)) from None
        except Stopped as e:   # stopped by a signal or a failed write: what was saved, how to continue
            dist.print0(e)
            sys.exit(e.code)
        finally:
            dist.shutdown()
    return wrapper


def apply(fn, options):
    """Decorate ``fn`` with click ``options`` (listed top to bottom, as they appear in --help)."""
    for option in reversed(options):
        fn = option(fn)
    return fn


# ----------------------------------------------------------------------------------------------
# Solver and schedule options.

def _option_help(name):
    """The help line of solver option ``name``, from the solvers that take it (their Option data)."""
    parts = []
    for cls, opt in solvers.option_declarations(name):
        default = getattr(opt, 'default', None)
        parts.append(f"{cls.name}: {getattr(opt, 'help', '') or name}" + ('' if default is None else f' (default: {default})'))
    return '; '.join(parts)


def solver_options(fn):
    """The options of every registered solver (``--max_order``, ``--predict_x0``, ...), each
    documented from the solvers that take it; default None: the solver's own default."""
    def click_type(type_):
        if isinstance(type_, tuple):
            return click.Choice(list(type_))
        return {int: int, float: FiniteFloat(), bool: bool}.get(type_, str)
    return apply(fn, [click.option(f'--{name}', help=_option_help(name), type=click_type(solvers.option_type(name)))
                      for name in solvers.OPTIONS])


def schedule_options(defaults=None, shown=None):
    """The schedule options (``--num_steps``, ``--schedule_type``, ``--schedule_rho``,
    ``--sigma_min``, ``--sigma_max``, ``--afs``). ``defaults``: a command's click defaults by name
    (missing: None, and the help shows the library's default, or ``shown[name]``)."""
    defaults, shown = defaults or {}, shown or {}
    specs = [
        ('num_steps', 'Time points N of the schedule', click.IntRange(2, solver_utils.MAX_TIME_POINTS), 4),
        ('schedule_type', 'Time schedule', click.Choice(list(solver_utils.SCHEDULES)), solver_utils.SCHEDULE_TYPE),
        ('schedule_rho', 'Schedule exponent (polynomial, time_uniform, discrete; logsnr takes none)',
         FiniteFloat(min=0, min_open=True), f'{solver_utils.SCHEDULE_RHO:g}'),
        ('sigma_min', 'Lowest noise level', FiniteFloat(min=0, min_open=True), "the model's"),
        ('sigma_max', 'Highest noise level', FiniteFloat(min=0, min_open=True), "the model's"),
        ('afs', 'Analytical first step (saves one model evaluation)', bool, False),
    ]
    options = []
    for name, text, type_, library_default in specs:
        default = defaults.get(name)
        if default is None:
            text += f'  [default: {shown.get(name, library_default)}]'
        options.append(click.option(f'--{name}', help=text, type=type_, default=default,
                                    show_default=default is not None))
    return lambda fn: apply(fn, options)


# ----------------------------------------------------------------------------------------------
# Model options.

def _takers(flag):
    return ', '.join(n for n in dataset_names() if getattr(PRESETS[n], flag))


def _guidance_types():
    return sorted({g for p in PRESETS.values() for g in p.guidance_types if g is not None})


def _guidance_help():
    by_preset = [f"{g}: {', '.join(n for n in dataset_names() if g in PRESETS[n].guidance_types)}"
                 for g in _guidance_types()]
    return f"Guidance ({'; '.join(by_preset)})"


MODEL_OPTIONS = ('dataset_name', 'model_path', 'guidance_type', 'guidance_rate', 'classifier_path', 'prompt',
                 'prompt_path', 'use_fp16', 'device')


def model_options(*names, dataset_help=None, device_default=None):
    """The model options ``names`` (default: all of :data:`MODEL_OPTIONS`), documented from the
    presets (which of them takes a model file, guidance, a classifier, prompts, fp16)."""
    names = names or MODEL_OPTIONS
    specs = dict(
        dataset_name=dict(help=dataset_help or f"Model preset: {', '.join(dataset_names())}", type=str),
        model_path=dict(help=f'Model file or URL overriding the preset ({_takers("takes_model_path")})', type=str),
        guidance_type=dict(help=_guidance_help(), type=click.Choice(_guidance_types())),
        guidance_rate=dict(help='Guidance rate (with --guidance_type)', type=FiniteFloat()),
        classifier_path=dict(help=f'Classifier for classifier guidance, file or URL ({_takers("takes_classifier")})',
                             type=str),
        prompt=dict(help=f'One prompt for every image ({_takers("takes_prompts")}; default: caption i of '
                    f'--prompt_path for seed i)', type=str),
        prompt_path=dict(help=f'Captions CSV, column text ({_takers("takes_prompts")}; default '
                         f'./src/prompts/MS-COCO_val2014_30k_captions.csv)', type=str),
        use_fp16=dict(help=f'fp16 network weights on CUDA ({_takers("takes_fp16")})', is_flag=True),
        device=dict(help='cpu or cuda' + ('' if device_default else ' (default: cuda when available)'),
                    type=click.Choice(['cpu', 'cuda']), default=device_default, show_default=bool(device_default)),
    )
    return lambda fn: apply(fn, [click.option(f'--{n}', **specs[n]) for n in names])


def epilog(text):
    """``text`` (e.g. an 'Examples:' block) as a --help epilog, each paragraph kept as written."""
    return '\n\n'.join('\b\n' + part for part in text.strip('\n').split('\n\n'))
