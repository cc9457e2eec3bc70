"""Training loop of the AMED predictor (REFERENCE.md section 5, with its bugs fixed).

Per global batch of ``batch`` trajectories (:func:`train_batch`):

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
"""

import contextlib
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from torch_utils import distributed as dist
from torch_utils.misc import StackedRandomGenerator
from training.networks import AMEDPredictor
from training.snapshot import save_snapshot


def sample_seeds(seed, batch_idx, batch):
    """Per-sample seeds of global batch ``batch_idx``: independent of how the batch is split."""
    state = np.random.SeedSequence([int(seed), int(batch_idx)]).generate_state(batch, dtype=np.uint32)
    return [int(s) for s in state]


def draw_inputs(model, seeds, device):
    """Unit-variance latents and conditioning for the given per-sample seeds."""
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *model.img_shape])
    cond = model.sample_cond(rnd, len(seeds), training=True)
    return latents, cond


class StatsCollector:
    """Accumulates scalar statistics between ticks (summed across ranks on report)."""

    def __init__(self):
        self.values = {}

    def add(self, name, tensor):
        """Accumulate count, sum and sum of squares on the tensor's device (no host sync per step)."""
        t = tensor.detach().double().flatten()
        acc = self.values.setdefault(name, torch.zeros(3, dtype=torch.float64, device=t.device))
        acc[0] += t.numel()
        acc[1] += t.sum()
        acc[2] += t.square().sum()

    def report(self):
        out = {}
        for name in sorted(self.values):
            acc = dist.all_reduce_sum(self.values[name].clone())
            num, s, sq = acc.cpu().tolist()
            mean = s / max(num, 1)
            out[name] = dict(num=num, mean=mean, std=float(np.sqrt(max(sq / max(num, 1) - mean ** 2, 0.0))))
        self.values = {}
        return out


def sanitize_gradients(module):
    """Replace NaN/inf gradients in place (NaN -> 0, +-inf -> +-1e5), as the official code."""
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


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
        latents, cond = draw_inputs(loss_fn.model, seeds[lo:lo + batch_gpu], device)
        rounds_data.append(dict(cond=cond, targets=loss_fn.teacher_targets(latents, cond), state=None))
    return rounds_data


def _add_step_stats(stats, loss, infos):
    stats.add('Loss/loss', loss)
    stats.add('Loss/l2', loss.sqrt())
    for info in infos:
        stats.add('Pred/r', info.r)
        stats.add('Pred/scale_dir', info.scale_dir)
        stats.add('Pred/scale_time', info.scale_time)


def _interval_batch(loss_fn, ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats):
    """The official loss: N-1 Adam steps, one per student interval."""
    rounds = len(rounds_data)
    for k in range(loss_fn.num_steps - 1):
        optimizer.zero_grad(set_to_none=True)
        for g, data in enumerate(rounds_data):
            sync = contextlib.nullcontext() if (g == rounds - 1 or ddp is predictor) else ddp.no_sync()
            with sync:
                state = loss_fn.start_state(data['targets'], k, data['state'])
                loss, new_state, info = loss_fn(ddp, state, data['targets'][k + 1], data['cond'])
                loss.sum().mul(1 / batch_gpu_total).backward()
            data['state'] = new_state.detach()
            _add_step_stats(stats, loss, [info])
        sanitize_gradients(predictor)
        optimizer.step()


def _trajectory_batch(loss_fn, predictor, optimizer, rounds_data, batch_gpu_total, stats, inter_weight,
                      checkpointing):
    """The trajectory loss: one backward pass per round through the whole student run, gradients
    averaged over the global batch (summed over ranks here, not by DDP: the predictor is called
    N-1 times before one backward pass), one Adam step."""
    optimizer.zero_grad(set_to_none=True)
    for data in rounds_data:
        loss, infos = loss_fn.trajectory(predictor, data['targets'], data['cond'], inter_weight,
                                         checkpointing=checkpointing)
        loss.sum().mul(1 / (batch_gpu_total * dist.get_world_size())).backward()
        _add_step_stats(stats, loss, infos)
    if dist.get_world_size() > 1:
        for p in predictor.parameters():
            if p.grad is not None:
                dist.all_reduce_sum(p.grad)
    sanitize_gradients(predictor)
    optimizer.step()


def train_batch(loss_fn, ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats, loss='interval',
                inter_weight=0.0, checkpointing=False):
    """One global batch of training with the chosen ``loss`` (see the module docstring)."""
    if loss == 'trajectory':
        _trajectory_batch(loss_fn, predictor, optimizer, rounds_data, batch_gpu_total, stats, inter_weight,
                          checkpointing)
    else:
        _interval_batch(loss_fn, ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats)


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
        predictor = AMEDPredictor(**predictor_kwargs)
    if init_state is not None:
        predictor.load_state_dict(init_state)
    return predictor.to(device).train()


def training_loop(model, run_dir, loss_fn, predictor_kwargs, settings, batch=64, batch_gpu=None,
                  total_kimg=10.0, lr=5e-3, seed=0, device=torch.device('cpu'), tick_kimg=1.0,
                  progress=True, log=_console, init_state=None, loss='interval', inter_weight=0.0,
                  checkpointing=False):
    """Train an AMED predictor with ``loss_fn`` (a :class:`training.loss.AMEDLoss` for the frozen
    ``model``) and write snapshots and stats to ``run_dir`` (rank 0). ``loss`` is 'interval' (the
    official per-interval loss) or 'trajectory' (see training/loss.py; ``inter_weight`` and
    ``checkpointing`` are its options). ``log(msg, console=True)`` receives every tick line (for
    log.txt); ``init_state`` is an optional predictor state dict to start from.
    Returns the trained predictor (unwrapped, eval mode) and the snapshot path (rank 0; None elsewhere)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batch_gpu_total, batch_gpu, rounds = split_batch(batch, batch_gpu, world)

    predictor = build_predictor(predictor_kwargs, seed, init_state, device)
    ddp = predictor
    if world > 1 and loss == 'interval':
        ddp = torch.nn.parallel.DistributedDataParallel(
            predictor, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)

    total_nimg = int(round(total_kimg * 1000))
    num_batches = max(1, -(-total_nimg // batch))
    stats = StatsCollector()
    stats_file = open(os.path.join(run_dir, 'stats.jsonl'), 'at') if rank == 0 else None
    start = tick_start = time.time()
    cur_nimg, next_tick, tick = 0, tick_kimg * 1000, 0
    bar = tqdm(total=num_batches * batch, unit='traj', disable=not (progress and rank == 0), dynamic_ncols=True)
    try:
        for batch_idx in range(num_batches):
            rounds_data = draw_batch(loss_fn, sample_seeds(seed, batch_idx, batch), rank, batch_gpu_total,
                                     batch_gpu, rounds, device)
            train_batch(loss_fn, ddp, predictor, optimizer, rounds_data, batch_gpu_total, stats, loss, inter_weight,
                        checkpointing)
            cur_nimg += batch
            bar.update(batch)
            if cur_nimg >= next_tick or batch_idx == num_batches - 1:
                tick += 1
                next_tick += tick_kimg * 1000
                now = time.time()
                report = stats.report()
                report['Progress/tick'] = dict(num=1, mean=tick, std=0.0)
                report['Progress/kimg'] = dict(num=1, mean=cur_nimg / 1000, std=0.0)
                report['Timing/total_sec'] = dict(num=1, mean=now - start, std=0.0)
                report['Timing/sec_per_tick'] = dict(num=1, mean=now - tick_start, std=0.0)
                tick_start = now
                if rank == 0:
                    line = tick_line(report, tick, cur_nimg, now - start)
                    if progress:
                        bar.write(line)
                    log(line, console=not progress)
                    stats_file.write(json.dumps(dict(report, timestamp=time.time())) + '\n')
                    stats_file.flush()
    finally:
        bar.close()
        if stats_file is not None:
            stats_file.close()

    path = None
    if rank == 0:
        path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pt')
        predictor.eval()
        save_snapshot(path, predictor, settings)
    dist.barrier()
    return predictor.eval().requires_grad_(False), path
