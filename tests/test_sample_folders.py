"""Sample folders that cannot mix: default folders that name the predictor or the plain solver's
settings, the manifest beside the images, refusals unless --overwrite, --resume after a cut-off
run, and fid.py calc reading the manifests."""

import json
import os

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import fid
import sample
import train
from generation import manifest

PLAIN = ['--dataset_name=toy', '--no-progress', '--num_steps=3']


def run(cmd, args):
    result = CliRunner().invoke(cmd, args, catch_exceptions=False)
    return result.exit_code, result.output


def tree(folder):
    """Every file under ``folder`` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_tiny(*extra):
    code, out = run(train.main, ['--dataset_name=toy', '--batch=8', '--total_kimg=0.008', '--no-progress',
                                 '--num_steps=3', '--outdir=exps', *extra])
    assert code == 0, out
    return sorted(os.listdir('exps'))[-1]


def test_default_folders_name_the_predictor_and_the_plain_settings(in_tmp):
    first, second = train_tiny(), train_tiny('--seed=1')
    for exp in ('0', '1'):
        code, out = run(sample.main, [f'--predictor_path={exp}', '--seeds=0-1', '--no-progress'])
        assert code == 0, out
    assert sorted(os.listdir('samples/toy')) == sorted([first, second])
    for run_name in (first, second):
        folder = os.path.join('samples/toy', run_name, 'network-snapshot-000000')
        assert sorted(os.listdir(folder)) == ['000000', 'manifest.json']
        m = manifest.read_manifest(folder)
        assert m['config']['source']['kind'] == 'predictor' and len(m['config']['source']['sha256']) == 64
        assert m['seeds'] == '0,1'
    code, out = run(sample.main, PLAIN + ['--seeds=0', '--solver=dpmpp', '--afs=True'])
    assert code == 0, out
    plain = [d for d in os.listdir('samples/toy') if d.startswith('dpmpp')]
    assert plain == ['dpmpp_nfe1_n3-poly7.0-sigma0.002-80-afs-max_order3-predict_x0True-lower_order_finalTrue-'
                     'thresholdingTrue-corrected_3mFalse']


def test_manifest_records_the_configuration(in_tmp):
    code, out = run(sample.main, PLAIN + ['--seeds=3-5', '--outdir=s', '--solver=ipndm', '--max_order=2'])
    assert code == 0, out
    m = json.load(open('s/manifest.json'))
    assert m['format'] == 'amed-samples' and m['seeds'] == '3-5'
    assert m['config']['solver']['solver'] == 'ipndm' and m['config']['solver']['max_order'] == 2
    assert len(m['config']['solver']['t_steps']) == 3 and m['config']['model']['dataset_name'] == 'toy'
    assert m['config']['source'] == {'kind': 'plain'}


def test_a_manifest_of_older_code_still_matches(in_tmp):
    """Manifests written before the solver settings became one value ({name, options, afs,
    t_steps}) read as the same configuration: --resume continues such a folder."""
    args = PLAIN + ['--seeds=3-5', '--outdir=s', '--solver=ipndm', '--max_order=2']
    assert run(sample.main, args)[0] == 0
    m = json.load(open('s/manifest.json'))
    new = m['config']['solver']
    m['config']['solver'] = dict(name='ipndm', options={'max_order': 2}, afs=False, t_steps=new['t_steps'])
    json.dump(m, open('s/manifest.json', 'w'))
    os.remove('s/000000/000004.png')
    code, out = run(sample.main, args + ['--resume'])
    assert code == 0 and '1 images (2 of 3 seeds already done)' in out, out
    m['config']['solver']['options'] = {'max_order': 3}
    json.dump(m, open('s/manifest.json', 'w'))
    code, out = run(sample.main, args + ['--resume'])
    assert code != 0 and 'differs in solver.max_order' in out, out


@pytest.mark.parametrize('second,word', [
    (['--solver=euler'], 'solver.solver'),
    (['--schedule_rho=3'], 'solver.t_steps'),
    (['--afs=True'], 'solver.afs'),
    (['--no-subdirs'], 'layout.subdirs'),
])
def test_another_configuration_is_refused_unless_overwrite(in_tmp, second, word):
    code, out = run(sample.main, PLAIN + ['--seeds=0-3', '--outdir=s'])
    assert code == 0, out
    before = tree('s')
    code, out = run(sample.main, PLAIN + ['--seeds=0-3', '--outdir=s', *second])
    assert code != 0 and 'another configuration' in out and word in out and len(out.strip().splitlines()) == 1
    assert tree('s') == before
    code, out = run(sample.main, PLAIN + ['--seeds=2-3', '--outdir=s', '--overwrite', *second])
    assert code == 0, out
    assert sorted(int(os.path.splitext(os.path.basename(p))[0]) for p in manifest.sample_files('s')) == [2, 3]
    assert json.load(open('s/manifest.json'))['seeds'] == '2,3'


def test_same_configuration_adds_seeds(in_tmp):
    for seeds in ('0-1', '5'):
        code, out = run(sample.main, PLAIN + [f'--seeds={seeds}', '--outdir=s'])
        assert code == 0, out
    assert json.load(open('s/manifest.json'))['seeds'] == '0,1,5'


def test_folder_with_images_but_no_manifest_is_refused(in_tmp):
    os.makedirs('s/000000')
    PIL.Image.new('RGB', (32, 32)).save('s/000000/000007.png')
    code, out = run(sample.main, PLAIN + ['--seeds=0', '--outdir=s'])
    assert code != 0 and 'no manifest.json' in out
    assert sorted(tree('s')) == ['000000/000007.png']
    code, out = run(sample.main, PLAIN + ['--seeds=0', '--outdir=s', '--overwrite'])
    assert code == 0, out
    assert sorted(tree('s')) == ['000000/000000.png', 'manifest.json']


def test_resume_finishes_a_cut_off_run(in_tmp):
    code, out = run(sample.main, PLAIN + ['--seeds=0-9', '--outdir=full', '--batch=4'])
    assert code == 0, out
    code, out = run(sample.main, PLAIN + ['--seeds=0-9', '--outdir=cut', '--batch=4'])
    assert code == 0, out
    os.remove('cut/000000/000004.png')                       # never written
    data = open('cut/000000/000007.png', 'rb').read()
    open('cut/000000/000007.png', 'wb').write(data[:len(data) // 2])   # cut off
    kept = os.stat('cut/000000/000001.png').st_mtime_ns
    code, out = run(sample.main, PLAIN + ['--seeds=0-9', '--outdir=cut', '--resume', '--batch=3'])
    assert code == 0, out
    assert 'Sampling 2 images (8 of 10 seeds already done)' in out
    assert tree('cut') == tree('full')
    assert os.stat('cut/000000/000001.png').st_mtime_ns == kept
    code, out = run(sample.main, PLAIN + ['--seeds=0-9', '--outdir=cut', '--resume', '--solver=euler'])
    assert code != 0 and 'another configuration' in out
    code, out = run(sample.main, PLAIN + ['--seeds=0-9', '--outdir=cut', '--resume', '--overwrite'])
    assert code != 0 and 'not both' in out
    code, out = run(sample.main, PLAIN + ['--seeds=0-9', '--outdir=cut', '--resume', '--grid'])
    assert code != 0 and '--grid' in out


@pytest.mark.parametrize('grid', [False, True])
def test_unusable_outdir_fails_before_sampling(in_tmp, grid):
    open('afile', 'w').write('x')
    for outdir, word in (('afile', 'is a file'), ('afile/sub', 'under')):
        code, out = run(sample.main, PLAIN + ['--seeds=0-3', f'--outdir={outdir}', *(['--grid'] if grid else [])])
        assert code != 0 and word in out and 'Sampling' not in out, out
    assert sorted(os.listdir('.')) == ['afile']


def test_fid_calc_reads_the_manifests(in_tmp):
    code, out = run(fid.main, ['toydata', '--dest=data', '--num=8', '--no-progress'])
    assert code == 0, out
    code, out = run(fid.main, ['ref', '--metric=pixel', '--data=data', '--dest=ref.npz', '--workers=0',
                               '--no-progress'])
    assert code == 0, out
    code, out = run(sample.main, PLAIN + ['--seeds=0-5', '--outdir=runs/a'])
    assert code == 0, out
    os.remove('runs/a/000000/000005.png')
    calc = ['calc', '--metric=pixel', '--ref=ref.npz', '--workers=0', '--no-progress']
    code, out = run(fid.main, calc + ['--images=runs/a'])
    assert code == 0 and 'runs/a: 5 of the 6 seeds in its manifest.json (1 missing)' in out, out
    # Another configuration beside it: the parent folder mixes two manifests.
    code, out = run(sample.main, PLAIN + ['--seeds=0-5', '--outdir=runs/b', '--solver=euler'])
    assert code == 0, out
    code, out = run(fid.main, calc + ['--images=runs'])
    assert code != 0 and 'mixes samples of two configurations' in out and 'solver.solver' in out
    # An image that no manifest lists.
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save('runs/a/000000/000042.png')
    code, out = run(fid.main, calc + ['--images=runs/a'])
    assert code != 0 and 'does not list' in out and '000042.png' in out
