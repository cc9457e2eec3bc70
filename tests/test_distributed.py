"""torch_utils.distributed: single process, and a real 2-process torchrun (gloo) run."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.torchrun import torchrun
from torch_utils import distributed as dist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                'GROUP_RANK', 'ROLE_RANK', 'ROLE_WORLD_SIZE', 'TORCHELASTIC_RUN_ID')


@pytest.fixture
def single_process(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    dist.shutdown()
    yield
    dist.shutdown()


def test_single_process_defaults(single_process):
    device = dist.init('cpu')
    assert device == torch.device('cpu')
    assert dist.init('cpu') == device  # idempotent
    assert dist.init() == device
    assert not torch.distributed.is_initialized()  # no process group without torchrun
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main()
    x = torch.tensor([1.0, 2.0, 3.0])
    assert dist.all_reduce_sum(x) is x
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert dist.broadcast(x).tolist() == [1.0, 2.0, 3.0]
    dist.barrier()


def test_single_process_works_before_init(single_process):
    assert dist.get_world_size() == 1 and dist.get_rank() == 0
    assert dist.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


def test_print0(single_process, capsys):
    dist.print0('hello', 3, sep='-')
    assert capsys.readouterr().out == 'hello-3\n'


def test_cuda_unavailable_error(single_process, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match='CUDA is not available'):
        dist.init('cuda')
    assert dist.init() == torch.device('cpu')  # auto falls back to CPU


def test_bad_device(single_process):
    with pytest.raises(ValueError):
        dist.init('mps')


def test_rank_seeds_world1(single_process):
    seeds = list(range(100, 123))
    batches = dist.rank_seeds(seeds, batch_size=5)
    assert all(len(b) <= 5 for b in batches)
    assert torch.cat(batches).tolist() == seeds
    assert dist.rank_seeds(range(3), batch_size=8)[0].tolist() == [0, 1, 2]
    assert dist.rank_seeds([], batch_size=4) == []


@pytest.mark.parametrize('num_seeds,batch_size,world', [(1, 4, 2), (10, 3, 2), (64, 16, 4), (7, 7, 3), (50, 1, 3)])
def test_rank_seeds_partition(num_seeds, batch_size, world):
    seeds = list(range(1000, 1000 + num_seeds))
    per_rank = [dist.rank_seeds(seeds, batch_size, rank=r, world_size=world) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # every rank runs the same number of batches
    flat = [s for p in per_rank for b in p for s in b.tolist()]
    assert sorted(flat) == seeds  # union is all seeds, each once
    assert all(len(b) <= batch_size for p in per_rank for b in p)
    # Interleaved order reproduces the original seed order, as in EDM's generate.py.
    interleaved = [s for i in range(len(per_rank[0])) for r in range(world) for s in per_rank[r][i].tolist()]
    assert interleaved == seeds


CHILD = textwrap.dedent('''
    import json, os, sys
    import torch
    from torch_utils import distributed as dist

    out_dir = sys.argv[1]
    device = dist.init('cpu')
    assert dist.init('cpu') == device
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
    dist.all_reduce_sum(x)
    b = torch.full((3,), float(rank + 7))
    dist.broadcast(b, src=1)
    seeds = list(range(5, 28))
    batches = [t.tolist() for t in dist.rank_seeds(seeds, batch_size=4)]
    dist.barrier()
    result = dict(rank=rank, world=world, device=str(device), backend=torch.distributed.get_backend(),
                  is_main=dist.is_main(), sum=x.tolist(), bcast=b.tolist(), batches=batches)
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    dist.print0('done on rank 0')
    dist.shutdown()
    assert not torch.distributed.is_initialized()
''')


def test_torchrun_two_processes(tmp_path):
    script = tmp_path / 'child.py'
    script.write_text(CHILD)
    proc = torchrun([str(script), str(tmp_path)], REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('done on rank 0') == 1

    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res['rank'] == r and res['world'] == 2
        assert res['device'] == 'cpu' and res['backend'] == 'gloo'
        assert res['is_main'] == (r == 0)
        assert res['sum'] == [3.0, 30.0]
        assert res['bcast'] == [8.0, 8.0, 8.0]
    seeds = list(range(5, 28))
    assert len(results[0]['batches']) == len(results[1]['batches'])
    flat = [[s for b in res['batches'] for s in b] for res in results]
    assert not set(flat[0]) & set(flat[1])  # disjoint
    assert sorted(flat[0] + flat[1]) == seeds  # union is all seeds
    assert all(len(b) <= 4 for res in results for b in res['batches'])


def test_a_launch_that_hangs_is_killed_whole(tmp_path):
    """The launch helper of the multi-process tests: past its limit, the launcher and the workers
    are stopped (none is left running on, orphaned, for the rest of the suite)."""
    script = tmp_path / 'hang.py'
    script.write_text('import os, sys, time\n'
                      'open(os.path.join(sys.argv[1], f"pid{os.environ[\'RANK\']}"), "w").write(str(os.getpid()))\n'
                      'time.sleep(600)\n')
    with pytest.raises(AssertionError, match='did not finish'):
        torchrun([str(script), str(tmp_path)], REPO_ROOT, timeout=30)
    pids = [int((tmp_path / f'pid{r}').read_text()) for r in range(2) if (tmp_path / f'pid{r}').exists()]
    deadline = time.time() + 30
    while any(running(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in pids)


def running(pid):
    """Whether process ``pid`` exists and is not a zombie (killed, not yet reaped)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


EXIT_CHILD = textwrap.dedent('''
    import atexit, os, sys
    import torch
    from torch_utils import distributed as dist

    out_dir = sys.argv[1]
    dist.init('cpu')
    rank = dist.get_rank()
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    net(torch.ones(1, 2)).sum().backward()
    dist.barrier()
    dist.shutdown()
    atexit.register(lambda: open(os.path.join(out_dir, f'finalized{rank}'), 'w').close())
    threads = sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))
    print(f'rank {rank} ends; threads {threads}')    # into a pipe: buffered until exit_process flushes it
    dist.exit_process(None)
''')


def test_a_process_that_ran_a_group_ends_without_finalization(tmp_path):
    """After a process group ran (here with DistributedDataParallel, whose group outlives
    destroy_process_group with its backend threads), exit_process flushes the output and ends the
    process at once, exit status 0: no atexit handler runs, so the interpreter's finalization, where
    such a thread can abort the process, never starts."""
    script = tmp_path / 'child.py'
    script.write_text(EXIT_CHILD)
    proc = torchrun([str(script), str(tmp_path)], REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(' ends; threads ') == 2, proc.stdout
    assert not list(tmp_path.glob('finalized*'))


@pytest.mark.parametrize('code,status', [(None, 0), (3, 3), ('stopped: why', 1)])
def test_exit_process_without_a_group_exits_normally(tmp_path, code, status):
    """Without a process group, exit_process is sys.exit: atexit handlers run; a message is printed
    and gives status 1."""
    marker = tmp_path / 'finalized'
    script = (f'import atexit, sys; sys.path.insert(0, {REPO_ROOT!r})\n'
              f'from torch_utils import distributed as dist\n'
              f'atexit.register(lambda: open({str(marker)!r}, "w").close())\n'
              f'dist.exit_process({code!r})\n')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert marker.exists()
    assert ('stopped: why' in proc.stderr) == isinstance(code, str)
