"""Sample images with a trained AMED predictor, or with a plain solver as a baseline.
Runs under plain python or torchrun (seeds are split across processes).

Examples:

    python sample.py --predictor_path=0 --seeds=0-63 --grid             # experiment 0 in ./exps
    python sample.py --dataset_name=toy --solver=ipndm --num_steps=7 --afs=True --seeds=0-99
    python sample.py --dataset_name=toy --solver=unipc --num_steps=6 --schedule_type=logsnr --afs=True --seeds=0-63
    python sample.py --dataset_name=toy --solver=deis --t_steps=80,10,2,0.5,0.1,0.002 --seeds=0-63
    python sample.py --card=card.json --seeds=0-63 --grid                # a solver card (predictors/card.py)
"""

import sys

import click

import solver_utils
import solvers
from models.presets import dataset_names
from torch_utils import distributed as dist
from torch_utils.misc import MAX_SEEDS, FiniteFloat
from torch_utils.stopping import Stopped
from generation import generate

@click.command(context_settings=dict(show_default=True))
@click.option('--predictor_path', help='Predictor snapshot, run folder, or experiment number (./exps, ./exp)', type=str)
@click.option('--card', help='Solver card (JSON from python -m integrations.card export) in place of a predictor', type=str)
@click.option('--dataset_name', help=f"Model preset ({', '.join(dataset_names())}); default: the predictor's", type=str)
@click.option('--model_path', help='Model file or URL overriding the preset', type=str)
@click.option('--batch', 'batch', help='Images per batch and process', type=click.IntRange(min=1), default=64)
@click.option('--seeds', help=f'Seeds in [0, 2^32), e.g. 0-49999 or 1,2,5-10; at most {MAX_SEEDS} per run', type=str, default='0-63')
# `--grid` alone or `--grid=True/False` (the official form): a boolean whose value may be left out.
@click.option('--grid', help='Write one grid of all seeds (grid.png) instead of one PNG per seed; --grid or --grid=BOOL',
              type=bool, is_flag=False, flag_value=True, default=False)
@click.option('--subdirs/--no-subdirs', help='Put PNGs in 1000-seed subfolders', default=True)
@click.option('--outdir', help='Output folder  [default: samples/<dataset>/<run folder>/<snapshot> with a predictor, '
              'samples/<dataset>/<solver>_nfe<NFE>_<all settings> without]', type=str)
@click.option('--overwrite', help='Replace the samples of another configuration in --outdir (they are removed first)', is_flag=True)
@click.option('--resume', help='Skip the seeds whose PNG in --outdir is already complete (same configuration)', is_flag=True)
@click.option('--return_inters', help='Also save each trajectory at the grid points as <seed>.npz', type=bool, default=False)
@click.option('--classifier_path', help='Classifier for classifier guidance (file or URL)', type=str)
@click.option('--prompt', help='ms_coco: one prompt for every image (default: caption i of --prompt_path for seed i)', type=str)
@click.option('--prompt_path', help='ms_coco: captions CSV (column text; default ./src/prompts/MS-COCO_val2014_30k_captions.csv)', type=str)
@click.option('--use_fp16', help='fp16 network weights (CUDA; models that support it)', is_flag=True)
@click.option('--device', help='cpu or cuda (default: cuda when available)', type=click.Choice(['cpu', 'cuda']))
@click.option('--progress/--no-progress', help='Show a progress bar', default=True)
# Plain-solver options (only without --predictor_path/--card: they carry their own).
@click.option('--solver', help=f"Plain solver (no predictor)  [default: {generate.PLAIN_DEFAULTS['solver']}]", type=click.Choice(list(solvers.PLAIN)))
@click.option('--num_steps', help=f"Time points N  [default: {generate.PLAIN_DEFAULTS['num_steps']}]", type=click.IntRange(2, solver_utils.MAX_TIME_POINTS))
@click.option('--schedule_type', help=f'Time schedule  [default: {solver_utils.SCHEDULE_TYPE}]', type=click.Choice(list(solver_utils.SCHEDULES)))
@click.option('--schedule_rho', help=f'Schedule exponent (polynomial, time_uniform, discrete; logsnr takes none)  [default: {solver_utils.SCHEDULE_RHO:g}]', type=FiniteFloat(min=0, min_open=True))
@click.option('--sigma_min', help="Lowest noise level  [default: the model's]", type=FiniteFloat(min=0, min_open=True))
@click.option('--sigma_max', help="Highest noise level  [default: the model's]", type=FiniteFloat(min=0, min_open=True))
@click.option('--t_steps', help='Explicit schedule replacing the schedule options: noise levels, descending and comma-separated, or a JSON file with their list (or a card\'s t_steps)', type=str)
@click.option('--afs', help='Analytical first step  [default: False]', type=bool)
@click.option('--denoise_to_zero', help='Finish with one more model call x <- D(x; sigma_min), counted in the NFE  [default: False]', type=bool)
@click.option('--max_order', help=f"Multistep order: {', '.join(f'{c.name} 1-{c.max_order_limit}' for c in solvers.REGISTRY.values() if c.max_order_limit)}  [default: the highest]", type=int)
@click.option('--predict_x0', help='dpmpp, unipc: data prediction (DPM-Solver++; False: noise prediction, DPM-Solver)  [default: True]', type=bool)
@click.option('--lower_order_final', help='dpmpp, unipc: lower orders on the last steps  [default: True]', type=bool)
@click.option('--corrected_3m', help='dpmpp: third-order-accurate order-3 update  [default: False, the official update]', type=bool)
@click.option('--variant', help='unipc: B(h) = h (bh1) or e^h - 1 (bh2)  [default: bh2]', type=click.Choice(list(solver_utils.UNIPC_VARIANTS)))
@click.option('--deis_mode', help='deis: interpolate the direction in VP time (tab), sigma (rhoab) or log sigma (logrho, as diffusers)  [default: tab]', type=click.Choice(list(solver_utils.DEIS_MODES)))
@click.option('--thresholding', help='dpmpp, unipc: dynamic thresholding of the data prediction  [default: predict_x0 on pixel models, False on latent models]', type=bool)
@click.option('--guidance_type', help='Guidance of a plain run (cg: imagenet256, cfg: ms_coco, uncond: lsun_bedroom_ldm)', type=click.Choice(['cg', 'cfg', 'uncond']))
@click.option('--guidance_rate', help='Guidance rate of a plain run', type=FiniteFloat())
def main(device, progress, **options):
    """Generate one PNG per seed (or a grid) with an AMED predictor, a solver card or a plain solver.
    --outdir is locked while the run writes it (a second writer is refused). SIGINT/SIGTERM stop
    after the current batch (exit 128 + the signal number) and a failed write stops at once (exit
    1): the saved images are complete and listed in manifest.json, and the message says how to
    continue (--resume)."""
    try:
        dev = dist.init(device)
        plan = generate.plan_sampling(device=dev, **options)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        dist.shutdown()
        raise click.ClickException(str(e))
    dist.print0(plan.describe())
    try:
        generate.generate_images(plan, progress=progress)
    except Stopped as e:
        dist.print0(e)
        sys.exit(e.code)
    except OSError as e:
        raise click.ClickException(str(e))
    finally:
        plan.release()
        dist.shutdown()
    dist.print0('Done.')


if __name__ == '__main__':
    main()
