"""Multi-process helpers: one code path for `torchrun` and for plain `python`.

Under `torchrun` (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
set) `init()` creates a `torch.distributed` process group from the
environment: NCCL when this rank runs on CUDA, gloo on CPU.

Under plain `python` (no WORLD_SIZE in the environment) `init()` creates NO
process group: every helper then behaves as world size 1, rank 0 (collectives
are identities, `barrier()` returns at once). This keeps single-process runs
free of ports, sockets and timeouts. `torchrun --nproc_per_node=1` still gets
a real 1-process group, as any torchrun launch does.

Typical use::

    from torch_utils import distributed as dist
    device = dist.init()                       # or init('cpu') / init('cuda')
    for batch_seeds in dist.rank_seeds(seeds, batch_size):
        if len(batch_seeds) == 0:
            continue
        ...
    dist.barrier()
    dist.shutdown()
"""

import os
import sys

import torch
import torch.distributed as tdist

_device = None          # torch.device chosen by init(); None before init()
_created_group = False  # True when init() created the process group itself
_group_threads = False  # True once a process group ran here: its backend threads may outlive it


# ----------------------------------------------------------------------------
# Set-up and tear-down.

def _launched():
    """True when the environment describes a torchrun (env://) launch."""
    return 'WORLD_SIZE' in os.environ


def _resolve_device_type(device):
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type not in ('cpu', 'cuda'):
        raise ValueError(f"init(device={device!r}): device must be 'cpu', 'cuda' or None")
    if dev.index is not None:
        raise ValueError(f"init(device={device!r}): give 'cuda' without an index; "
                         "the rank's GPU is chosen from LOCAL_RANK")
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f"init(device={device!r}): CUDA is not available "
                           f"(torch {torch.__version__}, cuda {torch.version.cuda}); use device='cpu'")
    return dev.type


def init(device=None):
    """Set up this process for (possibly) multi-process work.

    Args:
        device: 'cpu', 'cuda' or None (auto: 'cuda' if available, else 'cpu').

    Returns:
        The `torch.device` this rank should use: `cuda:LOCAL_RANK` on CUDA under
        torchrun (also made the current CUDA device), `cuda:0` on CUDA without
        torchrun, `cpu` on CPU.

    Idempotent: a second call returns the same device; asking for a different
    device type than the first call raises RuntimeError.
    """
    global _device, _created_group, _group_threads
    if _device is not None:
        if device is not None and _resolve_device_type(device) != _device.type:
            raise RuntimeError(f"init(device={device!r}): already initialised on {_device}")
        return _device

    dev_type = _resolve_device_type(device)
    if _launched():
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun, "
                               "or unset WORLD_SIZE for a single process")
    if dev_type == 'cuda':
        if _launched():
            local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % torch.cuda.device_count()))
        else:
            local_rank = 0
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device('cuda', local_rank)
    else:
        dev = torch.device('cpu')

    if _launched() and not tdist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        tdist.init_process_group(backend=backend, init_method='env://')
        _created_group = _group_threads = True
    _device = dev
    return _device


def shutdown():
    """Destroy the process group if `init()` created one, and forget the device."""
    global _device, _created_group
    if _created_group and tdist.is_initialized():
        tdist.destroy_process_group()
    _created_group = False
    _device = None


def exit_process(code=0):
    """End the process with exit status ``code`` (an int, None for 0, or a message: printed, status 1).

    A process in which a process group ran ends without the interpreter's finalization: it flushes
    the standard streams and logging and leaves with ``os._exit``. The reason: in torch 2.13 a
    group that DistributedDataParallel used stays referenced after ``destroy_process_group``, so
    its backend's worker threads live on; one of them may release a finished collective's tensors
    while the interpreter finalizes, cannot take the GIL then, and aborts the process ("terminate
    called without an active exception", exit -6) after the work was done and saved. Other
    processes exit normally (``sys.exit``)."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    if not _group_threads:
        sys.exit(code)
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# ----------------------------------------------------------------------------
# Queries.

def _active():
    return tdist.is_available() and tdist.is_initialized()


def get_rank():
    """Global rank of this process (0 without a process group)."""
    return tdist.get_rank() if _active() else 0


def get_world_size():
    """Number of processes (1 without a process group)."""
    return tdist.get_world_size() if _active() else 1


def is_main():
    """True on rank 0."""
    return get_rank() == 0


def print0(*args, **kwargs):
    """`print` on rank 0 only; also after :func:`shutdown`, by torchrun's RANK variable."""
    if is_main() and (_active() or os.environ.get('RANK', '0') == '0'):
        print(*args, **kwargs)


# ----------------------------------------------------------------------------
# Collectives. All are no-ops for world size 1.

def _comm_device():
    """Device that collective tensors must live on for the active backend."""
    if tdist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return None


def _collective(tensor, op):
    dev = _comm_device()
    if dev is None or tensor.device == dev:
        op(tensor)
        return tensor
    tmp = tensor.to(dev)
    op(tmp)
    tensor.copy_(tmp)
    return tensor


def all_reduce_sum(tensor):
    """Sum `tensor` over all ranks, in place; returns `tensor`.

    A CPU tensor under NCCL is reduced through a temporary copy on this rank's GPU.
    """
    if get_world_size() == 1:
        return tensor
    return _collective(tensor, lambda t: tdist.all_reduce(t, op=tdist.ReduceOp.SUM))


def broadcast(tensor, src=0):
    """Copy `tensor` from rank `src` to all ranks, in place; returns `tensor`."""
    if get_world_size() == 1:
        return tensor
    return _collective(tensor, lambda t: tdist.broadcast(t, src=src))


def gather_objects(obj):
    """Gather one picklable object per rank on rank 0: returns the list (rank order) on rank 0
    and None elsewhere; ``[obj]`` for world size 1."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if is_main() else None
    tdist.gather_object(obj, out, dst=0)
    return out


def raise_on_any(err, exc_type=ValueError):
    """Raise ``exc_type(message)`` on every rank when ``err`` (a one-line message or None) is set
    on any rank; the first rank's message wins. One small all-reduce per call (the messages travel
    only when something failed); for world size 1 simply raises when ``err`` is set."""
    if get_world_size() == 1:
        if err:
            raise exc_type(err)
        return
    flag = torch.tensor([1.0 if err else 0.0], dtype=torch.float64)
    if float(all_reduce_sum(flag)[0]) == 0:
        return
    messages = [None] * get_world_size()
    tdist.all_gather_object(messages, err)
    raise exc_type(next(m for m in messages if m))


def barrier():
    """Wait for all ranks (returns at once for world size 1)."""
    if get_world_size() == 1:
        return
    if tdist.get_backend() == 'nccl':
        tdist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        tdist.barrier()


# ----------------------------------------------------------------------------
# Work splitting.

def rank_seeds(seeds, batch_size, rank=None, world_size=None):
    """Split `seeds` into this rank's batches, as EDM's generate.py does.

    The seeds are cut into `num_batches = ceil(len / (batch_size * world)) * world`
    nearly equal consecutive chunks (`tensor_split`), and rank r takes chunks
    r, r + world, r + 2 world, ... Every rank gets the same number of batches, so
    ranks stay in step at collectives; some batches may be empty (callers skip
    them). The union over ranks is all seeds, each exactly once.

    Args:
        seeds: sequence (list, range, 1-D tensor) of integer seeds.
        batch_size: maximum seeds per batch on one rank.
        rank, world_size: override the current process's values (for tests).

    Returns:
        List of 1-D int64 tensors.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f'rank {rank} is outside world size {world}')
    seeds = seeds if isinstance(seeds, torch.Tensor) else list(seeds)
    all_seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    if all_seeds.numel() == 0:
        return []
    num_batches = ((all_seeds.numel() - 1) // (batch_size * world) + 1) * world
    return list(all_seeds.tensor_split(num_batches)[rank::world])
