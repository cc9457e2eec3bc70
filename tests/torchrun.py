"""One way for the tests to launch ``torchrun`` (2 CPU processes, gloo), for every multi-process test.

Under load (the suite beside other work on 2 cores) a 2-process launch takes far longer than on an
idle machine: each process imports torch before the group forms. The limit is therefore generous,
and a launch that exceeds it is stopped as a whole: SIGTERM to the launcher, which passes it on to
its workers (they run in sessions of their own) and waits for them, then SIGKILL to what is left of
the launcher's session. Killing only the launcher with SIGKILL, as ``subprocess.run(timeout=...)``
does, leaves the workers running on, orphaned, for the rest of the suite.
"""

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Seconds a launch may take before it is killed (a real hang still fails the test).
TIMEOUT = 900


def torchrun(args, cwd=ROOT, nproc=2, timeout=TIMEOUT, env=None):
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node=<nproc> <args>`` in ``cwd``;
    returns the CompletedProcess (text stdout and stderr). On timeout every process of the launch
    is stopped and AssertionError carries the output so far."""
    env = dict(os.environ if env is None else env, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'GROUP_RANK',
                'ROLE_RANK', 'ROLE_WORLD_SIZE', 'TORCHELASTIC_RUN_ID'):
        env.pop(key, None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()                      # torchrun stops its workers on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f'torchrun did not finish in {timeout} s (its processes were stopped): '
                             f'{out[-2000:]}{err[-2000:]}') from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
