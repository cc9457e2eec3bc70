"""Every bad input in one table: each row is (script, arguments, exit code, a fragment
of the message). A row passes when the run exits with that code, prints exactly one line that
starts with 'Error:' (or, for the rows that expect a warning, exits 0 with it) and holds the
fragment, and leaves the folder it ran in exactly as it was: nothing written.

Most rows call the scripts' click commands in this process (they fail before any model work);
the rows in SUBPROCESS run the real scripts, as a user does."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
import sample
import train
from generation.generate import write_toy_data
from metrics import frechet
from metrics.image_sets import ImageSet, MetricError
from torch_utils.misc import StackedRandomGenerator, parse_seeds
from predictors.networks import AMEDPredictor
from predictors.snapshot import save_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'train': train.main, 'sample': sample.main, 'fid': fid.main}

TRAIN = ['--dataset_name=toy', '--batch=8', '--total_kimg=0.008', '--num_steps=3', '--no-progress', '--outdir=exps']
TOY = ['--dataset_name=toy', '--no-progress', '--seeds=0', '--outdir=out']
SNAP = ['--no-progress', '--seeds=0', '--outdir=out']
SETTINGS = dict(solver='amed', num_steps=3, schedule_type='polynomial', schedule_rho=7.0, sigma_min=0.002,
                sigma_max=80.0, afs=False, dataset_name='toy', img_shape=[3, 32, 32], label_dim=0)
NOT_FINITE = "is not a finite number"
SEED_RANGE = 'is not in the range 0<=x<=4294967295'

ROWS = [
    # train.py: non-finite floats, seeds, names, output folders, options that would be ignored.
    ('train', ['--total_kimg=nan'], 2, f"'--total_kimg': 'nan' {NOT_FINITE}"),
    ('train', ['--total_kimg=inf'], 2, f"'--total_kimg': 'inf' {NOT_FINITE}"),
    ('train', ['--lr=nan'], 2, f"'--lr': 'nan' {NOT_FINITE}"),
    ('train', ['--lr=inf'], 2, f"'--lr': 'inf' {NOT_FINITE}"),
    ('train', ['--tick=nan'], 2, f"'--tick': 'nan' {NOT_FINITE}"),
    ('train', ['--snap=inf'], 2, f"'--snap': 'inf' {NOT_FINITE}"),
    ('train', ['--scale_dir=inf'], 2, "'--scale_dir': scale_dir must be a finite number in [0, 1)"),
    ('train', ['--scale_time=inf'], 2, "'--scale_time': scale_time must be a finite number in [0, 1)"),
    ('train', ['--scale_time=2'], 2, "'--scale_time': scale_time must be a finite number in [0, 1)"),
    ('train', ['--sigma_min=nan'], 2, f"'--sigma_min': 'nan' {NOT_FINITE}"),
    ('train', ['--sigma_max=inf'], 2, f"'--sigma_max': 'inf' {NOT_FINITE}"),
    ('train', ['--schedule_rho=inf'], 2, f"'--schedule_rho': 'inf' {NOT_FINITE}"),
    ('train', ['--loss=trajectory', '--inter_weight=nan'], 2, f"'--inter_weight': 'nan' {NOT_FINITE}"),
    ('train', ['--guidance_rate=nan'], 2, f"'--guidance_rate': 'nan' {NOT_FINITE}"),
    ('train', ['--seed=-1'], 2, f"'--seed': -1 {SEED_RANGE}"),
    ('train', ['--seed=4294967296'], 2, f"'--seed': 4294967296 {SEED_RANGE}"),
    ('train', ['--seed=99999999999999999999999'], 2, f"'--seed': 99999999999999999999999 {SEED_RANGE}"),
    ('train', ['--desc=' + 'a' * 300], 1, '--desc: the name 00000-toy-3-'),
    ('train', ['--outdir=afile'], 1, '--outdir afile is a file, not a folder'),
    ('train', ['--outdir=afile/x'], 1, '--outdir afile/x lies under'),
    ('train', ['--outdir=/proc/x'], 1, '--outdir /proc/x: cannot create anything in /proc'),
    ('train', ['--schedule_type=logsnr', '--schedule_rho=3'], 1,
     '--schedule_rho=3 has no effect with --schedule_type=logsnr'),
    ('train', ['--predictor_path=nan.pt'], 1, "nan.pt: 8950 of the predictor's weights are NaN or infinite"),
    ('train', ['--sigma_max=1000', '--dry-run'], 0, "Warning: the schedule spans sigma 0.002..1000, outside the "
                                                     "model's trained range 0.002..80"),
    # sample.py: damaged predictor files, seeds, floats, output folders, ignored options.
    ('sample', SNAP + ['--predictor_path=half.pt'], 1, 'half.pt is not an AMED predictor snapshot (a zip archive '
                                                       'that is cut off or damaged'),
    ('sample', SNAP + ['--predictor_path=cut90.pt'], 1, 'cut90.pt is not an AMED predictor snapshot (a zip archive '
                                                        'that is cut off'),
    ('sample', SNAP + ['--predictor_path=short10.pt'], 1, 'short10.pt is not an AMED predictor snapshot (a zip '
                                                          'archive that is cut off'),
    ('sample', SNAP + ['--predictor_path=nokey.pt'], 1, "nokey.pt: the snapshot's settings lack num_steps"),
    ('sample', SNAP + ['--predictor_path=empty.pt'], 1, 'empty.pt: state_dict does not match predictor_config: '
                                                        '10 missing (e.g. map_layer0.weight)'),
    ('sample', SNAP + ['--predictor_path=nan.pt'], 1, "nan.pt: 8950 of the predictor's weights are NaN or infinite"),
    ('sample', SNAP + ['--predictor_path=text.txt'], 1, 'text.txt is not an AMED predictor snapshot (a text file'),
    ('sample', SNAP + ['--dataset_name=cifar10', '--model_path=adir'], 1, "a folder, not a file: 'adir'"),
    ('sample', TOY + ['--seeds=0-999999999'], 1, '--seeds asks for 1000000000 seeds; one run takes at most 1000000'),
    ('sample', TOY + ['--seeds=0-4294967295'], 1, '--seeds asks for 4294967296 seeds'),
    ('sample', TOY + ['--seeds=4294967296'], 1, '--seeds: seed 4294967296 is out of range: seeds must lie in [0, 2^32)'),
    ('sample', TOY + ['--seeds=4294967290-4294967300'], 1, 'seed 4294967300 is out of range'),
    ('sample', TOY + ['--sigma_max=nan'], 2, f"'--sigma_max': 'nan' {NOT_FINITE}"),
    ('sample', TOY + ['--sigma_min=inf'], 2, f"'--sigma_min': 'inf' {NOT_FINITE}"),
    ('sample', TOY + ['--schedule_rho=nan'], 2, f"'--schedule_rho': 'nan' {NOT_FINITE}"),
    ('sample', TOY + ['--guidance_rate=inf'], 2, f"'--guidance_rate': 'inf' {NOT_FINITE}"),
    ('sample', TOY + ['--schedule_type=logsnr', '--schedule_rho=3'], 1,
     '--schedule_rho=3 has no effect with --schedule_type=logsnr'),
    ('sample', TOY + ['--outdir=afile'], 1, '--outdir afile is a file, not a folder'),
    ('sample', TOY + ['--outdir=afile/x', '--grid'], 1, '--outdir afile/x lies under'),
    ('sample', TOY + ['--outdir=/proc/x'], 1, '--outdir /proc/x: cannot create anything in /proc'),
    # fid.py: damaged or non-finite statistics and detectors, unusable or occupied destinations.
    ('fid', ['calc', '--metric=pixel', '--images=data', '--ref=text.txt'], 1, 'text.txt is not a statistics file'),
    ('fid', ['calc', '--metric=pixel', '--images=data', '--ref=nanref.npz'], 1,
     'nanref.npz: the statistics are not finite (mu holds 1 NaN or infinite values)'),
    ('fid', ['ref', '--data=data', '--dest=new.npz', '--detector=text.pth'], 1,
     '--detector text.pth: cannot load it as weights: a text file, not a torch file'),
    ('fid', ['ref', '--metric=pixel', '--data=data', '--dest=adir'], 1, '--dest adir is a folder, not a file'),
    ('fid', ['ref', '--metric=pixel', '--data=data', '--dest=afile/x.npz'], 1, '--dest afile/x.npz lies under'),
    ('fid', ['ref', '--metric=pixel', '--data=data', '--dest=ref.npz'], 1,
     '--dest ref.npz exists; pass --overwrite to replace it'),
    ('fid', ['toydata', '--dest=afile', '--num=3'], 1, '--dest afile is a file, not a folder'),
    ('fid', ['toydata', '--dest=afile/x', '--num=3'], 1, '--dest afile/x lies under'),
    ('fid', ['toydata', '--dest=data', '--num=5', '--seed=5'], 1,
     'data holds samples of another configuration (its manifest.json differs in source.seed); choose another --dest '
     'or pass --overwrite'),
    ('fid', ['toydata', '--dest=data', '--num=5', '--dataset_name=toy_cond'], 1, 'differs in model.dataset_name'),
    ('fid', ['toydata', '--dest=loose', '--num=5'], 1, 'loose holds sample files but no manifest.json'),
    ('fid', ['toydata', '--dest=new', '--num=3', '--seed=4294967296'], 2, f"'--seed': 4294967296 {SEED_RANGE}"),
]



def row_id(row):
    script, args, _, _ = row
    return f"{script}:{' '.join(a[:30] for a in args if a not in TRAIN + TOY + SNAP)}"


#: Rows that run the real script in a subprocess (the others call its click command in-process).
SUBPROCESS = {'train:--outdir=/proc/x', 'sample:--predictor_path=half.pt', 'fid:ref --metric=pixel --data=data --dest=adir'}
assert SUBPROCESS <= {row_id(r) for r in ROWS}


def tree(folder):
    """Every folder and file under ``folder``, files with their bytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + '/'] = None
        for f in files:
            path = os.path.join(root, f)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """The inputs of the table, made once: predictor snapshots (good, cut off, keyless, empty,
    NaN), toy data with its manifest and its pixel statistics (good and with NaN), a folder of
    images without a manifest, a text file, a folder."""
    base = tmp_path_factory.mktemp('bad_inputs')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        predictor = AMEDPredictor()
    good = base / 'good.pt'
    save_snapshot(good, predictor, SETTINGS)
    data = good.read_bytes()
    for name, size in (('half.pt', len(data) // 2), ('cut90.pt', len(data) * 9 // 10), ('short10.pt', len(data) - 10)):
        (base / name).write_bytes(data[:size])
    snap = torch.load(good, weights_only=True)
    variants = {'nokey.pt': dict(snap, settings={k: v for k, v in SETTINGS.items() if k != 'num_steps'}),
                'empty.pt': dict(snap, state_dict={}),
                'nan.pt': dict(snap, state_dict={k: v * float('nan') for k, v in snap['state_dict'].items()})}
    for name, content in variants.items():
        torch.save(content, base / name)
    (base / 'text.txt').write_text('hello\n')
    (base / 'text.pth').write_text('hello\n')
    (base / 'afile').write_text('a file, not a folder\n')
    (base / 'adir').mkdir()
    write_toy_data(str(base / 'data'), 12, progress=False)
    frechet.compute_ref(str(base / 'data'), str(base / 'ref.npz'), metric='pixel', workers=0, progress=False)
    stats = dict(np.load(base / 'ref.npz'))
    stats['mu'][0] = np.nan
    np.savez(base / 'nanref.npz', **stats)
    (base / 'loose' / '000000').mkdir(parents=True)
    PIL.Image.new('RGB', (32, 32)).save(base / 'loose' / '000000' / '000000.png')
    return base


def run_row(script, args, cwd, real):
    if real:
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
        done = subprocess.run([sys.executable, os.path.join(ROOT, f'{script}.py'), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr
    result = CliRunner().invoke(SCRIPTS[script], args, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize('index', range(len(ROWS)), ids=[row_id(r) for r in ROWS])
def test_bad_input(world, monkeypatch, index):
    script, args, code, fragment = ROWS[index]
    args = (TRAIN if script == 'train' else []) + args
    monkeypatch.chdir(world)
    before = tree(world)
    got, out = run_row(script, args, world, row_id(ROWS[index]) in SUBPROCESS)
    assert got == code, out
    if code:
        errors = [line for line in out.splitlines() if line.startswith('Error:')]
        assert len(errors) == 1 and fragment in errors[0] and 'Traceback' not in out, out
    else:
        assert fragment in out, out
    assert tree(world) == before, 'the run wrote or changed files'


@pytest.mark.parametrize('index', [i for i, r in enumerate(ROWS) if r[0] == 'train' and r[2]],
                         ids=[row_id(r) for r in ROWS if r[0] == 'train' and r[2]])
def test_dry_run_makes_the_same_checks(world, monkeypatch, index):
    _, args, code, fragment = ROWS[index]
    monkeypatch.chdir(world)
    before = tree(world)
    got, out = run_row('train', TRAIN + args + ['--dry-run'], world, False)
    assert got == code and fragment in out, out
    assert tree(world) == before


def test_sigma_max_above_the_trained_range_warns_and_samples(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run_row('sample', TOY + ['--sigma_max=1000'], tmp_path, False)
    assert code == 0, out
    warnings = [line for line in out.splitlines() if line.startswith('Warning:')]
    assert warnings == ["Warning: the schedule spans sigma 0.002..1000, outside the model's trained range 0.002..80 "
                        "(--sigma_min/--sigma_max)"], out
    assert os.path.isfile('out/000000/000000.png')
    code, out = run_row('sample', TOY + ['--outdir=inside'], tmp_path, False)
    assert code == 0 and 'Warning' not in out, out


def test_ref_overwrite_replaces_dest(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'old.npz').write_bytes(b'old')
    code, out = run_row('fid', ['ref', '--metric=pixel', f'--data={world / "data"}', '--dest=old.npz', '--overwrite',
                                '--no-progress', '--workers=0'], tmp_path, False)
    assert code == 0, out
    assert np.array_equal(np.load('old.npz')['mu'], np.load(world / 'ref.npz')['mu'])


def test_toydata_overwrite_removes_the_old_images_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (['--num=30'], ['--num=40'], ['--num=5', '--seed=5', '--overwrite']):
        code, out = run_row('fid', ['toydata', '--dest=d', '--no-progress'] + args, tmp_path, False)
        assert code == 0, out
    assert sorted(os.listdir('d/000000')) == [f'{i:06d}.png' for i in range(5)]
    assert '"seed": 5' in (tmp_path / 'd' / 'manifest.json').read_text()


def test_computed_statistics_must_be_finite(world):
    images = ImageSet(str(world / 'data'))

    def nan_detector(x, return_features=True):
        return torch.full((x.shape[0], 4), float('nan'))
    with pytest.raises(MetricError, match='not finite'):
        frechet.feature_stats(images, nan_detector, workers=0, progress=False)


def test_seeds_are_checked_as_ranges_and_the_generator_refuses_large_ones():
    with pytest.raises(ValueError, match='at most 1000000'):
        parse_seeds('0-99999999999999999999')   # would take forever as a list
    assert parse_seeds('5,0-2') == [5, 0, 1, 2]
    with pytest.raises(ValueError, match=r'\[0, 2\^32\)'):
        StackedRandomGenerator('cpu', [1 << 32])
