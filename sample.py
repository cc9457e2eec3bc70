"""Sample images with a trained AMED predictor, or with a plain solver as a baseline.
Runs under plain python or torchrun (seeds are split across processes).

Examples:

    python sample.py --predictor_path=0 --seeds=0-63 --grid             # experiment 0 in ./exps
    python sample.py --dataset_name=toy --solver=ipndm --num_steps=7 --afs=True --seeds=0-99
    python sample.py --card=card.json --seeds=0-63 --grid                # a solver card (integrations/card.py)
"""

import os

import click

import solvers
from models.presets import dataset_names, load_model
from torch_utils import distributed as dist
from torch_utils.misc import parse_int_list
from generation import generate
from training import snapshot

PLAIN_DEFAULTS = dict(solver='ipndm', num_steps=6, schedule_type='polynomial', schedule_rho=7.0, afs=False)


@click.command(context_settings=dict(show_default=True))
@click.option('--predictor_path', help='Predictor snapshot, run folder, or experiment number (./exps, ./exp)', type=str)
@click.option('--card', help='Solver card (JSON from python -m integrations.card export) in place of a predictor', type=str)
@click.option('--dataset_name', help=f"Model preset ({', '.join(dataset_names())}); default: the predictor's", type=str)
@click.option('--model_path', help='Model file or URL overriding the preset', type=str)
@click.option('--batch', 'batch', help='Images per batch and process', type=click.IntRange(min=1), default=64)
@click.option('--seeds', help='Seeds, e.g. 0-49999 or 1,2,5-10', type=str, default='0-63')
@click.option('--grid', help='Write one grid of all seeds (grid.png) instead of one PNG per seed', is_flag=True)
@click.option('--subdirs/--no-subdirs', help='Put PNGs in 1000-seed subfolders', default=True)
@click.option('--outdir', help='Output folder (default ./samples/<dataset>/<solver>_nfe<NFE>)', type=str)
@click.option('--return_inters', help='Also save each trajectory at the grid points as <seed>.npz', type=bool, default=False)
@click.option('--classifier_path', help='Classifier for classifier guidance (file or URL)', type=str)
@click.option('--prompt', help='ms_coco: one prompt for every image (default: caption i of --prompt_path for seed i)', type=str)
@click.option('--prompt_path', help='ms_coco: captions CSV (column text; default ./src/prompts/MS-COCO_val2014_30k_captions.csv)', type=str)
@click.option('--use_fp16', help='fp16 network weights (CUDA; models that support it)', is_flag=True)
@click.option('--device', help='cpu or cuda (default: cuda when available)', type=click.Choice(['cpu', 'cuda']))
@click.option('--progress/--no-progress', help='Show a progress bar', default=True)
# Plain-solver options (only without --predictor_path/--card: they carry their own).
@click.option('--solver', help='Plain solver (no predictor)', type=click.Choice(['euler', 'ipndm', 'dpm', 'dpmpp', 'heun']))
@click.option('--num_steps', help='Time points N', type=click.IntRange(min=2))
@click.option('--schedule_type', type=click.Choice(['polynomial', 'logsnr', 'time_uniform', 'discrete']))
@click.option('--schedule_rho', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_min', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', type=click.FloatRange(min=0, min_open=True))
@click.option('--afs', help='Analytical first step', type=bool)
@click.option('--max_order', type=int)
@click.option('--predict_x0', type=bool)
@click.option('--lower_order_final', type=bool)
@click.option('--thresholding', help='Dynamic thresholding (dpmpp; default: predict_x0)', type=bool)
@click.option('--guidance_type', help='Guidance of a plain run (cg: imagenet256, cfg: ms_coco, uncond: lsun_bedroom_ldm)', type=click.Choice(['cg', 'cfg', 'uncond']))
@click.option('--guidance_rate', help='Guidance rate of a plain run', type=float)
def main(predictor_path, card, dataset_name, model_path, batch, seeds, grid, subdirs, outdir, return_inters,
         classifier_path, prompt, prompt_path, use_fp16, device, progress, **plain):
    """Generate one PNG per seed (or a grid) with an AMED predictor, a solver card or a plain solver."""
    guidance = dict(guidance_type=plain.pop('guidance_type'), guidance_rate=plain.pop('guidance_rate'))
    given = {k: v for k, v in plain.items() if v is not None}
    source = 'card' if card is not None else 'predictor'
    if predictor_path is not None or card is not None:
        given.update({k: v for k, v in guidance.items() if v is not None})
    try:
        seed_list = parse_int_list(seeds)
        if predictor_path is not None and card is not None:
            raise ValueError('give either --predictor_path or --card, not both')
        if (predictor_path is not None or card is not None) and given:
            raise ValueError(f"--{next(iter(given))} comes from the {source}; drop it or sample without "
                             f"--{'card' if card is not None else 'predictor_path'}")
        if predictor_path is None and card is None and dataset_name is None:
            raise ValueError('give --predictor_path, --card, or --dataset_name and plain solver options')
        dev = dist.init(device)
        predictor, settings = None, {}
        if card is not None:
            from integrations.card import load_card_predictor
            predictor, settings = load_card_predictor(card)
        elif predictor_path is not None:
            predictor, settings = snapshot.load_predictor(predictor_path, device=dev)
        if predictor is not None:
            if dataset_name is None:
                dataset_name = settings.get('dataset_name')
            if dataset_name is None:
                raise ValueError(f'the {source} names no model: give --dataset_name')
            solver_kwargs = generate.solver_kwargs_from_settings(settings)
            guidance = dict(guidance_type=settings.get('guidance_type'), guidance_rate=settings.get('guidance_rate'))
        else:
            solver_kwargs = dict(PLAIN_DEFAULTS, **given)
        model = load_model(dataset_name, model_path, guidance['guidance_type'], guidance['guidance_rate'],
                           classifier_path=classifier_path, prompt_path=prompt_path, use_fp16=use_fp16, device=dev,
                           prompt=prompt)
        if predictor is not None:
            snapshot.check_compatible(settings, model)
        model.check_seeds(seed_list)
        nfe = generate.nfe_of(solver_kwargs, model, predictor is not None)
        name = solver_kwargs['solver'] if predictor is None or solver_kwargs['solver'] == 'amed' \
            else 'amed-' + solver_kwargs['solver']
        name += '-card' if card is not None else ''
        if outdir is None:
            outdir = os.path.join('samples', *(['grids'] if grid else []), dataset_name, f'{name}_nfe{nfe}')
        solvers.prepare(model, predictor=predictor,   # validate every option before anything is written
                        **{k: v for k, v in solver_kwargs.items() if k != 'afs'})
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e))

    dist.print0(f"Sampling {len(seed_list)} images with {name} ({nfe} NFE, {solver_kwargs['num_steps']} time points, "
                f"{solver_kwargs.get('schedule_type', 'polynomial')} schedule) on {dist.get_world_size()} process(es) "
                f"-> {outdir}")
    try:
        generate.generate_images(model, seed_list, outdir, solver_kwargs, predictor, batch=batch, grid=grid,
                                 subdirs=subdirs, return_inters=return_inters, device=dev, progress=progress)
    finally:
        dist.shutdown()
    dist.print0('Done.')


if __name__ == '__main__':
    main()
