"""Nothing lost, nothing mixed, under concurrency and faults: locks on every writer (real
processes), the integrity check of image sets, temporary files, SIGTERM and SIGKILL (real signals),
full disks (a file-size limit), bounded inputs and values that are corrupt although well-formed."""

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
import sample
import train
from integrations import card
from generation import generate, manifest
from torch_utils.locks import Lock, LockHeld
from torch_utils.misc import SeedSet
from predictors import experiments
from training.state import save_training_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
PLAIN = ['--dataset_name=toy', '--no-progress', '--num_steps=3']
TRAIN = ['--dataset_name=toy', '--batch=8', '--num_steps=3', '--no-progress']
PIXEL = ['--metric=pixel', '--workers=0', '--no-progress']


def cli(script, args, cwd, limit=None, **kwargs):
    """Run ``python <script> <args>`` in ``cwd``; ``limit``: a file-size limit in bytes (ulimit -f)."""
    pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    cmd = [sys.executable, *([] if script.startswith('-') else [os.path.join(ROOT, script)]), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=pre,
                          **kwargs)


def start(script, args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def one_error(result):
    """The single 'Error: ...' line of a failed command (and no traceback)."""
    out = result.stdout + result.stderr
    errors = [line for line in out.splitlines() if line.startswith('Error:')]
    assert result.returncode != 0 and len(errors) == 1 and 'Traceback' not in out, out
    return errors[0]


def run(cmd, args):
    result = CliRunner().invoke(cmd, args, catch_exceptions=False)
    return result.exit_code, result.output


def error_line(code, out):
    """The single 'Error: ...' line of a failed in-process command."""
    errors = [line for line in out.splitlines() if line.startswith('Error:')]
    assert code != 0 and len(errors) == 1 and 'Traceback' not in out, out
    return errors[0]


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0] if proc.poll() is not None else ''
        time.sleep(0.02)


HOLDER = textwrap.dedent('''
    import signal, sys, time
    from torch_utils.locks import Lock
    lock = Lock(sys.argv[1], is_file=sys.argv[2] == 'file')
    def stop(*_):
        lock.release(cleanup=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print('locked', flush=True)
    time.sleep(600)
''')


@contextlib.contextmanager
def held(target, cwd, is_file=False):
    """Another process holding the lock on ``target`` (it lets go on SIGTERM, and leaves nothing)."""
    proc = subprocess.Popen([sys.executable, '-c', HOLDER, target, 'file' if is_file else 'folder'], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'locked'
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def png_seeds(folder):
    return sorted(int(os.path.splitext(os.path.basename(p))[0]) for p in manifest.sample_files(folder)
                  if p.endswith('.png'))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------
# 1. Concurrent writers.

def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = str(tmp_path / 'out')
    with held(folder, tmp_path) as holder:
        with pytest.raises(LockHeld, match=f'process {holder.pid} on .* since .*python'):
            Lock(folder, '--outdir out')
        holder.send_signal(signal.SIGKILL)      # the kernel releases a dead holder's lock
        holder.wait()
        with Lock(folder) as lock:              # no stale-lock refusal
            assert os.path.exists(lock.path)
        assert os.listdir(folder) == []         # released: the lock file is gone


def test_every_writer_refuses_a_held_output(in_tmp):
    os.makedirs('exps/00000-toy-run')
    json.dump(dict(dataset_name='toy', complete=False, kimg=0), open('exps/00000-toy-run/training_options.json', 'w'))
    cases = [   # (command, its arguments, the output it writes, a file?); sample.py runs as a process of its own
        ('sample.py', PLAIN + ['--seeds=0-3', '--outdir=s'], 's', False),
        (fid.main, ['toydata', '--dest=d', '--num=10', '--no-progress'], 'd', False),
        (fid.main, ['ref', '--data=d0', '--dest=r.npz'] + PIXEL, 'r.npz', True),
        (train.main, ['--resume=exps/00000-toy-run'], 'exps/00000-toy-run', False),
        (card.main, ['export', '--predictor_path=0', '--out=c.json'], 'c.json', True),
    ]
    before = sorted(os.listdir('.'))
    for cmd, args, target, is_file in cases:
        with held(target, in_tmp, is_file) as holder:
            line = one_error(cli(cmd, args, in_tmp)) if isinstance(cmd, str) else error_line(*run(cmd, args))
            assert f'in use by process {holder.pid}' in line, line
    assert sorted(os.listdir('.')) == before            # nothing written, no folder left behind
    assert os.listdir('exps/00000-toy-run') == ['training_options.json']


def test_experiment_numbers_are_reserved_atomically(tmp_path):
    code = textwrap.dedent('''
        import sys
        from predictors.experiments import make_run_dir
        for i in range(6):
            path, lock = make_run_dir('exps', lambda n: f'{n:05d}-{sys.argv[1]}')
            lock.release()
    ''')
    procs = [subprocess.Popen([sys.executable, '-c', code, tag], cwd=tmp_path, env=ENV) for tag in 'ab']
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ids = [int(name[:5]) for name in os.listdir(tmp_path / 'exps')]
    assert sorted(ids) == list(range(12))               # twelve runs, twelve numbers


def test_two_toydata_runs_never_mix_and_sigterm_says_how_to_continue(in_tmp):
    assert run(fid.main, ['toydata', '--dest=full', '--num=20', '--no-progress'])[0] == 0
    assert run(fid.main, ['ref', '--data=full', '--dest=ref.npz'] + PIXEL)[0] == 0
    first = start('fid.py', ['toydata', '--dest=d', '--num=30000', '--no-progress'], in_tmp)
    wait_for(lambda: os.path.isdir('d/000000') and len(os.listdir('d/000000')) > 100, first)
    code, out = run(fid.main, ['toydata', '--dest=d', '--num=50', '--seed=1', '--no-progress'])
    assert code != 0 and f'process {first.pid}' in out
    code, out = run(fid.main, ['calc', '--images=d', '--ref=ref.npz'] + PIXEL)
    assert code != 0 and 'being written' in out                      # no metric of a set that is still growing
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, out
    assert 'SIGTERM: stopped' in out and 'of the 30000 images' in out and 'continue with: python' in out
    m = manifest.read_manifest('d')
    written = manifest.manifest_seeds(m)
    assert manifest.asked_seeds(m) == SeedSet('0-29999') and 0 < len(written) < 30000
    assert set(written) <= set(png_seeds('d'))          # the manifest lists no seed that was never written
    assert not os.path.exists('d/.lock')
    # A reference from the interrupted set is refused; calc records that the set is incomplete.
    code, out = run(fid.main, ['ref', '--data=d', '--dest=ref2.npz'] + PIXEL)
    assert code != 0 and 'incomplete' in out and not os.path.exists('ref2.npz')
    code, out = run(fid.main, ['calc', '--images=d', '--ref=ref.npz'] + PIXEL)
    assert code == 0 and 'incomplete' in out, out
    line = json.loads(open('d/metrics.jsonl').read().splitlines()[-1])
    assert line['images']['incomplete'] is True and line['images']['missing'] == 30000 - len(png_seeds('d'))
    assert run(fid.main, ['calc', '--images=full', '--ref=ref.npz'] + PIXEL)[0] == 0
    assert json.loads(open('full/metrics.jsonl').read())['images']['incomplete'] is False


# ----------------------------------------------------------------------------
# 3. Signals and temporary files in sample.py.

def test_sample_sigterm_then_resume_cleans_up_and_completes(in_tmp):
    args = PLAIN + ['--seeds=0-599', '--batch=1', '--outdir=s']
    proc = start('sample.py', args, in_tmp)
    wait_for(lambda: os.path.isdir('s/000000') and len(os.listdir('s/000000')) > 10, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert 'SIGTERM: stopped' in out and '--resume' in out.splitlines()[-1], out
    done = png_seeds('s')
    assert set(manifest.manifest_seeds(manifest.read_manifest('s'))) == set(done) and 0 < len(done) < 600
    # What a SIGKILL in the middle of a write leaves: temporary files, of this code and of older code.
    # No image scan takes them for images, and --resume removes them.
    for name in ('.000590.png.abcd1234.tmp', '.000591.png.abcd1234.png'):
        shutil.copy(f's/000000/{done[0]:06d}.png', f's/000000/{name}')
    code, calc_out = run(fid.main, ['calc', '--images=s', '--ref=nothing.npz'] + PIXEL)
    assert code != 0 and 'nothing.npz' in calc_out      # refused for the missing reference, not the folder
    cmd = out.splitlines()[-1].split('continue with: ')[1].split()
    assert cmd[:2] == ['python', os.path.join(ROOT, 'sample.py')] and cmd[-1] == '--resume'
    result = cli('sample.py', cmd[2:], in_tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'({len(done)} of 600 seeds already done)' in result.stdout
    assert png_seeds('s') == list(range(600)) and manifest.temporary_files('s') == []
    assert manifest.read_manifest('s')['seeds'] == '0-599'


# ----------------------------------------------------------------------------
# 2. The integrity check of image sets (calc, ref, --resume, --overwrite).

def test_calc_accepts_only_one_configurations_set(in_tmp):
    assert run(fid.main, ['toydata', '--dest=data', '--num=8', '--no-progress'])[0] == 0
    assert run(fid.main, ['ref', '--data=data', '--dest=ref.npz'] + PIXEL)[0] == 0
    calc = ['calc', '--ref=ref.npz'] + PIXEL
    for folder in ('same/a', 'same/b'):                 # the same seeds in two folders
        assert run(sample.main, PLAIN + ['--seeds=0-4', f'--outdir={folder}'])[0] == 0
    code, out = run(fid.main, calc + ['--images=same'])
    assert code != 0 and 'seed 0 twice' in out
    shutil.copytree('same/a', 'loose/a')                # images without a manifest beside a folder with one
    os.makedirs('loose/other/000000')
    shutil.copy('same/a/000000/000001.png', 'loose/other/000000/000001.png')
    code, out = run(fid.main, calc + ['--images=loose'])
    assert code != 0 and 'outside every folder with a manifest.json' in out
    shutil.copytree('same/a', 'mixed/a')                # a zip is checked as a folder is
    assert run(sample.main, PLAIN + ['--seeds=5-9', '--outdir=mixed/b', '--solver=euler'])[0] == 0
    for folder in ('mixed', 'same/a'):
        with zipfile.ZipFile(f'{folder.replace("/", "_")}.zip', 'w') as z:
            for root, _, files in os.walk(folder):
                for f in files:
                    z.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), folder))
    code, out = run(fid.main, calc + ['--images=mixed.zip'])
    assert code != 0 and 'mixes samples of two configurations' in out
    code, out = run(fid.main, calc + ['--images=same_a.zip'])
    assert code == 0 and 'all 5 seeds' in out, out
    os.rename('same/a/000000/000003.png', 'same/a/000003.png')    # moved out of its place
    code, out = run(fid.main, calc + ['--images=same/a'])
    assert code != 0 and 'not where sample.py puts seed 3' in out


def test_seeds_from_a_million_have_seven_digit_folders(in_tmp):
    seeds = ['--seeds=999998-1000001', '--outdir=s']
    assert run(sample.main, PLAIN + seeds)[0] == 0
    assert sorted(os.listdir('s')) == ['1000000', '999000', 'manifest.json']
    os.remove('s/1000000/1000001.png')
    code, out = run(sample.main, PLAIN + seeds + ['--resume'])
    assert code == 0 and '1 images (3 of 4 seeds already done)' in out, out
    code, out = run(sample.main, PLAIN + seeds + ['--overwrite', '--solver=euler', '--seeds=5'])
    assert code == 0, out
    assert png_seeds('s') == [5]                        # nothing of the old configuration is left
    assert run(sample.main, PLAIN + ['--seeds=1000000-1000002', '--outdir=t'])[0] == 0
    assert run(fid.main, ['toydata', '--dest=data', '--num=8', '--no-progress'])[0] == 0
    assert run(fid.main, ['ref', '--data=data', '--dest=ref.npz'] + PIXEL)[0] == 0
    code, out = run(fid.main, ['calc', '--images=t', '--ref=ref.npz'] + PIXEL)
    assert code == 0 and 'all 3 seeds' in out


def test_resume_writes_a_missing_trajectory(in_tmp):
    args = PLAIN + ['--seeds=0-3', '--outdir=s', '--return_inters=True']
    assert run(sample.main, args)[0] == 0
    before = open('s/000000/000002.npz', 'rb').read()
    os.remove('s/000000/000002.npz')
    code, out = run(sample.main, args + ['--resume'])
    assert code == 0 and '1 images (3 of 4 seeds already done)' in out, out
    assert open('s/000000/000002.npz', 'rb').read() == before


def test_manifest_seeds_are_ranges(in_tmp):
    assert run(sample.main, PLAIN + ['--seeds=0-2', '--outdir=s'])[0] == 0
    m = json.load(open('s/manifest.json'))
    json.dump(dict(m, asked='0-99999999'), open('s/manifest.json', 'w'))
    assert run(fid.main, ['toydata', '--dest=data', '--num=8', '--no-progress'])[0] == 0
    assert run(fid.main, ['ref', '--data=data', '--dest=ref.npz'] + PIXEL)[0] == 0
    t0 = time.time()
    code, out = run(fid.main, ['calc', '--images=s', '--ref=ref.npz'] + PIXEL)
    assert code == 0 and '3 of the 100000000 seeds' in out, out
    code, out = run(sample.main, PLAIN + ['--seeds=3', '--outdir=s'])
    assert code == 0 and json.load(open('s/manifest.json'))['asked'] == '0-99999999'
    assert time.time() - t0 < 30


# ----------------------------------------------------------------------------
# 4. Full disk, file-size limit.

def test_file_size_limit_gives_one_line_and_a_consistent_folder(in_tmp):
    result = cli('sample.py', PLAIN + ['--seeds=0-7', '--outdir=s'], in_tmp, limit=1024)   # PNGs ~2 kB, manifest <1 kB
    line = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 1 and 'Traceback' not in result.stdout + result.stderr, result.stdout + result.stderr
    assert 'cannot write s/000000/000000.png: File too large' in line and 'continue with' in line
    m = manifest.read_manifest('s')
    assert m['seeds'] == '' and png_seeds('s') == [] and manifest.temporary_files('s') == []
    result = cli('train.py', TRAIN + ['--total_kimg=0.016', '--snap=0.008'], in_tmp, limit=8192)
    line = one_error(result)
    assert 'network-snapshot-000000.pt: File too large' in line and '--resume=' in line
    run_dir = os.path.join('exps', os.listdir('exps')[0])
    assert experiments.read_run_options(run_dir)['complete'] is False


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('mount') is None, reason='mounting a tmpfs needs root')
def test_full_disk(in_tmp):
    os.makedirs('small')
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', 'small'], capture_output=True).returncode:
        pytest.skip('this machine does not let us mount a tmpfs')
    try:
        result = cli('sample.py', PLAIN + ['--seeds=0-99', '--outdir=small/s'], in_tmp)
        line = result.stdout.strip().splitlines()[-1]
        assert result.returncode == 1 and 'No space left on device' in line and '--resume' in line, result.stdout
        written = manifest.manifest_seeds(manifest.read_manifest('small/s'))    # it may lag behind on a full disk
        assert set(written) <= set(png_seeds('small/s')) and manifest.temporary_files('small/s') == []
    finally:
        subprocess.run(['umount', 'small'])


# ----------------------------------------------------------------------------
# 5, 6. Bounded inputs; values that are well-formed but corrupt.

def test_bounded_and_corrupt_training_inputs(in_tmp):
    assert 'num_steps' in error_line(*run(sample.main, PLAIN[:2] + ['--num_steps=1000000000', '--outdir=s']))
    assert run(train.main, TRAIN + ['--total_kimg=0.008', '--outdir=exps'])[0] == 0
    run_dir = os.path.join('exps', os.listdir('exps')[0])
    snap = os.path.join(run_dir, 'network-snapshot-000000.pt')
    data = torch.load(snap, weights_only=True)
    for key, value in (('num_steps', 10 ** 9), ('afs', 'no')):
        torch.save(dict(data, settings=dict(data['settings'], **{key: value})), 'bad.pt')
        line = error_line(*run(sample.main, ['--predictor_path=bad.pt', '--outdir=s', '--no-progress']))
        assert key in line and 'bad.pt' in line
    # A string lr in the stored options; a training state of another run.
    options = experiments.read_run_options(run_dir)
    experiments.write_run_options(run_dir, dict(options, lr='0.01', complete=False))
    line = error_line(*run(train.main, [f'--resume={run_dir}']))
    assert 'training_options.json' in line and 'lr' in line
    experiments.write_run_options(run_dir, dict(options, complete=False))
    save_training_state(os.path.join(run_dir, 'training-state.pt'),
                        dict(identity=experiments.run_identity(dict(options, seed=7))))
    line = error_line(*run(train.main, [f'--resume={run_dir}']))
    assert 'belongs to another run' in line and 'seed' in line
    # An ./exps symlink loop.
    os.makedirs('loop')
    os.symlink('exps', 'loop/exps')
    os.chdir('loop')
    for cmd, args in ((train.main, TRAIN), (sample.main, ['--predictor_path=0'])):
        assert 'symbolic link' in error_line(*run(cmd, args))


def test_reference_sigma_must_be_a_covariance(in_tmp):
    assert run(fid.main, ['toydata', '--dest=data', '--num=8', '--no-progress'])[0] == 0
    assert run(fid.main, ['ref', '--data=data', '--dest=ref.npz'] + PIXEL)[0] == 0
    ref = dict(np.load('ref.npz'))
    skew = ref['sigma'].copy()
    skew[0, 1] += 1.0
    for name, sigma in (('minus_identity', -np.eye(len(ref['mu']))), ('skew', skew)):
        np.savez(f'{name}.npz', **dict(ref, sigma=sigma))
        code, out = run(fid.main, ['calc', '--images=data', f'--ref={name}.npz'] + PIXEL)
        assert code != 0 and 'not a covariance' in out, out
    assert len(open('data/metrics.jsonl').read().splitlines()) == 0 if os.path.exists('data/metrics.jsonl') else True


def test_corrupt_cards_and_card_export_checks(in_tmp):
    assert run(train.main, TRAIN + ['--total_kimg=0.008', '--sampler_stu=ipndm', '--sampler_tea=ipndm'])[0] == 0
    export = ['export', '--predictor_path=0']
    assert run(card.main, export + ['--out=card.json', '--seeds=0-3'])[0] == 0
    good = json.load(open('card.json'))
    n = len(good['r'])
    nan_sigmas = list(good['sigmas'])
    nan_sigmas[-1] = float('nan')
    for field, value in (('scale_dir', [0.0] * n), ('scale_time', [-1.0] * n), ('sigmas', nan_sigmas),
                         ('model', None), ('schedule', [])):
        with open('bad.json', 'w') as f:
            json.dump(dict(good, **{field: value}), f)
        assert field in error_line(*run(sample.main, ['--card=bad.json', '--outdir=s', '--no-progress']))
    assert not os.path.exists('s')
    if not torch.cuda.is_available():
        assert 'CUDA' in error_line(*run(card.main, export + ['--out=c2.json', '--device=cuda']))
    t0 = time.time()
    line = error_line(*run(card.main, export + ['--out=card.json']))
    assert 'exists' in line and '--overwrite' in line and json.load(open('card.json')) == good
    assert 'is a folder' in error_line(*run(card.main, export + ['--out=exps']))
    assert time.time() - t0 < 20                        # refused before any calibration


# ----------------------------------------------------------------------------
# 7. Resume fidelity.

def test_stats_do_not_repeat_after_sigkill_and_resume(in_tmp):
    args = TRAIN + ['--total_kimg=0.096', '--tick=0.008', '--snap=0.032', '--afs=True']
    proc = start('train.py', args, in_tmp)

    def ticks():
        runs = os.listdir('exps') if os.path.isdir('exps') else []
        path = os.path.join('exps', runs[0], 'stats.jsonl') if runs else None
        return open(path).read().count('\n') if path and os.path.exists(path) else 0
    wait_for(lambda: ticks() >= 6, proc)                # the state was saved at tick 4
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = os.path.join('exps', os.listdir('exps')[0])
    options = experiments.read_run_options(run_dir)
    experiments.write_run_options(run_dir, dict(options, world_size=2))   # as if trained on two processes
    result = cli('train.py', [f'--resume={run_dir}'], in_tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'bit-for-bit equality' in result.stdout
    lines = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    ticks = [line for line in lines if 'Progress/tick' in line]   # the final check writes a record of its own
    assert [line['Progress/tick']['mean'] for line in ticks] == list(range(1, 13))
    assert len(lines) == len(ticks) + 1


@pytest.mark.parametrize('reader,name', [
    (lambda p: manifest.read_manifest(str(p)), 'manifest.json'),
    (lambda p: experiments.read_run_options(str(p.parent)), 'training_options.json'),
    (lambda p: card.load_card(str(p)), 'card.json'),
    (lambda p: generate.parse_t_steps(str(p)), 'steps.json'),
])
def test_oversized_settings_files_are_refused_unread(tmp_path, reader, name):
    """Class 5: a settings file (manifest, training options, solver card, schedule) larger than any
    of ours can be is refused in one line naming the file and its size, before it is parsed. The
    file here is valid JSON padded with spaces, which the parsers would otherwise read whole."""
    from dnnlib.util import MAX_SETTINGS_BYTES
    path = tmp_path / name
    with open(path, 'w') as f:
        f.write('{"t_steps": [80, 1, 0.002]' + ' ' * MAX_SETTINGS_BYTES + '}')
    with pytest.raises(ValueError, match=r'bytes, more than the \d+ a .* can need') as info:
        reader(path)
    assert str(path) in str(info.value) and '\n' not in str(info.value)
