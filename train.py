"""Train an AMED predictor (distil a teacher solver into the per-interval choice of the
intermediate time and two scale factors). Runs under plain python or torchrun. See --help for
examples and the recipes."""

import json
import sys

import click
from click.core import ParameterSource

import cli
import solvers
from torch_utils import distributed as dist
from torch_utils.misc import SEED_LIMIT, FiniteFloat
from training import LOSSES, RECIPES, plan_resume, plan_training, run_training
from training.launch import DEFAULTS as D, release
from training.recipes import describe
from training.training_loop import TrainingDiverged, TrainingFailed, TrainingInterrupted
from predictors.networks import check_half_width

EXAMPLES = """
Examples:
  # the paper's AMED-Plugin recipe on the built-in analytic model (CPU), shorter
  python train.py --dataset_name=toy --recipe=paper-plugin --total_kimg=2 --batch=32
  # AMED-Solver by hand
  python train.py --dataset_name=toy --sampler_stu=amed --sampler_tea=heun --num_steps=4 --M=1 \\
      --afs=True --schedule_type=time_uniform --schedule_rho=1 --batch=64 --total_kimg=2
  # CIFAR-10 on 4 GPUs, the paper's recipe
  torchrun --standalone --nproc_per_node=4 train.py --dataset_name=cifar10 --recipe=paper-solver
  python train.py --resume=3                               # continue experiment 3
  python train.py --dataset_name=toy --recipe=paper-solver --dry-run

Recipes (--recipe; options given explicitly override the recipe's):
""" + '\n'.join('  ' + describe(name).replace('\n', '\n  ') for name in RECIPES) + '\n'


class HalfWidth(click.ParamType):
    """A scale range half-width in [0, 1); 'True' means the recommended 0.2 and 'False' 0 (the
    official boolean --scale_time)."""

    name = 'half-width'

    def __init__(self, true_value):
        self.true_value = true_value

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
        elif str(value).lower() in ('true', 'yes', 'on'):
            v = self.true_value
        elif str(value).lower() in ('false', 'no', 'off'):
            v = 0.0
        else:
            try:
                v = float(value)
            except ValueError:
                self.fail(f'{value!r} is neither a number in [0, 1) nor True/False', param, ctx)
        try:
            return check_half_width(param.name if param else 'value', v)
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command(context_settings=dict(show_default=True), epilog=cli.epilog(EXAMPLES))
# General options.
@click.option('--recipe', help=f"Training recipe: {', '.join(RECIPES)} (see below); explicit options override it",
              type=click.Choice(list(RECIPES)))
@cli.model_options('dataset_name', 'model_path', dataset_help='Model preset [required unless --resume]')
@click.option('--predictor_path', help='Start from this predictor (ours or published): file, run folder or experiment number', type=str)
@click.option('--outdir', help='Where to create the run folder', type=str, default=D['outdir'])
@click.option('--desc', help='String appended to the run folder name', type=str)
@click.option('--batch', help='Total batch size (trajectories per Adam step)', type=click.IntRange(min=1), default=D['batch'])
@click.option('--batch-gpu', 'batch_gpu', help='Trajectories per process per round (gradient accumulation)',
              type=click.IntRange(min=1))
@click.option('--total_kimg', help='Training length in thousands of trajectories', type=FiniteFloat(min=0, min_open=True), default=D['total_kimg'])
@click.option('--lr', help='Adam learning rate', type=FiniteFloat(min=0, min_open=True), default=D['lr'])
@click.option('--seed', help='Random seed', type=click.IntRange(0, SEED_LIMIT - 1), default=D['seed'])
@cli.model_options('device')
@click.option('--scale_dir', help='Half-width s in [0, 1) of the scale_dir range (1-s, 1+s); 0 turns the head off',
              type=HalfWidth(0.01), default=D['scale_dir'])
@click.option('--scale_time', help='Half-width s in [0, 1) of the scale_time range (1-s, 1+s); 0 turns the head off; True = 0.2',
              type=HalfWidth(0.2), default=D['scale_time'])
@click.option('--tick', 'tick_kimg', help='Progress/stats line every this many kimg', type=FiniteFloat(min=0, min_open=True), default=D['tick_kimg'])
@click.option('--snap', 'snap_kimg', help='Snapshot (marked partial) and training state every this many kimg; '
              '0: only the final snapshot. SIGINT/SIGTERM also save them after the current batch',
              type=FiniteFloat(min=0), default=D['snap_kimg'])
@click.option('--resume', help='Continue an interrupted run (folder, or experiment number in ./exps or ./exp) in '
              'its folder with its stored options; takes no other option but --device, --no-progress and --dry-run',
              type=str)
@click.option('--check', help='Held-out teacher trajectories on which the final predictor is compared with its plain '
              'base solver at the same NFE (a "helps / does not help" line, stats.jsonl, the snapshot); 0: no check',
              type=click.IntRange(min=0), default=D['check'])
@click.option('--predictor', help='network: the paper\'s ~9k-parameter network reading the model\'s 8x8 feature; '
              'table: one r (and scales) per student interval, no feature', type=click.Choice(['network', 'table']),
              default=D['predictor'])
# Loss options.
@click.option('--loss', help='interval: the official per-interval loss; trajectory: the whole student run against '
              'the teacher\'s final state, gradients through every step', type=click.Choice(list(LOSSES)),
              default=D['loss'])
@click.option('--inter_weight', help='--loss=trajectory: weight of every intermediate student point (the final one has 1)',
              type=FiniteFloat(min=0), default=D['inter_weight'])
@click.option('--soft_radius', help='--loss=trajectory: a soft teacher: the student may start within this radius '
              '(relative to the noise\'s norm) of the teacher\'s start, moved by one projected gradient step; 0: off',
              type=FiniteFloat(min=0), default=D['soft_radius'])
@click.option('--checkpointing', help='--loss=trajectory: gradient checkpointing per student step (memory of one '
              'step instead of all)', type=bool, default=D['checkpointing'])
# Solver options.
@click.option('--sampler_stu', help='Student solver', type=click.Choice(list(solvers.STUDENTS)), default=D['sampler_stu'])
@click.option('--sampler_tea', help='Teacher solver', type=click.Choice(list(solvers.TEACHERS)), default=D['sampler_tea'])
@click.option('--M', 'M', help='Teacher points inserted per student interval', type=click.IntRange(min=1), default=D['M'])
# Schedule options.
@cli.schedule_options(dict(D, sigma_min=None, sigma_max=None))
@click.option('--t_steps', help='An explicit student schedule replacing the schedule options: noise levels, '
              'descending and comma-separated, or a JSON file with their list (a card\'s, a GITS search\'s); '
              'its length is --num_steps. The teacher refines it evenly in t^(1/--schedule_rho)', type=str)
# Solver options (each registered solver's, given to whichever of student and teacher takes them).
@cli.solver_options
# Model options.
@cli.model_options('guidance_type', 'guidance_rate', 'classifier_path', 'prompt_path', 'prompt', 'use_fp16')
@click.option('-n', '--dry-run', 'dry_run', help='Validate, load the model, print the options; write nothing', is_flag=True)
@click.option('--progress/--no-progress', help='Show a progress bar', default=True)
@click.pass_context
@cli.user_errors
def main(ctx, dry_run, progress, device, resume, **opts):
    """Train an AMED predictor; the run lands in a new folder of --outdir (with --resume: the run's
    own folder). Exits with 128 + the signal number after SIGINT/SIGTERM, once the partial snapshot
    and the training state are saved. The run folder is locked while the run writes it: a second
    --resume of a running run is refused."""
    given = [p.opts[0] for p in ctx.command.params
             if p.name in opts and ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT]
    if resume is not None and given:
        raise click.ClickException(f"--resume takes the run's stored options; remove {', '.join(given)}")
    if opts['recipe'] is not None:     # the recipe's values (training.launch), then the options given explicitly
        explicit = {p.name for p in ctx.command.params if ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT}
        opts = {k: v for k, v in opts.items() if k in explicit}
    if opts.get('t_steps') is not None and ctx.get_parameter_source('num_steps') is ParameterSource.DEFAULT:
        opts.pop('num_steps', None)     # the explicit schedule's length
    if resume is None and opts.get('dataset_name') is None:
        raise click.ClickException("Missing option '--dataset_name' (or --resume a run)")
    dev = dist.init(device)
    plan = plan_resume(resume, dev) if resume is not None else plan_training(opts, dev)
    if dry_run:
        dist.print0(json.dumps(plan['options'], indent=2))
        dist.print0('Dry run: nothing written.')
        release(plan)
        return
    try:
        run_training(plan, progress=progress)
    except TrainingInterrupted as e:
        dist.print0(e)
        sys.exit(128 + e.signum)
    except (TrainingDiverged, TrainingFailed) as e:
        raise click.ClickException(str(e))
    finally:
        release(plan)


if __name__ == '__main__':
    cli.run(main)
