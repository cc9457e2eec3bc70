"""Solver cards (integrations/card.py): export from a trained predictor, the static schedule they
fix, sample.py --card, and bad cards."""

import copy
import hashlib
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import sample
import solvers
from integrations import card as C
from models.toy import GaussianMixture
from torch_utils.misc import StackedRandomGenerator
from training.launch import plan_training, run_training
from predictors.snapshot import load_snapshot, save_snapshot


@pytest.fixture(scope='module')
def gmm():
    return GaussianMixture(seed=0)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, single_thread):
    """Two tiny trained runs on the built-in model: AMED-Plugin on iPNDM (AFS, scale_time) and
    AMED-Solver (no AFS)."""
    root = tmp_path_factory.mktemp('cards')
    out = {}
    for key, opts in (('ipndm', dict(sampler_stu='ipndm', sampler_tea='ipndm', M=2, afs=True, scale_time=0.2)),
                      ('amed', dict(sampler_stu='amed', sampler_tea='heun', M=1, afs=False))):
        plan = plan_training(dict(opts, dataset_name='toy', num_steps=4, batch=8, total_kimg=0.016, tick_kimg=1,
                                  outdir=str(root / 'exps')), 'cpu')
        out[key] = run_training(plan, progress=False)
    out['root'] = root
    return out


def recording(model):
    """The model with every queried sigma recorded (float32 values, in call order)."""
    calls = []

    class Recorder(torch.nn.Module):
        sigma_min, sigma_max, img_shape, label_dim = model.sigma_min, model.sigma_max, model.img_shape, 0
        feature_shape = model.feature_shape
        feature_module = model.feature_module

        def forward(self, x, sigma, cond=None):
            calls.append(float(sigma[0]))
            return model(x, sigma, cond)

        def capture_feature(self):
            return model.capture_feature()
    return Recorder(), calls


def latents(n, seed0=0):
    return StackedRandomGenerator('cpu', list(range(seed0, seed0 + n))).randn([n, 3, 32, 32])


def test_export_writes_a_complete_card(runs, gmm, tmp_path):
    run_dir, path = runs['ipndm']
    out = tmp_path / 'card.json'
    result = CliRunner().invoke(C.main, ['export', f'--predictor_path={run_dir}', f'--out={out}', '--seeds=5-12',
                                         '--batch=3'])
    assert result.exit_code == 0, result.output
    card = json.loads(out.read_text())
    predictor, settings = load_snapshot(path)
    assert (card['solver'], card['solver_options'], card['afs'], card['num_steps']) == ('ipndm', {'max_order': 4}, True, 4)
    assert card['nfe'] == card['evaluations'] == 5 and len(card['query_sigmas']) == 5
    t = solvers.get_model_schedule(gmm, 4, schedule_type='polynomial', schedule_rho=7.0).tolist()
    assert card['t_steps'] == t and card['sigma_max'] == 80.0 and card['sigma_min'] == 0.002
    assert card['sigmas'][::2] == pytest.approx(t, rel=1e-7)
    for n in range(3):   # the inserted point follows from r, and the model is queried at scale_time * s
        s = t[n + 1] ** card['r'][n] * t[n] ** (1 - card['r'][n])
        assert card['sigmas'][2 * n + 1] == pytest.approx(s, rel=1e-6)
        assert card['query_sigmas'][2 * n] == pytest.approx(card['scale_time'][n] * s, rel=1e-6)
    assert card['model']['dataset_name'] == 'toy' and card['model']['img_shape'] == [3, 32, 32]
    assert card['feature'] == dict(mode='mean', seeds='5-12', reads_feature=True)
    prov = card['provenance']
    assert prov['predictor_sha256'] == hashlib.sha256(open(path, 'rb').read()).hexdigest()
    assert prov['training_options']['sampler_stu'] == 'ipndm' and prov['settings'] == settings
    # The same export as a library call; the zero mode queries the predictor on zero features.
    assert C.export_card(run_dir, seeds='5-12', batch=8) == card
    zero = C.export_card(run_dir, feature='zero')
    for n, (tc, tn) in enumerate(zip(t[:-1], t[1:])):
        r, c, a = predictor(torch.zeros(1, 8, 8), tc, tn)
        assert (zero['r'][n], zero['scale_dir'][n], zero['scale_time'][n]) == (float(r), float(c), float(a))
    assert zero['r'][1:] != card['r'][1:]    # the feature matters to this predictor


def test_card_sampling_follows_the_card_exactly(runs, gmm):
    """A run on a card queries the model exactly at the card's query_sigmas, and a card made from
    one calibration seed (mean mode) reproduces that seed's dynamic sample."""
    for key in ('ipndm', 'amed'):
        run_dir, path = runs[key]
        predictor, settings = load_snapshot(path)
        card = C.export_card(run_dir, seeds='7', batch=1)
        model, calls = recording(gmm)
        kw = {k: v for k, v in C.card_settings(card).items() if k in ('solver', 't_steps', 'afs', 'max_order')}
        x_card = solvers.sample(model, latents(1, 7), predictor=C.CardPredictor(card), **kw)
        assert calls == [float(torch.tensor(q, dtype=torch.float32)) for q in card['query_sigmas']], key
        x_dyn = solvers.sample(gmm, latents(1, 7), predictor=predictor,
                               **{k: settings[k] for k in ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'afs',
                                                           'max_order') if settings.get(k) is not None})
        torch.testing.assert_close(x_card, x_dyn, rtol=1e-5, atol=1e-5)
        x_other = solvers.sample(gmm, latents(1, 8), predictor=C.CardPredictor(card), **kw)
        assert not torch.allclose(x_other, solvers.sample(gmm, latents(1, 8), predictor=predictor, **{
            k: settings[k] for k in ('solver', 'num_steps', 'schedule_type', 'schedule_rho', 'afs', 'max_order')
            if settings.get(k) is not None}), atol=1e-4)


def test_feature_free_predictor_card_equals_dynamic(runs, gmm, tmp_path):
    """A predictor that ignores its feature (encoder weights zero) gives the same card in every mode,
    and sampling on it equals the dynamic run."""
    _, path = runs['ipndm']
    predictor, settings = load_snapshot(path)
    with torch.no_grad():
        predictor.enc_layer0.weight.zero_()
    blind = tmp_path / 'blind.pt'
    save_snapshot(blind, predictor, settings)
    cards = {mode: C.export_card(str(blind), feature=mode, seeds='0-3') for mode in C.FEATURE_MODES}
    for mode in C.FEATURE_MODES:
        assert cards[mode]['r'] == pytest.approx(cards['zero']['r'], rel=1e-6), mode
        assert cards[mode]['scale_time'] == pytest.approx(cards['zero']['scale_time'], rel=1e-6), mode
    z = latents(4)
    x_dyn = solvers.sample(gmm, z, predictor=predictor, solver='ipndm', num_steps=4, afs=True)
    x_card = solvers.sample(gmm, z, predictor=C.CardPredictor(cards['mean']), solver='ipndm',
                            t_steps=cards['mean']['t_steps'], afs=True)
    torch.testing.assert_close(x_card, x_dyn, rtol=1e-5, atol=1e-5)


def test_sample_py_accepts_a_card(runs, gmm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir, _ = runs['ipndm']
    C.save_card(C.export_card(run_dir, seeds='0-3'), 'card.json')
    result = CliRunner().invoke(sample.main, ['--card=card.json', '--seeds=0-2', '--outdir=out', '--no-progress'])
    assert result.exit_code == 0, result.output
    assert 'amed-ipndm-card (5 NFE' in result.output
    card = C.load_card('card.json')
    x = solvers.sample(gmm, latents(3), predictor=C.CardPredictor(card), solver='ipndm', t_steps=card['t_steps'],
                       afs=True, max_order=4)
    images = ((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    for seed in range(3):
        png = np.asarray(PIL.Image.open(f'out/000000/{seed:06d}.png'))
        assert np.abs(png.astype(int) - images[seed].astype(int)).max() <= 1
    for args, message in ((['--card=card.json', '--solver=euler'], '--solver comes from the card'),
                          (['--card=card.json', f'--predictor_path={run_dir}'], 'give either --predictor_path or --card'),
                          (['--card=missing.json'], 'solver card not found: missing.json')):
        result = CliRunner().invoke(sample.main, args + ['--outdir=bad', '--no-progress'])
        assert result.exit_code != 0 and f'Error: {message}' in result.output, result.output
        assert not os.path.exists('bad')


def test_bad_cards_are_one_line(runs, tmp_path):
    run_dir, _ = runs['ipndm']
    good = C.export_card(run_dir, feature='zero')
    cases = [
        (dict(format='other'), 'not an AMED solver card'),
        (dict(version=2), 'unsupported solver card version 2'),
        (dict(solver='heun'), "solver 'heun' is not an AMED student"),
        (dict(solver_options={'max_order': 9}), 'max_order=9 is out of range'),
        (dict(r=[0.5, 0.5]), 'r must hold 3 numbers'),
        (dict(r=[0.5, 1.5, 0.5]), 'every r must lie in (0, 1]'),
        (dict(t_steps=[80.0, 90.0, 1.0, 0.002]), 't_steps must be a descending list'),
        (dict(scale_time=[1.0, 1.0, 1.0]), 'query_sigmas do not follow'),
    ]
    for change, message in cases:
        bad = dict(copy.deepcopy(good), **change)
        with pytest.raises(ValueError) as e:
            C.load_card(bad)
        assert message in str(e.value) and '\n' not in str(e.value), (change, str(e.value))
    (tmp_path / 'junk.json').write_text('{not json')
    with pytest.raises(ValueError, match='not a JSON solver card'):
        C.load_card(str(tmp_path / 'junk.json'))
    # Sampling a card on another schedule is refused.
    with pytest.raises(ValueError, match='has no interval'):
        solvers.sample(GaussianMixture(seed=0), latents(1), predictor=C.CardPredictor(good), solver='ipndm',
                       num_steps=5, afs=True)
    # The CLI: one line, non-zero exit, nothing written.
    out = tmp_path / 'never.json'
    for args, message in ((['--predictor_path=99999'], 'experiment 99999 not found'),
                          ([f'--predictor_path={run_dir}', '--seeds=x'], 'invalid seed list')):
        result = CliRunner().invoke(C.main, ['export', *args, f'--out={out}'])
        assert result.exit_code != 0 and f'Error: {message}' in result.output, result.output
        assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1
        assert not out.exists()


def test_export_from_a_published_pickle(tmp_path, monkeypatch):
    """A published-format predictor pickle (experiment number in ./exp) exports the same card as the
    same weights in our snapshot, with the pickle's hash as provenance."""
    from tests.test_edm_published import published_and_snapshot
    monkeypatch.chdir(tmp_path)
    pkl = published_and_snapshot(tmp_path)
    cards = [C.export_card(spec, seeds='0-2', model_path='edm.pkl') for spec in ('0', 'ours.pt')]
    for key in ('r', 'scale_dir', 'scale_time', 'sigmas', 'query_sigmas', 't_steps', 'solver_options'):
        assert cards[0][key] == pytest.approx(cards[1][key], rel=1e-6), key
    assert cards[0]['provenance']['predictor_sha256'] == hashlib.sha256(open(pkl, 'rb').read()).hexdigest()
    assert cards[0]['provenance']['predictor_file'] == 'network-snapshot-000010.pkl'
    assert cards[0]['model']['dataset_name'] == 'cifar10' and cards[0]['model']['model_path'] == 'edm.pkl'
