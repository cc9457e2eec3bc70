"""train.py and sample.py end to end on the built-in model: run folders, snapshots, per-seed
determinism, gradient accumulation, torchrun with two processes, and bad input."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import sample
import train
import solvers
from models.presets import load_model
from tests.torchrun import torchrun as launch
from predictors import load_predictor
from predictors.settings import SolverSettings
from predictors.snapshot import load_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset_name=toy', '--batch=8', '--total_kimg=0.016', '--no-progress', '--num_steps=3']


def run_cli(cmd, args):
    result = CliRunner().invoke(cmd, args, catch_exceptions=False)
    return result.exit_code, result.output


def train_tiny(outdir, *extra):
    code, out = run_cli(train.main, TINY + [f'--outdir={outdir}', *extra])
    assert code == 0, out
    runs = sorted(os.listdir(outdir))
    return os.path.join(outdir, runs[-1])


def snapshot_of(run_dir):
    files = [f for f in os.listdir(run_dir) if f.startswith('network-snapshot-')]
    assert len(files) == 1
    return os.path.join(run_dir, files[0])


def read_png(path):
    return np.asarray(PIL.Image.open(path))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_creates_run_folder(in_tmp):
    run = train_tiny('exps', '--sampler_stu=amed', '--afs=True', '--schedule_type=time_uniform',
                     '--schedule_rho=1', '--scale_time=True')
    assert os.path.basename(run) == '00000-toy-3-3-amed-heun-1-uni1.0-afs'
    assert sorted(os.listdir(run)) == ['log.txt', 'network-snapshot-000000.pt', 'stats.jsonl',
                                       'training_options.json']
    opts = json.load(open(os.path.join(run, 'training_options.json')))
    assert opts['scale_time'] == 0.2 and opts['scale_dir'] == 0.01
    stats = [json.loads(line) for line in open(os.path.join(run, 'stats.jsonl'))]
    assert 'Loss/loss' in stats[-2] and 'Pred/r' in stats[-2] and 'Check/ratio' in stats[-1]   # the last tick, the check
    assert 'tick' in open(os.path.join(run, 'log.txt')).read()
    predictor, settings = load_snapshot(snapshot_of(run))
    assert settings['solver'] == 'amed' and settings['num_steps'] == 3 and settings['afs'] is True
    assert settings['img_shape'] == [3, 32, 32] and settings['label_dim'] == 0
    assert settings['sigma_min'] == 0.002 and settings['sigma_max'] == 80.0
    assert predictor.scale_time == 0.2
    # A second run never reuses the folder.
    run2 = train_tiny('exps', '--sampler_stu=ipndm', '--sampler_tea=ipndm', '--M=2', '--max_order=3', '--desc=x')
    assert os.path.basename(run2) == '00001-toy-3-4-ipndm-ipndm-2-poly7.0-x'


def test_dry_run_writes_nothing(in_tmp):
    code, out = run_cli(train.main, TINY + ['--outdir=exps', '--dry-run'])
    assert code == 0 and 'Dry run' in out
    assert not os.path.exists('exps')


@pytest.mark.parametrize('args,word', [
    (['--dataset_name=nope'], 'dataset_name'),
    (['--dataset_name=cifar10'], 'cifar10'),
    (['--max_order=2'], 'max_order'),
    (['--sampler_stu=ipndm', '--max_order=7'], 'max_order'),
    (['--sigma_min=5', '--sigma_max=1'], 'sigma_min'),
    (['--batch=8', '--batch-gpu=3'], 'batch'),
    (['--guidance_type=cg'], 'guidance_type'),
    (['--prompt_path=x.csv'], 'prompt_path'),
    (['--desc=a/b'], 'desc'),
    (['--scale_time=-1'], 'scale_time'),
    (['--loss=nope'], 'loss'),
    (['--inter_weight=0.5'], 'inter_weight'),
    (['--checkpointing=True'], 'checkpointing'),
    (['--loss=trajectory', '--inter_weight=-1'], 'inter_weight'),
])
def test_train_bad_input(in_tmp, args, word):
    code, out = run_cli(train.main, TINY + ['--outdir=exps'] + args)
    last = out.strip().splitlines()[-1]            # click's own type errors add a usage line before it
    assert code != 0 and last.startswith('Error:') and word in last, out
    assert not os.path.exists('exps') or os.listdir('exps') == []


@pytest.mark.parametrize('student,teacher,extra', [
    ('amed', 'heun', []), ('ipndm', 'ipndm', ['--max_order=3']), ('dpmpp', 'dpmpp', ['--max_order=2']),
    ('amed', 'heun', ['--loss=trajectory', '--inter_weight=0.5']), ('euler', 'heun', ['--loss=trajectory']),
    ('dpm', 'heun', ['--loss=trajectory']), ('ipndm', 'ipndm', ['--max_order=3', '--loss=trajectory']),
    ('dpmpp', 'dpmpp', ['--max_order=2', '--loss=trajectory', '--checkpointing=True'])])
def test_gradient_accumulation_equals_large_batch(in_tmp, student, teacher, extra):
    args = [f'--sampler_stu={student}', f'--sampler_tea={teacher}', '--M=1', '--afs=True'] + extra
    one = train_tiny('a', *args)
    acc = train_tiny('b', '--batch-gpu=2', *args)
    p1, _ = load_snapshot(snapshot_of(one))
    p2, _ = load_snapshot(snapshot_of(acc))
    for (k, v1), v2 in zip(p1.state_dict().items(), p2.state_dict().values()):
        assert torch.allclose(v1, v2, rtol=1e-4, atol=1e-6), k


def test_sample_images_depend_only_on_seed(in_tmp):
    train_tiny('exps', '--afs=True')
    code, out = run_cli(sample.main, ['--predictor_path=0', '--seeds=0-4', '--batch=2', '--outdir=a', '--no-progress'])
    assert code == 0, out
    code, out = run_cli(sample.main, ['--predictor_path=00000', '--seeds=3,4', '--batch=5', '--outdir=b',
                                      '--no-subdirs', '--no-progress', '--return_inters=True'])
    assert code == 0, out
    for seed in (3, 4):
        assert np.array_equal(read_png(f'a/000000/{seed:06d}.png'), read_png(f'b/{seed:06d}.png'))
    traj = np.load('b/000003.npz')
    assert traj['trajectory'].shape == (3, 3, 32, 32) and traj['sigmas'].shape == (3,)
    code, out = run_cli(sample.main, ['--predictor_path=0', '--seeds=0-4', '--grid', '--outdir=g', '--no-progress'])
    assert code == 0 and sorted(os.listdir('g')) == ['grid.png', 'manifest.json']
    assert read_png('g/grid.png').shape == (64, 96, 3)
    # The official form: --grid=True equals --grid; --grid=False writes one PNG per seed.
    code, out = run_cli(sample.main, ['--predictor_path=0', '--seeds=0-4', '--grid=True', '--outdir=g3', '--no-progress'])
    assert code == 0, out
    assert np.array_equal(read_png('g3/grid.png'), read_png('g/grid.png'))
    code, out = run_cli(sample.main, ['--predictor_path=0', '--seeds=0-4', '--grid=False', '--outdir=g4', '--no-progress'])
    assert code == 0 and sorted(os.listdir('g4/000000')) == [f'{seed:06d}.png' for seed in range(5)], out
    code, out = run_cli(sample.main, ['--predictor_path=0', '--seeds=0-4', '--grid=maybe', '--outdir=g5'])
    assert code != 0 and 'maybe' in out and not os.path.exists('g5')


def test_sample_plain_solver_baseline(in_tmp):
    code, out = run_cli(sample.main, ['--dataset_name=toy', '--solver=dpmpp', '--num_steps=4', '--seeds=0-1',
                                      '--outdir=p', '--no-progress'])
    assert code == 0, out
    assert sorted(os.listdir('p/000000')) == ['000000.png', '000001.png']


def test_sample_bad_input(in_tmp):
    run = train_tiny('exps')
    os.makedirs('exps/00005-a')
    os.makedirs('exp/00005-b')
    open('junk.pt', 'w').write('not a snapshot')
    cases = [
        (['--predictor_path=9'], 'experiment 9 not found'),
        (['--predictor_path=5'], 'ambiguous'),
        (['--predictor_path=missing.pt'], 'not found'),
        (['--predictor_path=junk.pt'], 'junk.pt'),
        (['--predictor_path=0', '--dataset_name=toy_cond'], 'toy'),
        (['--predictor_path=0', '--seeds=1-x'], 'seed'),
        (['--predictor_path=0', '--solver=euler'], 'solver'),
        (['--dataset_name=toy', '--solver=ipndm', '--max_order=9'], 'max_order'),
        (['--dataset_name=nope', '--solver=euler'], 'dataset_name'),
    ]
    for args, word in cases:
        code, out = run_cli(sample.main, args + ['--outdir=o', '--no-progress'])
        assert code != 0 and word in out, (args, out)
        assert len(out.strip().splitlines()) == 1, out
        assert not os.path.exists('o')


def torchrun(script, args, cwd, nproc=2):
    result = launch([os.path.join(ROOT, script), *args], cwd, nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_torchrun_two_processes_match_one(in_tmp):
    args = TINY + ['--afs=True', '--device=cpu']
    torchrun('train.py', args + ['--outdir=two'], in_tmp)
    code, out = run_cli(train.main, args + ['--outdir=one'])
    assert code == 0, out
    p2, _ = load_snapshot(snapshot_of(os.path.join('two', os.listdir('two')[0])))
    p1, _ = load_snapshot(snapshot_of(os.path.join('one', os.listdir('one')[0])))
    for v1, v2 in zip(p1.state_dict().values(), p2.state_dict().values()):
        assert torch.allclose(v1, v2, rtol=1e-4, atol=1e-6)
    snap = snapshot_of(os.path.join('one', os.listdir('one')[0]))
    result = torchrun('sample.py', [f'--predictor_path={snap}', '--seeds=0-6', '--batch=2', '--outdir=s2',
                                    '--no-progress', '--device=cpu'], in_tmp)
    assert result.stdout.count('Done.') == 1, result.stdout   # printed once, not once per process
    code, out = run_cli(sample.main, [f'--predictor_path={snap}', '--seeds=0-6', '--batch=3', '--outdir=s1',
                                      '--no-progress'])
    assert code == 0, out
    for seed in range(7):
        assert np.array_equal(read_png(f's1/000000/{seed:06d}.png'), read_png(f's2/000000/{seed:06d}.png'))
    torchrun('sample.py', [f'--predictor_path={snap}', '--seeds=0-6', '--grid', '--outdir=g2', '--no-progress',
                           '--device=cpu'], in_tmp)
    assert sorted(os.listdir('g2')) == ['grid.png', 'manifest.json']


def test_torchrun_trajectory_loss_matches_one_process(in_tmp):
    args = TINY + ['--afs=True', '--device=cpu', '--loss=trajectory', '--sampler_stu=ipndm', '--sampler_tea=ipndm']
    torchrun('train.py', args + ['--outdir=two'], in_tmp)
    code, out = run_cli(train.main, args + ['--outdir=one', '--batch-gpu=4'])
    assert code == 0, out
    p2, s2 = load_snapshot(snapshot_of(os.path.join('two', os.listdir('two')[0])))
    p1, s1 = load_snapshot(snapshot_of(os.path.join('one', os.listdir('one')[0])))
    assert s1['loss'] == s2['loss'] == 'trajectory' and os.listdir('one')[0].endswith('-afs-traj')
    for v1, v2 in zip(p1.state_dict().values(), p2.state_dict().values()):
        assert torch.allclose(v1, v2, rtol=1e-4, atol=1e-6)


def test_class_conditional_builtin_model(in_tmp):
    code, out = run_cli(train.main, ['--dataset_name=toy_cond', '--batch=8', '--total_kimg=0.016', '--no-progress',
                                     '--num_steps=3', '--outdir=exps', '--sampler_stu=dpm', '--sampler_tea=dpmpp',
                                     '--max_order=2'])
    assert code == 0, out
    code, out = run_cli(sample.main, ['--predictor_path=0', '--seeds=0-2', '--outdir=c', '--no-progress'])
    assert code == 0, out
    assert len(os.listdir('c/000000')) == 3
    # The labels reach the model: the same noise with other labels gives other images, the same labels the same.
    model = load_model('toy_cond')
    predictor, settings = load_predictor("0")[:2]
    latents = torch.randn([3, *model.img_shape], generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), model.label_dim).float()
    kw = SolverSettings.from_dict(settings).sample_kwargs()
    with torch.no_grad():
        out, same, other = (solvers.sample(model, latents, c, predictor=predictor, **kw)
                            for c in (labels, labels.clone(), labels.roll(1, 0)))
    assert torch.equal(out, same)
    assert ((out - other).flatten(1).abs().amax(1) > 0.1).all()
    code, out = run_cli(sample.main, ['--predictor_path=0', '--dataset_name=toy', '--seeds=0', '--outdir=d',
                                      '--no-progress'])
    assert code != 0 and 'toy_cond' in out


def table_of(out):
    """{label: the row's cells} of the table a quickstart printed."""
    rows = [line for line in out.splitlines() if line.startswith('| ')][1:]
    return {r.split('|')[1].strip(): [c.strip() for c in r.split('|')[2:-1]] for r in rows}


def test_quickstart_smoke(in_tmp):
    """The quickstart runs end to end (tiny settings; the real figures are in the README), and the
    number of worker processes changes no digit and no trained weight."""
    from evaluation import plots, quickstart
    tiny = ['--nfe=3', '--kimg=0.016', '--batch=8', '--num=2', '--cache_dir=cache', '--strip_model=toy']
    code, out = run_cli(quickstart.main, tiny + ['--outdir=exps', '--grid=q/g.png', '--workers=2'])
    assert code == 0, out
    table = table_of(out)
    assert list(table) == ['AMED-Plugin (iPNDM, recommended)', 'AMED-Solver, interval loss', 'iPNDM', 'DPM-Solver-2',
                           'DPM-Solver++(3M)', 'Euler']
    assert all(np.isfinite(float(cells[0])) for cells in table.values()) and 'in 2 process(es)' in out
    with open('q/table.md', encoding='utf-8') as f:
        assert table_of(f.read()) == table
    # The table's reference (2 seeds) and the second strip's (8 seeds) are cached.
    assert os.path.exists('q/g.png') and len(os.listdir('exps')) == 2 and len(os.listdir('cache')) == 2
    # The strips: the reference and the 6 rows of the table, 2 seeds each; the reference and the 4
    # plain solvers, 8 seeds; 32x32 pixels at scale 3.
    assert read_png('q/strip.png').shape[:2] == (7 * (32 * 3 + 2), read_png('q/strip.png').shape[1])
    strip = read_png('q/strip-toy.png')
    assert strip.shape[0] == 5 * (32 * 3 + 2) and strip.shape[1] > 8 * (32 * 3 + 2)
    assert 'Reference check: halving its steps changes it by' in out
    assert os.path.exists('q/error_vs_nfe.png') or plots.MATPLOTLIB_MISSING in out

    # One at a time in this process, with every recipe: the same rows and weights, and three more rows.
    code, serial = run_cli(quickstart.main, tiny + ['--outdir=serial', '--grid=s/g.png', '--workers=1', '--all_recipes'])
    assert code == 0, serial
    every = table_of(serial)
    assert {label: every[label] for label in table} == table and len(every) == 9
    assert {'AMED-Solver, trajectory loss', 'AMED-Plugin (iPNDM), interval loss',
            'AMED-Plugin (iPNDM), trajectory loss'} < set(every)
    runs = {name.split('-', 1)[1]: os.path.join('serial', name) for name in os.listdir('serial')}
    assert len(runs) == 5
    for name in os.listdir('exps'):
        weights = [load_predictor(d, verbose=False)[0].state_dict() for d in (os.path.join('exps', name),
                                                                              runs[name.split('-', 1)[1]])]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_quickstart_failed_job_is_one_line(in_tmp):
    """A job that fails in a worker process ends the quickstart with one line naming the job (here
    both jobs fail, so the line names whichever of the two workers reported first)."""
    from evaluation import quickstart
    open('afile', 'w').close()
    result = CliRunner().invoke(quickstart.main, ['--nfe=3', '--kimg=0.016', '--batch=8', '--num=2', '--outdir=afile',
                                                  '--cache_dir=cache', '--strip_model=none', '--workers=2'])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] in [f'Error: {job} NFE 3: ValueError: --outdir afile is a file, not a folder'
                                            for job in ('AMED-Solver, interval loss',
                                                        'AMED-Plugin (iPNDM, recommended)')], lines
