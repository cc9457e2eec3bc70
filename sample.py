"""Sample images with a trained AMED predictor, a solver card, or a plain solver as a baseline.
Runs under plain python or torchrun (seeds are split across processes). See --help for examples."""

import json

import click

import cli
import solvers
from generation import generate
from torch_utils import distributed as dist
from torch_utils.misc import MAX_SEEDS

EXAMPLES = """
Examples:
  python sample.py --predictor_path=0 --seeds=0-63 --grid      # experiment 0 in ./exps
  python sample.py --predictor_path=card.json --seeds=0-63     # a solver card
  python sample.py --dataset_name=toy --solver=ipndm --num_steps=7 --afs=True --seeds=0-99
  python sample.py --dataset_name=toy --solver=unipc --num_steps=6 --schedule_type=logsnr --afs=True --seeds=0-63
  python sample.py --dataset_name=toy --solver=deis --t_steps=80,10,2,0.5,0.1,0.002 --seeds=0-63
  python sample.py --predictor_path=0 --dry-run                # check and print the plan
  torchrun --standalone --nproc_per_node=8 sample.py --predictor_path=exps/00003-cifar10-... \\
      --seeds=0-49999
"""


@click.command(context_settings=dict(show_default=True), epilog=cli.epilog(EXAMPLES))
@click.option('--predictor_path', help='Predictor: our snapshot (.pt), a published pickle (.pkl) or a solver card '
              '(.json), as a file or URL; a run folder; an experiment number (./exps, ./exp)', type=str)
@click.option('--card', help='Solver card (JSON from python -m integrations.card export) in place of a predictor',
              type=str)
@cli.model_options('dataset_name', 'model_path', dataset_help="Model preset; default: the predictor's")
@click.option('--batch', 'batch', help='Images per batch and process', type=click.IntRange(min=1), default=64)
@click.option('--seeds', help=f'Seeds in [0, 2^32), e.g. 0-49999 or 1,2,5-10; at most {MAX_SEEDS} per run', type=str, default='0-63')
# `--grid` alone or `--grid=True/False` (the official form): a boolean whose value may be left out.
@click.option('--grid', help='Write one grid of all seeds (grid.png) instead of one PNG per seed; --grid or --grid=BOOL',
              type=bool, is_flag=False, flag_value=True, default=False)
@click.option('--subdirs/--no-subdirs', help='Put PNGs in 1000-seed subfolders', default=True)
@click.option('--outdir', help='Output folder  [default: samples/<dataset>/<run folder>/<snapshot> with a predictor, '
              'samples/<dataset>/<solver>_nfe<NFE>_<all settings> without]', type=str)
@click.option('--overwrite', help='Replace the samples of another configuration in --outdir (they are removed first)',
              is_flag=True)
@click.option('--resume', help='Skip the seeds whose PNG in --outdir is already complete (same configuration)',
              is_flag=True)
@click.option('--return_inters', help='Also save each trajectory at the grid points as <seed>.npz', type=bool,
              default=False)
@cli.model_options('classifier_path', 'prompt', 'prompt_path', 'use_fp16', 'device')
@click.option('--progress/--no-progress', help='Show a progress bar', default=True)
@click.option('-n', '--dry-run', 'dry_run', help='Validate, load the model and the predictor, print the plan; write '
              'nothing', is_flag=True)
# Plain-solver options (only without --predictor_path/--card: they carry their own).
@click.option('--solver', help=f"Plain solver (no predictor)  [default: {generate.PLAIN_DEFAULTS['solver']}]",
              type=click.Choice(list(solvers.PLAIN)))
@cli.schedule_options(shown=dict(num_steps=generate.PLAIN_DEFAULTS['num_steps']))
@click.option('--t_steps', help='Explicit schedule replacing the schedule options: noise levels, descending and '
              "comma-separated, or a JSON file with their list (or a card's t_steps)", type=str)
@click.option('--denoise_to_zero', help='Finish with one more model call x <- D(x; sigma_min), counted in the NFE  '
              '[default: False]', type=bool)
@cli.solver_options
@cli.model_options('guidance_type', 'guidance_rate')
@cli.user_errors
def main(device, progress, dry_run, **options):
    """Generate one PNG per seed (or a grid) with an AMED predictor, a solver card or a plain solver.
    --outdir is locked while the run writes it (a second writer is refused). SIGINT/SIGTERM stop
    after the current batch (exit 128 + the signal number) and a failed write stops at once (exit
    1): the saved images are complete and listed in manifest.json, and the message says how to
    continue (--resume)."""
    dev = dist.init(device)
    plan = generate.plan_sampling(device=dev, **options)
    try:
        dist.print0(plan.describe())
        if dry_run:
            dist.print0(json.dumps(plan.config, indent=2))
            dist.print0('Dry run: nothing written.')
            return
        generate.generate_images(plan, progress=progress)
    finally:
        plan.release(cleanup=dry_run)
    dist.print0('Done.')


if __name__ == '__main__':
    cli.run(main)
