"""Training that survives interruption: periodic snapshots, SIGINT/SIGTERM (real signals to a
real ``python train.py``), --resume bit for bit, the run folder's complete flag, and the NaN
guard."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sample
import train
from tests.test_train_sample import TINY, in_tmp, run_cli  # noqa: F401 (in_tmp: a fixture)
from training import training_loop
from predictors import load_predictor
from predictors.snapshot import load_snapshot
from torch_utils import locks
from training.state import STATE_FILE, load_training_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 12 batches of 8, a stats line after each; --snap=0.032: a snapshot every 4 batches.
RUN = ['--dataset_name=toy', '--batch=8', '--total_kimg=0.096', '--num_steps=3', '--no-progress', '--tick=0.008',
       '--snap=0.032', '--afs=True']
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
TORCHRUN = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def train_process(args, cwd, launcher=()):
    return subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, 'train.py'), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def runs_in(outdir):
    """The run folders in ``outdir`` (the folder's lock file exists while a run reserves its number)."""
    return [name for name in os.listdir(outdir) if name != locks.FOLDER_LOCK]


def only_run(outdir):
    runs = runs_in(outdir)
    assert len(runs) == 1, runs
    return os.path.join(outdir, runs[0])


def stats_lines(run_dir):
    path = os.path.join(run_dir, 'stats.jsonl')
    return open(path).read().count('\n') if os.path.exists(path) else 0


def interrupt_after(proc, outdir, batches, signum, timeout=120):
    """Send ``signum`` once the run's stats show ``batches`` batches done (one line per batch)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(outdir) and runs_in(outdir) and stats_lines(only_run(outdir)) >= batches:
            proc.send_signal(signum)
            return
        time.sleep(0.02)
    raise AssertionError(f'the run ended or stalled before {batches} batches: {finish(proc)}')


def options_of(run_dir):
    return json.load(open(os.path.join(run_dir, 'training_options.json')))


def final_state(run_dir):
    predictor = load_predictor(run_dir).predictor
    return predictor.state_dict()


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The reference: the same run without interruption (a subprocess, as the others)."""
    cwd = tmp_path_factory.mktemp('reference')
    code, out = finish(train_process(RUN + ['--outdir=exps'], cwd))
    assert code == 0, out
    run_dir = only_run(os.path.join(cwd, 'exps'))
    return run_dir, final_state(run_dir), [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_interrupt_and_resume_equal_uninterrupted_run(tmp_path, uninterrupted, signum):
    ref_dir, ref_state, ref_stats = uninterrupted
    assert options_of(ref_dir)['complete'] is True and not os.path.exists(os.path.join(ref_dir, STATE_FILE))

    proc = train_process(RUN + ['--outdir=exps'], tmp_path)
    interrupt_after(proc, tmp_path / 'exps', 2, signum)
    code, out = finish(proc)
    run_dir = only_run(tmp_path / 'exps')
    assert code == 128 + signum, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f'{signal.Signals(signum).name}: stopped at ') and f'--resume={run_dir}'[-30:] in last, out
    assert 'Traceback' not in out

    # The partial snapshot, the training state and the incomplete run folder.
    opts = options_of(run_dir)
    done = load_training_state(os.path.join(run_dir, STATE_FILE))['position']['batch_idx']
    assert 2 <= done < 12 and opts['complete'] is False and opts['kimg'] == done * 8 / 1000
    snap = os.path.join(run_dir, 'network-snapshot-000000.pt')
    data = torch.load(snap, weights_only=True)
    assert data['progress'] == dict(kimg=done * 8 / 1000, total_kimg=0.096, partial=True)
    with pytest.raises(ValueError, match='is incomplete .* resume it with train.py --resume='):
        load_predictor(run_dir)
    load_snapshot(snap)   # the file itself, given explicitly, loads

    code, out = finish(train_process(['--resume=' + str(run_dir)], tmp_path))
    assert code == 0, out
    assert os.listdir(tmp_path / 'exps') == [os.path.basename(run_dir)]     # the same folder, no new one
    assert options_of(run_dir)['complete'] is True and not os.path.exists(os.path.join(run_dir, STATE_FILE))
    assert torch.load(snap, weights_only=True)['progress']['partial'] is False
    assert_equal_states(final_state(run_dir), ref_state)
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    strip = ('Timing/total_sec', 'Timing/sec_per_tick', 'Timing/check_sec', 'timestamp')
    assert [{k: v for k, v in s.items() if k not in strip} for s in stats] == \
        [{k: v for k, v in s.items() if k not in strip} for s in ref_stats]


def test_torchrun_stops_all_ranks_at_one_batch(tmp_path, uninterrupted):
    """SIGTERM to torchrun (which passes it to both workers): the ranks agree on the batch to stop
    at, rank 0 saves, and the run resumes under plain python (one process: equal up to rounding)."""
    proc = train_process(RUN + ['--outdir=exps', '--device=cpu'], tmp_path, launcher=TORCHRUN)
    interrupt_after(proc, tmp_path / 'exps', 2, signal.SIGTERM)
    code, out = finish(proc)
    run_dir = only_run(tmp_path / 'exps')
    assert code != 0 and out.count('SIGTERM: stopped at ') == 1 and '[rank1]: Traceback' not in out, out
    assert 'SIGTERM: stopped at ' in open(os.path.join(run_dir, 'log.txt')).read()
    assert os.path.exists(os.path.join(run_dir, STATE_FILE)) and options_of(run_dir)['complete'] is False

    code, out = finish(train_process(['--resume=' + str(run_dir)], tmp_path))
    assert code == 0, out
    state = final_state(run_dir)
    for k, v in uninterrupted[1].items():
        assert torch.allclose(state[k], v, rtol=1e-4, atol=1e-6), k


def test_resume_rules_and_incomplete_runs(in_tmp):
    code, out = run_cli(train.main, TINY + ['--outdir=exps'])
    assert code == 0, out
    run_dir = only_run('exps')
    reference = final_state(run_dir)
    cases = [
        (['--resume=0'], 'is complete: nothing to resume'),
        (['--resume=0', '--lr=1', '--batch=4'], "--resume takes the run's stored options; remove --batch, --lr"),
        (['--resume=3'], 'experiment 3 not found'),
        (['--resume=nope'], 'run folder not found: nope'),
        (['--batch=8'], "Missing option '--dataset_name' (or --resume a run)"),
    ]
    for args, message in cases:
        code, out = run_cli(train.main, args)
        assert code != 0 and out.startswith('Error: ') and message in out and len(out.splitlines()) == 1, (args, out)
    assert os.listdir('exps') == [os.path.basename(run_dir)]

    # A run stopped before its first snapshot: incomplete, no training state. --predictor_path refuses
    # it (one line); --resume starts it over in its folder and ends as the uninterrupted run.
    os.remove(os.path.join(run_dir, 'network-snapshot-000000.pt'))
    opts = options_of(run_dir)
    json.dump(dict(opts, kimg=0, complete=False), open(os.path.join(run_dir, 'training_options.json'), 'w'))
    for cmd, args in [(sample.main, ['--seeds=0', '--outdir=s']), (train.main, TINY + ['--outdir=exps'])]:
        code, out = run_cli(cmd, args + ['--predictor_path=0'])
        assert code != 0 and out.startswith(f'Error: run {run_dir} is incomplete (0 of 0.016 kimg saved): resume it '
                                            f'with train.py --resume={run_dir}'), out
        assert len(out.strip().splitlines()) == 1, out
    open(os.path.join(run_dir, STATE_FILE), 'w').write('cut off')
    code, out = run_cli(train.main, ['--resume=0'])
    assert code != 0 and len(out.strip().splitlines()) == 1, out
    assert out.startswith(f'Error: {os.path.join(run_dir, STATE_FILE)} is not an AMED training state (a text file, not a torch file)'), out
    os.remove(os.path.join(run_dir, STATE_FILE))
    code, out = run_cli(train.main, ['--resume=0', '--dry-run'])
    assert code == 0 and 'Dry run' in out and json.loads(out[:out.rindex('}') + 1])['total_kimg'] == 0.016
    assert sorted(os.listdir(run_dir)) == ['log.txt', 'stats.jsonl', 'training_options.json']
    code, out = run_cli(train.main, ['--resume=0', '--no-progress'])
    assert code == 0 and 'Resuming at 0 kimg' in out, out
    assert os.listdir('exps') == [os.path.basename(run_dir)] and options_of(run_dir)['complete'] is True
    assert_equal_states(final_state(run_dir), reference)


def test_nan_guard_stops_without_saving(in_tmp):
    """A finite but absurd learning rate: the outputs go NaN, training stops after three such
    batches with one line, and no snapshot is saved (not even the periodic ones)."""
    code, out = run_cli(train.main, TINY + ['--outdir=exps', '--lr=1e30', '--total_kimg=0.08', '--snap=0.008'])
    run_dir = only_run('exps')
    assert code == 1, out
    assert out.strip().splitlines()[-1] == ('Error: training diverged at 0.024 kimg: the loss or the predictor outputs '
                                            'were not finite in the last 3 batches; this predictor is not saved (a '
                                            'lower --lr may help)'), out
    assert sorted(os.listdir(run_dir)) == ['log.txt', 'stats.jsonl', 'training_options.json']
    assert options_of(run_dir)['complete'] is False
    assert 'training diverged' in open(os.path.join(run_dir, 'log.txt')).read()


def test_nan_guard_non_finite_weights(in_tmp):
    """Non-finite weights (here lr=inf, called below the command line's validation) stop at once."""
    from training.launch import plan_training
    from training.training_loop import TrainingDiverged, training_loop
    plan = plan_training(dict(dataset_name='toy', num_steps=3, batch=8), torch.device('cpu'))
    o = plan['options']
    os.makedirs('run')
    with pytest.raises(TrainingDiverged, match='at 0.008 kimg: the predictor weights are not finite'):
        training_loop(plan['model'], 'run', plan['objective'], o['predictor_kwargs'], o['settings'], batch=8,
                      total_kimg=0.08, lr=float('inf'), snap_kimg=0.008, progress=False, log=lambda *a, **k: None)
    assert not [f for f in os.listdir('run') if f.endswith('.pt')]


def test_periodic_snapshots(in_tmp, monkeypatch):
    """--snap=0.016 with batches of 8: a partial snapshot and the state after batches 2 and 4, the
    final one after batch 5; training_options.json follows."""
    from predictors import experiments
    marks, snapshots = [], []
    mark_run, save_snapshot = experiments.mark_run, training_loop.save_snapshot

    def recording_mark_run(run_dir, kimg, complete):
        marks.append((kimg, complete, os.path.exists(os.path.join(run_dir, STATE_FILE))))
        mark_run(run_dir, kimg, complete)

    def recording_save_snapshot(path, predictor, settings, progress):
        snapshots.append(progress)
        save_snapshot(path, predictor, settings, progress)

    monkeypatch.setattr(experiments, 'mark_run', recording_mark_run)
    monkeypatch.setattr(training_loop, 'save_snapshot', recording_save_snapshot)
    code, out = run_cli(train.main, TINY + ['--outdir=exps', '--total_kimg=0.04', '--snap=0.016'])
    assert code == 0, out
    assert marks == [(0.016, False, True), (0.032, False, True), (0.04, True, True)]
    assert snapshots == [dict(kimg=k, total_kimg=0.04, partial=p)
                         for k, p in ((0.016, True), (0.032, True), (0.04, False))]
    run_dir = only_run('exps')
    assert options_of(run_dir)['complete'] is True and not os.path.exists(os.path.join(run_dir, STATE_FILE))
