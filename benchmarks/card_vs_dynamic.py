"""Static solver cards against the dynamic predictor on the built-in analytic model.

Trains the quickstart's two AMED recipes (evaluation/quickstart.py: AMED-Solver and AMED-Plugin on
iPNDM, AFS) with the losses of ``--losses`` (docs/integrations.md's table: the official interval loss) at each NFE, exports a card from each predictor in every feature mode
(integrations/card.py: ``mean``, ``mean_feature``, ``zero``) from the calibration seeds, and prints
the RMS error to the exact ODE solution of the dynamic predictor and of each card, on validation
seeds (used to pick the default mode) and on evaluation seeds (reported), plus the RMS distance of
each card's samples to the dynamic samples. All randomness is seeded: a rerun prints the same.

    python benchmarks/card_vs_dynamic.py [--nfe 3,5,7] [--kimg 2] [--outdir exps/card-bench]
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations import card as C  # noqa: E402
from models.presets import load_model  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from evaluation import accuracy  # noqa: E402
from evaluation.quickstart import RECIPES  # noqa: E402
from torch_utils.misc import parse_int_list  # noqa: E402
from predictors.settings import SolverSettings  # noqa: E402


@click.command(context_settings=dict(show_default=True))
@click.option('--nfe', 'nfes', type=str, default='3,5,7')
@click.option('--kimg', type=float, default=2.0, help='Training trajectories per predictor (thousands)')
@click.option('--batch', type=int, default=32)
@click.option('--calib_seeds', type=str, default=C.DEFAULT_SEEDS, help='Seeds the mean cards are made from')
@click.option('--val_seeds', type=str, default='2000-2063', help='Seeds that choose the default mode')
@click.option('--eval_seeds', type=str, default='0-63', help='Seeds of the reported table')
@click.option('--outdir', type=str, default='exps/card-bench')
@click.option('--losses', type=str, default='interval', help='Training losses of the predictors (interval, trajectory)')
def main(nfes, kimg, batch, calib_seeds, val_seeds, eval_seeds, outdir, losses):
    start = time.time()
    nfes = [int(v) for v in nfes.split(',')]
    device = dist.init('cpu')
    model = load_model('toy', device=device)
    sets = {}
    for name, seeds in (('validation', val_seeds), ('evaluation', eval_seeds)):
        sets[name] = accuracy.reference_set(model, parse_int_list(seeds))
    rows = {name: [] for name in sets}
    gaps = []
    for label, recipe in [(label, recipe) for label, recipe in RECIPES if recipe['loss'] in losses.split(',')]:
        values = {name: {} for name in sets}
        gap = {}
        for nfe in nfes:
            path, predictor, settings = accuracy.train_recipe(recipe, nfe, device, dataset_name='toy', batch=batch,
                                                              total_kimg=kimg, tick_kimg=kimg, outdir=outdir,
                                                              desc='cardbench')
            kw = SolverSettings.from_dict(settings).sample_kwargs()
            runs = {'dynamic': (predictor, kw)}
            for mode in C.FEATURE_MODES:
                card = C.export_card(path, feature=mode, seeds=calib_seeds, model=model)
                runs[f'card ({mode})'] = (C.CardPredictor(card), SolverSettings.from_dict(C.card_settings(card)).sample_kwargs())
            for name, (latents, cond, exact) in sets.items():
                outs = {key: torch.cat([accuracy.solvers.sample(model, latents[i:i + 64], None if cond is None else
                                                                cond[i:i + 64], predictor=p, **k)
                                        for i in range(0, len(latents), 64)]) for key, (p, k) in runs.items()}
                for key, x in outs.items():
                    values[name].setdefault(key, {})[nfe] = accuracy.rms_error(x, exact)
                    if name == 'evaluation' and key != 'dynamic':
                        gap.setdefault(key, {})[nfe] = accuracy.rms_error(x, outs['dynamic'])
            print(f'{label} NFE {nfe}: ' + ', '.join(f'{k} {v[nfe]:.4f}' for k, v in values['evaluation'].items()),
                  flush=True)
        for name in sets:
            rows[name] += [(f'{label}: {key}', v) for key, v in values[name].items()]
        gaps += [(f'{label}: {key}', v) for key, v in gap.items()]
    for name, seeds in (('validation', val_seeds), ('evaluation', eval_seeds)):
        print()
        print(accuracy.format_table(rows[name], nfes, title=f'RMS error to the exact ODE solution (toy, {name} '
                                                            f'seeds {seeds})'))
    print()
    print(accuracy.format_table(gaps, nfes, title=f'RMS distance of card samples to dynamic samples ({eval_seeds})'))
    print(f'\nCalibration seeds {calib_seeds}; {kimg} kimg per predictor, batch {batch}; '
          f'total time {time.time() - start:.0f} s')
    dist.shutdown()


if __name__ == '__main__':
    main()
