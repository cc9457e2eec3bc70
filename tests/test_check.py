"""The end-of-training check (training/check.py): the predictor against its plain base solver at the
same NFE on held-out teacher trajectories."""

import json
import os

import pytest
import torch

import solvers
from evaluation import accuracy
from models.presets import load_model
from training import check
from training.loss import AMEDLoss
from training.recipes import RECIPES, recipe_options
from predictors.networks import TablePredictor, build_predictor
from predictors.snapshot import load_snapshot, save_snapshot
from models.base import seeded_inputs
from training.training_loop import sample_seeds
from tests.test_train_sample import in_tmp, run_cli, snapshot_of, train_tiny  # noqa: F401
import train


@pytest.fixture(scope='module')
def toy():
    return load_model('toy')


@pytest.mark.parametrize('student', solvers.STUDENTS)
@pytest.mark.parametrize('afs', [False, True])
def test_base_solver_has_the_same_nfe(student, afs):
    for num_steps in (3, 4, 6):
        base = check.base_solver(student)
        n = check.base_num_steps(student, num_steps, afs)
        assert not solvers.REGISTRY[base].needs_predictor
        assert solvers.count_nfe(base, n, afs) == solvers.count_nfe(student, num_steps, afs, with_predictor=True)
    assert check.base_solver('amed') == 'dpm' and check.base_solver('ipndm') == 'ipndm'


def test_held_out_seeds_are_deterministic_and_avoid_training_seeds():
    trained = [s for b in range(20) for s in sample_seeds(0, b, 32)]
    seeds = check.held_out_seeds(0, 64, exclude=trained)
    assert seeds == check.held_out_seeds(0, 64, exclude=trained) and len(set(seeds)) == 64
    assert not set(seeds) & set(trained)
    assert seeds != check.held_out_seeds(1, 64)
    # An excluded seed is replaced, the others keep their order.
    fewer = check.held_out_seeds(0, 64, exclude=seeds[:3])
    assert fewer[:61] == seeds[3:] and not set(fewer) & set(seeds[:3])


def test_plugin_at_geometric_midpoints_equals_its_base(toy):
    """On the logSNR schedule the grid refined by geometric midpoints (r = 1/2, both scales 1) is the
    logSNR grid of 2N-1 points: the plugin is its plain base solver, ratio 1."""
    loss_fn = AMEDLoss(toy, 'ipndm', 'ipndm', num_steps=4, M=2, schedule_type='logsnr', afs=True, max_order=3)
    result = check.check_predictor(loss_fn, solvers.FixedPredictor(0.5, 1.0, 1.0), list(range(16)), batch=8)
    assert result['ratio'] == pytest.approx(1.0, abs=1e-5)   # float32 rounding of the two grids
    assert result['base_solver'] == 'ipndm' and result['base_num_steps'] == 7 and result['nfe'] == 5
    assert result['num'] == 16 and result['ratio_se'] < 1e-5


def test_errors_are_against_the_teacher_and_verdicts(toy):
    """The errors equal an independent computation (the teacher solved separately, the plain solver
    by name); an intermediate time at the end of each interval (r near 1) does not help."""
    loss_fn = AMEDLoss(toy, 'ipndm', 'ipndm', num_steps=4, M=2, afs=True)
    seeds = list(range(100, 124))
    bad = solvers.FixedPredictor(0.999, 1.0, 1.0)
    result = check.check_predictor(loss_fn, bad, seeds, batch=24)
    latents, cond = seeded_inputs(toy, seeds, torch.device('cpu'), training=True)
    teacher = solvers.sample(toy, latents, cond, solver='ipndm', num_steps=3 * 3 + 1, max_order=4)
    plain = solvers.sample(toy, latents, cond, solver='ipndm', num_steps=7, afs=True, max_order=4)
    assert result['base_error'] == pytest.approx(accuracy.rms_error(plain, teacher), rel=1e-9)
    mine = solvers.sample(toy, latents, cond, solver='ipndm', num_steps=4, afs=True, max_order=4, predictor=bad)
    assert result['error'] == pytest.approx(accuracy.rms_error(mine, teacher), rel=1e-9)
    assert result['ratio'] == pytest.approx(result['error'] / result['base_error'])
    assert result['verdict'] == 'does not help' and result['ratio'] > 1
    assert check.verdict(0.8, 0.05) == 'helps' and check.verdict(0.95, 0.05) == 'unclear'
    assert check.verdict(1.2, 0.05) == 'does not help' and check.verdict(0.5, None) == 'unclear'
    assert 'does not help' in check.check_line(result) and f"{result['ratio']:.3f}x" in check.check_line(result)


def test_train_prints_and_records_the_check(in_tmp):
    run = train_tiny('exps', '--sampler_stu=ipndm', '--sampler_tea=ipndm', '--M=2', '--afs=True', '--check=12')
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'Check on 12 held-out trajectories' in log
    last = json.loads(open(os.path.join(run, 'stats.jsonl')).readlines()[-1])
    _, settings = load_snapshot(snapshot_of(run))
    c = settings['check']
    assert last['Check/ratio']['mean'] == c['ratio'] and last['Check/ratio']['num'] == 12
    assert c['verdict'] in ('helps', 'does not help', 'unclear') and c['verdict'] in log
    assert c['base_solver'] == 'ipndm' and c['nfe'] == settings['nfe'] == 3

    run = train_tiny('exps', '--check=0')
    assert 'Check' not in open(os.path.join(run, 'log.txt')).read()
    assert 'check' not in load_snapshot(snapshot_of(run))[1]
    assert not any('Check/ratio' in line for line in open(os.path.join(run, 'stats.jsonl')))


# ----------------------------------------------------------------------------------------------
# The table predictor (train.py --predictor=table): per-interval scalars, no network.

def test_table_predictor_starts_at_the_midpoint_and_round_trips(tmp_path):
    t = [80.0, 10.0, 1.0, 0.002]
    table = TablePredictor(t, scale_dir=0.01, scale_time=0.2)
    r, c, a = table(torch.zeros(5, 8, 8), 10.0, 1.0)
    assert r.shape == (5,) and torch.all(r == 0.5) and torch.all(c == 1) and torch.all(a == 1)
    with torch.no_grad():
        table.r[1] = 2.0
        table.scale_time_logit[1] = -50.0
    r, c, a = table(torch.zeros(2, 8, 8), 10.0, 1.0)
    assert r[0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item()) and a[0].item() == pytest.approx(0.8)
    assert table(torch.zeros(2, 8, 8), 80.0, 10.0)[0][0].item() == 0.5
    with pytest.raises(ValueError, match='no interval'):
        table(torch.zeros(2, 8, 8), 80.0, 1.0)
    with pytest.raises(ValueError, match='descending'):
        TablePredictor([1.0, 2.0])
    save_snapshot(tmp_path / 's.pt', table, dict(solver='ipndm'))
    loaded, _ = load_snapshot(tmp_path / 's.pt')
    assert isinstance(loaded, TablePredictor) and loaded.t_steps == t and loaded.scale_time == 0.2
    assert torch.equal(loaded(torch.zeros(1, 8, 8), 10.0, 1.0)[0], r[:1])
    with pytest.raises(ValueError, match='unknown predictor kind'):
        build_predictor(dict(kind='tree'))


def test_table_training_samples_as_trained(in_tmp, toy):
    """--predictor=table trains one r per interval (different per interval) and samples from its
    snapshot exactly as the check measured it."""
    run = train_tiny('exps', '--sampler_stu=ipndm', '--sampler_tea=ipndm', '--M=2', '--afs=True', '--check=8',
                     '--predictor=table', '--loss=trajectory', '--lr=0.05')
    predictor, settings = load_snapshot(snapshot_of(run))
    assert isinstance(predictor, TablePredictor) and len(predictor.r) == 2 and predictor.r.abs().min() > 0
    assert predictor.t_steps == pytest.approx(solvers.get_model_schedule(toy, 3).tolist())
    loss_fn = AMEDLoss(toy, 'ipndm', 'ipndm', num_steps=3, M=2, afs=True)
    trained = [s for b in range(2) for s in sample_seeds(0, b, 8)]
    again = check.check_predictor(loss_fn, predictor, check.held_out_seeds(0, 8, trained))
    assert again['ratio'] == pytest.approx(settings['check']['ratio'], rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Recipes (train.py --recipe).

def test_recipe_sets_defaults_and_explicit_options_override(in_tmp):
    code, out = run_cli(train.main, ['--dataset_name=toy', '--recipe=recommended', '--num_steps=4', '--lr=0.04',
                                     '--tick=0.5', '--dry-run'])
    assert code == 0, out
    opts = json.loads(out[:out.rindex('}') + 1])
    for key, value in RECIPES['recommended'].options.items():
        assert opts[key] == (0.04 if key == 'lr' else value), key
    assert opts['recipe'] == 'recommended' and opts['tick_kimg'] == 0.5 and opts['num_steps'] == 4
    # At 3 time points the recipe's schedule exponent is 10 (Recipe.by_num_steps), unless given.
    for extra, rho in (([], 10.0), (['--schedule_rho=5'], 5.0)):
        code, out = run_cli(train.main, ['--dataset_name=toy', '--recipe=recommended', '--num_steps=3', '--dry-run',
                                         *extra])
        assert code == 0, out
        opts = json.loads(out[:out.rindex('}') + 1])
        assert opts['schedule_rho'] == rho and opts['M'] == 5 and opts['predictor'] == 'table', opts
    assert recipe_options('recommended', 3)['schedule_rho'] == 10.0 == \
        RECIPES['recommended'].by_num_steps[3]['schedule_rho']
    assert recipe_options('recommended', 4) == recipe_options('recommended') == RECIPES['recommended'].options
    # The comparisons' students (evaluation.accuracy.AMED_RECIPES) follow the same rule.
    import torch
    from evaluation import accuracy
    from training import plan_training
    for steps, rho in ((3, 10.0), (4, 7.0)):
        plan = plan_training(dict(accuracy.AMED_RECIPES['recommended'], dataset_name='toy', num_steps=steps,
                                  outdir='exps'), torch.device('cpu'))
        assert plan['options']['schedule_rho'] == rho and plan['options']['lr'] == 0.05
    code, out = run_cli(train.main, ['--dataset_name=toy', '--recipe=fast', '--dry-run'])
    assert code == 2 and "Invalid value for '--recipe': 'fast'" in out
    help_text = ' '.join(run_cli(train.main, ['--help'])[1].split())
    assert all(f'--{k}=' in help_text for k, v in RECIPES['recommended'].options.items())
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        recipe_options('fast')


def test_recommended_recipe_trains_a_table(in_tmp):
    run = train_tiny('exps', '--recipe=recommended', '--check=8')
    predictor, settings = load_snapshot(snapshot_of(run))
    assert isinstance(predictor, TablePredictor) and settings['solver'] == 'ipndm' and settings['M'] == 5
    assert settings['loss'] == 'trajectory' and settings['check']['num'] == 8
    assert json.load(open(os.path.join(run, 'training_options.json')))['batch'] == 8    # TINY's, given explicitly


# An explicit student schedule (train.py --t_steps).

def test_refined_schedule_is_the_finer_polynomial_schedule():
    """solver_utils.refine_schedule of a polynomial schedule (exponent rho) is the same schedule
    with (M+1)(N-1)+1 points: the teacher grid of an explicit schedule is the usual one when the
    schedule is polynomial."""
    import solver_utils
    for n, m, rho in ((4, 5, 7.0), (3, 2, 10.0), (6, 1, 3.0)):
        coarse = solver_utils.get_schedule(n, 0.002, 80.0, 'polynomial', rho)
        fine = solver_utils.get_schedule((m + 1) * (n - 1) + 1, 0.002, 80.0, 'polynomial', rho)
        torch.testing.assert_close(solver_utils.refine_schedule(coarse, m, rho), fine, rtol=1e-12, atol=0)


def test_explicit_schedule_trains_as_its_polynomial_twin_and_samples(in_tmp):
    """A run on --t_steps equal to the polynomial schedule trains the same weights as the run on
    that schedule, its snapshot records the explicit schedule (run name 'explicit'), sample.py
    samples it, and a length that contradicts --num_steps or a bad schedule is one error line."""
    import sample
    t = solvers.get_model_schedule(load_model('toy'), 3, schedule_type='polynomial', schedule_rho=7.0).tolist()
    usual = train_tiny('exps', '--recipe=recommended', '--schedule_rho=7', '--check=4')
    explicit = train_tiny('exps', '--recipe=recommended', '--schedule_rho=7', '--check=4',
                          '--t_steps=' + ','.join(repr(v) for v in t))
    assert os.path.basename(explicit).endswith('-3-3-ipndm-ipndm-5-explicit-afs-traj')
    (p1, s1), (p2, s2) = (load_snapshot(snapshot_of(r)) for r in (usual, explicit))
    assert s2['t_steps'] == t and 'schedule_type' not in s2 and s2['num_steps'] == 3
    for a, b in zip(p1.state_dict().values(), p2.state_dict().values()):    # teacher grids equal to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert abs(s2['check']['ratio'] - s1['check']['ratio']) < 1e-5
    code, out = run_cli(sample.main, [f'--predictor_path={explicit}', '--seeds=0-1', '--outdir=s', '--no-progress'])
    assert code == 0 and 'explicit schedule' in out, out
    for bad, message in (('--t_steps=80,1,0.002 --num_steps=4', 't_steps has 3 noise levels, num_steps is 4'),
                         ('--t_steps=80,1,2', 't_steps must be a descending list')):
        code, out = run_cli(train.main, ['--dataset_name=toy', '--outdir=exps', '--dry-run', *bad.split()])
        assert code == 1 and message in out, out
