"""Training loop of the AMED predictor (as the official code's, with its bugs fixed).

Per global batch of ``batch`` trajectories (:func:`draw_batch`, then the loss's ``train_batch``,
:mod:`training.loss`):

1. every accumulation round of every rank draws its own latents (and labels) from per-sample
   generators, so the data do not depend on ``batch_gpu`` or the number of processes;
2. the teacher solves each round's trajectories (no gradients);
3. ``interval`` loss (official): for each student interval k = 0 .. N-2, one student step per
   round through :func:`solvers.step` (the sampling code), per-sample squared L2 loss to the
   teacher point, gradients summed over rounds and averaged over the global batch (DDP averages
   over ranks), NaN/inf gradients replaced as the official code does, one Adam step. Single-step
   students restart each interval from the teacher point; multistep students carry their own
   state. ``trajectory`` loss: the whole student run per round, one backward pass per round, the
   gradients averaged over the global batch and the ranks, one Adam step per batch.

After each batch one collective decides for all ranks: stop on SIGINT/SIGTERM (snapshot and
training state saved, :class:`TrainingInterrupted`), or on non-finite values
(:class:`TrainingDiverged`, nothing saved). The data of batch ``i`` derive from ``(seed, i)``
only, so a run resumed from its state equals an uninterrupted one.
"""

import json
import os
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

from torch_utils import distributed as dist
from models.base import seeded_inputs
from torch_utils.stopping import StopSignals, write_error
from predictors import experiments
from predictors.networks import build_predictor as build_module
from predictors.snapshot import save_snapshot
from training import check
from training.state import STATE_FILE, save_training_state

#: Consecutive batches with a non-finite loss or predictor output after which training stops (a
#: single one is tolerated: its gradients are sanitised, as in the official code).
PATIENCE = 3


def sample_seeds(seed, batch_idx, batch):
    """Per-sample seeds of global batch ``batch_idx``: independent of how the batch is split."""
    state = np.random.SeedSequence([int(seed), int(batch_idx)]).generate_state(batch, dtype=np.uint32)
    return [int(s) for s in state]


class StatsCollector:
    """Accumulates scalar statistics between ticks (summed across ranks on report)."""

    def __init__(self):
        self.values = {}
        self.finite = None      # 0-d bool tensor: every value added since take_finite() was finite

    def add(self, name, tensor):
        """Accumulate count, sum and sum of squares on the tensor's device (no host sync per step)."""
        t = tensor.detach().double().flatten()
        acc = self.values.setdefault(name, torch.zeros(3, dtype=torch.float64, device=t.device))
        acc[0] += t.numel()
        acc[1] += t.sum()
        acc[2] += t.square().sum()
        finite = torch.isfinite(t).all()
        self.finite = finite if self.finite is None else self.finite & finite

    def take_finite(self):
        """Whether every value added since the last call was finite (one host sync)."""
        finite = self.finite is None or bool(self.finite)
        self.finite = None
        return finite

    def report(self):
        out = {}
        for name in sorted(self.values):
            acc = dist.all_reduce_sum(self.values[name].clone())
            num, s, sq = acc.cpu().tolist()
            mean = s / max(num, 1)
            out[name] = dict(num=num, mean=mean, std=float(np.sqrt(max(sq / max(num, 1) - mean ** 2, 0.0))))
        self.values = {}
        return out


def split_batch(batch, batch_gpu, world):
    """(trajectories per process, per round, rounds); ValueError when the batch does not split evenly."""
    if batch % world != 0:
        raise ValueError(f'batch ({batch}) must be divisible by the number of processes ({world})')
    batch_gpu_total = batch // world
    batch_gpu = min(batch_gpu or batch_gpu_total, batch_gpu_total)
    if batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'batch per process ({batch_gpu_total}) must be a multiple of --batch-gpu ({batch_gpu})')
    return batch_gpu_total, batch_gpu, batch_gpu_total // batch_gpu


def _console(msg, console=True):
    if console:
        print(msg)


def draw_batch(loss_fn, seeds, rank, batch_gpu_total, batch_gpu, rounds, device):
    """This rank's accumulation rounds of one global batch: conditioning and teacher targets."""
    rounds_data = []
    for g in range(rounds):
        lo = rank * batch_gpu_total + g * batch_gpu
        latents, cond = seeded_inputs(loss_fn.model, seeds[lo:lo + batch_gpu], device, training=True)
        rounds_data.append(dict(cond=cond, targets=loss_fn.teacher_targets(latents, cond), state=None))
    return rounds_data


def tick_line(report, tick, cur_nimg, elapsed):
    """The console/log line of one tick."""
    return (f"tick {tick:<4d} kimg {cur_nimg / 1000:<8.3f} time {elapsed:<7.1f} "
            f"loss {report['Loss/loss']['mean']:<10.4g} l2 {report['Loss/l2']['mean']:<9.4g} "
            f"r {report['Pred/r']['mean']:.3f}+-{report['Pred/r']['std']:.3f} "
            f"scale_dir {report['Pred/scale_dir']['mean']:.4f}+-{report['Pred/scale_dir']['std']:.4f} "
            f"scale_time {report['Pred/scale_time']['mean']:.4f}+-{report['Pred/scale_time']['std']:.4f}")


def build_predictor(predictor_kwargs, seed, init_state, device):
    """The initial predictor: the same weights on every rank for a given seed (drawn from a forked
    random state, so the caller's global RNG is left as it was), or ``init_state``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = build_module(predictor_kwargs)
    if init_state is not None:
        predictor.load_state_dict(init_state)
    return predictor.to(device).train()


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a whole batch; the partial snapshot and the
    training state are saved (``signum``: the signal)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class TrainingFailed(RuntimeError):
    """A file of the run could not be written (one line naming it, the cause and how to resume)."""


def truncate_lines(path, lines):
    """Keep the first ``lines`` lines of the text file ``path`` (if it exists and has more)."""
    if not os.path.exists(path):
        return
    with open(path, 'rb+') as f:
        offset = 0
        for _ in range(lines):
            line = f.readline()
            if not line:
                return
            offset += len(line)
        f.truncate(offset)


class TrainingDiverged(RuntimeError):
    """The loss, the predictor outputs or the weights stopped being finite (no snapshot saved)."""


def weights_finite(predictor):
    """A 0-d bool tensor: every parameter of ``predictor`` is finite."""
    return torch.stack([torch.isfinite(p).all() for p in predictor.parameters()]).all()


def agree(signum, outputs_finite, weights_ok):
    """One collective per batch, so that every rank takes the same decision at the same batch:
    (signal to stop on (0: none), all ranks' outputs finite, all ranks' weights finite)."""
    flags = torch.tensor([signum > 0, signum, not outputs_finite, not bool(weights_ok)], dtype=torch.int64)
    stopping, signals, bad_outputs, bad_weights = dist.all_reduce_sum(flags).tolist()
    return (signum or signals // max(stopping, 1)), bad_outputs == 0, bad_weights == 0


def run_check(loss_fn, predictor, seed, num_batches, batch, num, device, batch_gpu, run_dir, log):
    """The end-of-training check (:mod:`training.check`) on ``num`` held-out trajectories, disjoint
    from the ``num_batches`` batches of training seed ``seed``: logged, appended to stats.jsonl
    (with its time) and returned for the snapshot's settings."""
    t0 = time.time()
    trained = (s for b in range(num_batches) for s in sample_seeds(seed, b, batch))
    seeds = check.held_out_seeds(seed, num, exclude=trained)
    result = check.check_predictor(loss_fn, predictor.eval(), seeds, device, batch=batch_gpu)
    result['seconds'] = time.time() - t0
    log(check.check_line(result))
    with open(os.path.join(run_dir, 'stats.jsonl'), 'at') as f:
        f.write(json.dumps({'Check/ratio': dict(num=result['num'], mean=result['ratio'], std=result['ratio_se']),
                            'Check/error': dict(num=result['num'], mean=result['error'], std=0.0),
                            'Check/base_error': dict(num=result['num'], mean=result['base_error'], std=0.0),
                            'Timing/check_sec': dict(num=1, mean=result['seconds'], std=0.0),
                            'timestamp': time.time()}) + '\n')
    return result


def snapshot_name(cur_nimg):
    return f'network-snapshot-{cur_nimg // 1000:06d}.pt'


def training_loop(model, run_dir, objective, predictor_kwargs, settings, batch=64, batch_gpu=None,
                  total_kimg=10.0, lr=5e-3, seed=0, device=torch.device('cpu'), tick_kimg=1.0, snap_kimg=0.0,
                  progress=True, log=_console, init_state=None, resume=None, identity=None, check_num=0):
    """Train an AMED predictor with ``objective`` (a :class:`training.loss.Loss`, e.g.
    :class:`~training.loss.IntervalLoss`, over the :class:`training.loss.AMEDLoss` of the frozen
    ``model``: it trains one global batch) and write snapshots and stats to ``run_dir`` (rank 0).
    ``identity`` (the run's, :func:`predictors.experiments.run_identity`) is stored in the training
    state so that a state from another run is refused. ``log(msg, console=True)`` receives every tick line (for
    log.txt); ``init_state`` is an optional predictor state dict to start from.

    Every ``snap_kimg`` (0: never) and on SIGINT/SIGTERM (after the current batch) a snapshot marked
    partial and the training state (:data:`training.state.STATE_FILE`) are saved; ``resume``,
    such a state (:func:`training.state.load_training_state`), continues from it, with the
    result of an uninterrupted run. The run folder's training_options.json records the kimg saved
    and, at the end, ``complete``. A signal raises :class:`TrainingInterrupted` after saving;
    :data:`PATIENCE` consecutive batches with a non-finite loss or predictor output (or such a
    last batch), or non-finite weights, raise :class:`TrainingDiverged`; no snapshot is saved after
    a batch with non-finite values (periodic ones and a stop wait for a finite batch).
    After the last batch, rank 0 checks the predictor against its plain base solver on ``check_num``
    held-out teacher trajectories (0: no check; :mod:`training.check`): one log line, a
    ``Check/ratio`` line in stats.jsonl and ``settings['check']`` in the final snapshot.
    Returns the trained predictor (unwrapped, eval mode) and the snapshot path (rank 0; None elsewhere)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batch_gpu_total, batch_gpu, rounds = split_batch(batch, batch_gpu, world)

    predictor = build_predictor(predictor_kwargs, seed, resume['predictor'] if resume else init_state, device)
    ddp = predictor
    loss_fn = objective.problem
    if world > 1 and objective.ddp:
        ddp = torch.nn.parallel.DistributedDataParallel(
            predictor, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)

    total_nimg = int(round(total_kimg * 1000))
    num_batches = max(1, -(-total_nimg // batch))
    stats = StatsCollector()
    # Where the loop stands: all a resumed run needs besides the predictor, Adam and the stats.
    pos = dict(batch_idx=0, cur_nimg=0, tick=0, next_tick=tick_kimg * 1000, next_snap=snap_kimg * 1000,
               elapsed=0.0, nonfinite=0)
    if resume:
        optimizer.load_state_dict(resume['optimizer'])
        stats.values = {k: v.to(device) for k, v in resume['stats'].items()}
        pos.update(resume['position'])

    def save(partial):
        """Rank 0: the snapshot, and the state when ``partial``; training_options.json says so.
        Returns the snapshot's path."""
        kimg = pos['cur_nimg'] / 1000
        path = os.path.join(run_dir, snapshot_name(pos['cur_nimg']))
        save_snapshot(path, predictor, settings, progress=dict(kimg=kimg, total_kimg=total_kimg, partial=partial))
        state_path = os.path.join(run_dir, STATE_FILE)
        if partial:
            save_training_state(state_path, dict(
                position=dict(pos, elapsed=time.time() - start), predictor=predictor.state_dict(),
                optimizer=optimizer.state_dict(), stats={k: v.cpu() for k, v in stats.values.items()},
                **({} if identity is None else dict(identity=identity))))
        experiments.mark_run(run_dir, kimg=kimg, complete=not partial)
        if not partial and os.path.exists(state_path):
            os.remove(state_path)
        return path

    def tick():
        """The stats of the batches since the last tick: stats.jsonl and a line for log.txt."""
        nonlocal tick_start
        pos['tick'] += 1
        pos['next_tick'] += tick_kimg * 1000
        now = time.time()
        report = stats.report()
        report['Progress/tick'] = dict(num=1, mean=pos['tick'], std=0.0)
        report['Progress/kimg'] = dict(num=1, mean=pos['cur_nimg'] / 1000, std=0.0)
        report['Timing/total_sec'] = dict(num=1, mean=now - start, std=0.0)
        report['Timing/sec_per_tick'] = dict(num=1, mean=now - tick_start, std=0.0)
        tick_start = now
        if rank == 0:
            line = tick_line(report, pos['tick'], pos['cur_nimg'], now - start)
            if progress:
                bar.write(line)
            log(line, console=not progress)
            stats_file.write(json.dumps(dict(report, timestamp=time.time())) + '\n')
            stats_file.flush()

    def writing(fn, *args, message=False):
        """``fn(*args)`` with a failed write (full disk, read-only folder, file-size limit) as
        :class:`TrainingFailed` (or, with ``message``, its message; None when it went well)."""
        try:
            result = fn(*args)
        except OSError as e:
            text = (f"{write_error(e.filename or run_dir, e)} at {pos['cur_nimg'] / 1000:g} kimg; the run folder "
                    f"keeps its last complete snapshot and state; free space, then continue with: python train.py "
                    f"--resume={run_dir}")
            if message:
                return text
            raise TrainingFailed(text) from None
        return None if message else result

    stats_file = None
    if rank == 0:
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        truncate_lines(stats_path, pos['tick'])   # the ticks after the saved state come again
        stats_file = open(stats_path, 'at')
    start = time.time() - pos['elapsed']
    tick_start = time.time()
    bar = tqdm(total=num_batches * batch, initial=pos['cur_nimg'], unit='traj', disable=not (progress and rank == 0),
               dynamic_ncols=True)
    try:
        with StopSignals() as signals:
            while pos['batch_idx'] < num_batches:
                rounds_data = draw_batch(loss_fn, sample_seeds(seed, pos['batch_idx'], batch), rank, batch_gpu_total,
                                         batch_gpu, rounds, device)
                objective.train_batch(ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats)
                pos['batch_idx'] += 1
                pos['cur_nimg'] += batch
                bar.update(batch)
                signum, outputs_ok, weights_ok = agree(signals.signum, stats.take_finite(), weights_finite(predictor))
                pos['nonfinite'] = 0 if outputs_ok else pos['nonfinite'] + 1
                last = pos['batch_idx'] == num_batches
                if not weights_ok or pos['nonfinite'] >= PATIENCE or (last and not outputs_ok):
                    n = pos['nonfinite']
                    what = 'the predictor weights are not finite' if not weights_ok else \
                        f"the loss or the predictor outputs were not finite in the last {n} batch{'es' * (n > 1)}"
                    raise TrainingDiverged(f"training diverged at {pos['cur_nimg'] / 1000:g} kimg: {what}; "
                                           f"this predictor is not saved (a lower --lr may help)")
                if pos['cur_nimg'] >= pos['next_tick'] or last:
                    writing(tick)
                # Snapshots only after a batch whose values were all finite (a stop waits for one).
                periodic = snap_kimg > 0 and pos['cur_nimg'] >= pos['next_snap'] and outputs_ok
                if periodic:
                    pos['next_snap'] += snap_kimg * 1000
                if not last and outputs_ok and (periodic or signum):
                    dist.raise_on_any(writing(save, True, message=True) if rank == 0 else None, TrainingFailed)
                    if signum:
                        raise TrainingInterrupted(
                            f"{signal.Signals(signum).name}: stopped at {pos['cur_nimg'] / 1000:g} of {total_kimg:g} "
                            f"kimg; saved the partial snapshot {snapshot_name(pos['cur_nimg'])} and {STATE_FILE}; "
                            f"continue with: python train.py --resume={run_dir}", signum)
    finally:
        bar.close()
        if stats_file is not None:
            stats_file.close()

    if rank == 0 and check_num > 0:
        settings = dict(settings, check=run_check(loss_fn, predictor, seed, num_batches, batch, check_num, device,
                                                  batch_gpu, run_dir, log))
    path = writing(save, False) if rank == 0 else None
    dist.barrier()
    return predictor.eval().requires_grad_(False), path
