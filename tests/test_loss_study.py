"""benchmarks/loss_study.py's cached reference solutions belong to the model that made them."""

import os

import torch

from benchmarks import loss_study
from models.toy import GaussianMixture


def test_seed_set_cache_is_per_model(tmp_path):
    """Two models under one name get two cache files (a retrained checkpoint never reads the old
    one's reference); a second call reads the file and returns the same solutions."""
    a, b = GaussianMixture(seed=0), GaussianMixture(seed=1)
    _, _, exact_a = loss_study.seed_set(a, 'evaluation', str(tmp_path), num=2)
    _, _, exact_b = loss_study.seed_set(b, 'evaluation', str(tmp_path), num=2)
    assert len(os.listdir(tmp_path)) == 2
    assert not torch.allclose(exact_a, exact_b)
    latents, _, again = loss_study.seed_set(a, 'evaluation', str(tmp_path), num=2)
    assert len(os.listdir(tmp_path)) == 2 and torch.equal(again, exact_a)
    assert torch.allclose(a.ode_solution_from_noise(latents, a.sigma_max, [a.sigma_min])[-1], exact_a)


def test_compare_rows_resume_and_recipe_options(tmp_path):
    """The compare command writes one line per cell with both distribution metrics, takes the plain
    rows from evaluation.compare (UniPC and DEIS among them), trains ``recommended`` with its own loss,
    table predictor and learning rate, and a second run resumes: it measures nothing again."""
    import json
    from click.testing import CliRunner
    from evaluation import accuracy, compare as comparison
    from predictors.networks import TablePredictor

    out = tmp_path / 'rows.jsonl'
    args = ['compare', '--model=toy', '--nfe=3', '--recipes=recommended', '--losses=interval', '--train_seeds=0',
            '--num=4', '--fd_num=20', '--kimg=0.032', '--solvers=iPNDM,UniPC-3,DEIS-tAB3', f'--out={out}',
            f'--cache={tmp_path}']
    result = CliRunner().invoke(loss_study.main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = [r['label'] for r in rows]
    assert labels == ['data (second set)', 'iPNDM', 'DEIS-tAB3', 'UniPC-3',
                      'AMED-Plugin (iPNDM, recommended), trajectory loss']
    assert all(r['fd_pixel'] > 0 and r['fd_spectrum'] > 0 for r in rows)
    assert {'UniPC-3', 'DEIS-tAB3'} <= {label for label, _ in comparison.PLAIN}
    assert rows[-1]['train_seed'] == 0 and rows[-1]['error'] > 0 and rows[-1]['check_ratio'] > 0
    # the same row as the library's plain-solver options give
    model = GaussianMixture()
    latents, cond, exact = loss_study.seed_set(model, 'evaluation', str(tmp_path), num=4)
    ipndm = dict(comparison.PLAIN)['iPNDM']
    x = accuracy.sample_all(model, latents, cond, **comparison.plain_options(ipndm, 3))
    assert accuracy.rms_error(x, exact) == rows[1]['error']
    again = CliRunner().invoke(loss_study.main, args)
    assert again.exit_code == 0 and len(out.read_text().splitlines()) == len(rows)

    predictor, settings, _ = loss_study.train('recommended', 3, 'trajectory', {}, 0.032, 32, 0, str(tmp_path / 'run'))
    assert isinstance(predictor, TablePredictor) and settings['M'] == 5 and settings['loss'] == 'trajectory'
    options = json.loads(next((tmp_path / 'run').iterdir()).joinpath('training_options.json').read_text())
    assert options['lr'] == 0.05 and options['predictor'] == 'table'
    _, _, _ = loss_study.train('ipndm', 3, 'interval', {'lr': 0.01}, 0.032, 32, 0, str(tmp_path / 'other'))
    options = json.loads(next((tmp_path / 'other').iterdir()).joinpath('training_options.json').read_text())
    assert options['lr'] == 0.01 and options['M'] == 2   # an explicit option wins over the recipe's


def test_ratio_tables():
    """The README summary: every cell is the method's value over iPNDM's at the same model and NFE,
    learned rows as mean (min-max) over training seeds; a missing cell is '-'."""
    def row(model, label, nfe, error, spectrum, seed=None):
        return dict(model=model, label=label, nfe=nfe, train_seed=seed, error=error, fd_spectrum=spectrum)
    rows = [row('photo_unet', 'iPNDM', 5, 0.2, 10.0), row('toy', 'iPNDM', 5, 0.1, 1.0), row('toy', 'iPNDM', 3, 0.3, 2.0),
            row('toy', 'Euler', 5, 0.3, 4.0), row('toy', 'AMED', 5, 0.05, 1.0, 0), row('toy', 'AMED', 5, 0.07, 0.5, 1),
            row('toy', 'data (second set)', 0, None, 0.1)]
    text = loss_study.ratio_tables(rows)
    lines = text.splitlines()
    assert lines[0] == '| per-sample error / iPNDM | toy NFE 3 | toy NFE 5 | photo_unet NFE 5 |'
    assert '| Euler | - | 3.00 | - |' in lines
    assert '| AMED | - | 0.60 (0.50-0.70) | - |' in lines
    assert '| AMED | - | 0.75 (0.50-1.00) | - |' in lines   # FD-spectrum
    assert not any('data (second set)' in line for line in lines)
