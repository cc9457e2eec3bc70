"""Train an AMED predictor (distil a teacher solver into the per-interval choice of the
intermediate time and two scale factors). Runs under plain python or torchrun.

Example (the built-in analytic model, CPU):

    python train.py --dataset_name=toy --sampler_stu=amed --sampler_tea=heun --num_steps=4 --M=1 \\
        --afs=True --schedule_type=time_uniform --schedule_rho=1 --batch=64 --total_kimg=2
"""

import json
import sys

import click
from click.core import ParameterSource

import solver_utils
import solvers
from models.presets import dataset_names
from torch_utils import distributed as dist
from torch_utils.misc import SEED_LIMIT, FiniteFloat
from training.launch import DEFAULTS as D, plan_resume, plan_training, release, run_training
from training.training_loop import TrainingDiverged, TrainingFailed, TrainingInterrupted
from training.loss import LOSSES
from predictors.networks import check_half_width


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


@click.command(context_settings=dict(show_default=True))
# General options.
@click.option('--dataset_name', help=f"Model preset: {', '.join(dataset_names())} [required unless --resume]", type=str)
@click.option('--model_path', help='Model file or URL overriding the preset', type=str)
@click.option('--predictor_path', help='Start from this predictor (ours or published): file, run folder or experiment number', type=str)
@click.option('--outdir', help='Where to create the run folder', type=str, default=D['outdir'])
@click.option('--desc', help='String appended to the run folder name', type=str)
@click.option('--batch', help='Total batch size (trajectories per Adam step)', type=click.IntRange(min=1), default=D['batch'])
@click.option('--batch-gpu', 'batch_gpu', help='Trajectories per process per round (gradient accumulation)',
              type=click.IntRange(min=1))
@click.option('--total_kimg', help='Training length in thousands of trajectories', type=FiniteFloat(min=0, min_open=True), default=D['total_kimg'])
@click.option('--lr', help='Adam learning rate', type=FiniteFloat(min=0, min_open=True), default=D['lr'])
@click.option('--seed', help='Random seed', type=click.IntRange(0, SEED_LIMIT - 1), default=D['seed'])
@click.option('--device', help='cpu or cuda (default: cuda when available)', type=click.Choice(['cpu', 'cuda']))
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
# Loss options.
@click.option('--loss', help='interval: the official per-interval loss; trajectory: the whole student run against '
              'the teacher\'s final state, gradients through every step', type=click.Choice(list(LOSSES)),
              default=D['loss'])
@click.option('--inter_weight', help='--loss=trajectory: weight of every intermediate student point (the final one has 1)',
              type=FiniteFloat(min=0), default=D['inter_weight'])
@click.option('--checkpointing', help='--loss=trajectory: gradient checkpointing per student step (memory of one '
              'step instead of all)', type=bool, default=D['checkpointing'])
# Solver options.
@click.option('--sampler_stu', help='Student solver', type=click.Choice(list(solvers.STUDENTS)), default=D['sampler_stu'])
@click.option('--sampler_tea', help='Teacher solver', type=click.Choice(list(solvers.TEACHERS)), default=D['sampler_tea'])
@click.option('--num_steps', help='Student time points N (NFE 2(N-1), minus 1 with AFS)', type=click.IntRange(2, solver_utils.MAX_TIME_POINTS), default=D['num_steps'])
@click.option('--M', 'M', help='Teacher points inserted per student interval', type=click.IntRange(min=1), default=D['M'])
@click.option('--afs', help='Analytical first step', type=bool, default=D['afs'])
# Schedule options.
@click.option('--sigma_min', help='Lowest noise level (default: the model\'s)', type=FiniteFloat(min=0, min_open=True))
@click.option('--sigma_max', help='Highest noise level (default: the model\'s)', type=FiniteFloat(min=0, min_open=True))
@click.option('--schedule_type', help='Time schedule', type=click.Choice(list(solver_utils.SCHEDULES)),
              default=D['schedule_type'])
@click.option('--schedule_rho', help='Schedule exponent (polynomial, time_uniform, discrete; logsnr takes none)', type=FiniteFloat(min=0, min_open=True), default=D['schedule_rho'])
# Additional (multistep) options.
@click.option('--max_order', help=f"Multistep order: {', '.join(f'{c.name} 1-{c.max_order_limit}' for c in solvers.REGISTRY.values() if c.max_order_limit)} (default: the highest)", type=int)
@click.option('--predict_x0', help='DPM-Solver++ data prediction (default True)', type=bool)
@click.option('--lower_order_final', help='DPM-Solver++ lower orders at the end (default True)', type=bool)
@click.option('--thresholding', help='DPM-Solver++: dynamic thresholding of the data prediction (default: '
              'predict_x0 on pixel models, False on latent models)', type=bool)
@click.option('--corrected_3m', help='DPM-Solver++: third-order-accurate order-3 update (default False: the '
              'official update)', type=bool)
@click.option('--variant', help='UniPC teacher: bh1 or bh2 (default bh2)', type=click.Choice(list(solver_utils.UNIPC_VARIANTS)))
@click.option('--deis_mode', help='DEIS: interpolation in VP time (tab), sigma (rhoab) or log sigma (logrho) (default tab)',
              type=click.Choice(list(solver_utils.DEIS_MODES)))
# Guidance options.
@click.option('--guidance_type', help='cg, cfg or uncond (models that take guidance)', type=click.Choice(['cg', 'cfg', 'uncond']))
@click.option('--guidance_rate', help='Guidance rate', type=FiniteFloat())
@click.option('--classifier_path', help='Classifier for classifier guidance', type=str)
@click.option('--prompt_path', help='ms_coco: captions CSV (column text; default ./src/prompts/MS-COCO_val2014_30k_captions.csv)', type=str)
@click.option('--prompt', help='ms_coco: train on this one prompt instead of the captions', type=str)
@click.option('--use_fp16', help='fp16 network weights (CUDA; models that support it)', is_flag=True)
@click.option('-n', '--dry-run', 'dry_run', help='Print the options and exit', is_flag=True)
@click.option('--progress/--no-progress', help='Show a progress bar', default=True)
@click.pass_context
def main(ctx, dry_run, progress, device, resume, **opts):
    """Train an AMED predictor; the run lands in a new folder of --outdir (with --resume: the run's
    own folder). Exits with 128 + the signal number after SIGINT/SIGTERM, once the partial snapshot
    and the training state are saved. The run folder is locked while the run writes it: a second
    --resume of a running run is refused."""
    given = [p.opts[0] for p in ctx.command.params
             if p.name in opts and ctx.get_parameter_source(p.name) is not ParameterSource.DEFAULT]
    if resume is not None and given:
        raise click.ClickException(f"--resume takes the run's stored options; remove {', '.join(given)}")
    if resume is None and opts['dataset_name'] is None:
        raise click.ClickException("Missing option '--dataset_name' (or --resume a run)")
    try:
        dev = dist.init(device)
        plan = plan_resume(resume, dev) if resume is not None else plan_training(opts, dev)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        dist.shutdown()
        raise click.ClickException(str(e))
    if dry_run:
        dist.print0(json.dumps(plan['options'], indent=2))
        dist.print0('Dry run; exiting.')
        release(plan)
        dist.shutdown()
        return
    try:
        run_training(plan, progress=progress)
    except TrainingInterrupted as e:
        dist.print0(e)
        sys.exit(128 + e.signum)
    except (TrainingDiverged, TrainingFailed, OSError) as e:
        raise click.ClickException(str(e))
    finally:
        release(plan)
        dist.shutdown()


if __name__ == '__main__':
    main()
