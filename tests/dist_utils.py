"""Helpers for tests that need several gloo processes on one machine.

``run_distributed(fn, world_size)`` is ``mmdet_bnplug.testing.gloo.run_gloo``: it spawns
``world_size`` processes, initialises a gloo process group in each, calls
``fn(rank, world_size, *args)`` and returns the per-rank results; ``free_port()`` is the
same module's.
``run_launcher(cmd)`` runs a launcher script (torchrun and its workers);
``launched(runs)`` starts several side by side (the nodes of one multi-node run) and
``wait_all`` waits for them. All are bounded in time: on a child's error or on the
deadline every child is killed, torchrun's workers included (``kill_tree``).
"""
import os
import signal
import subprocess
import time
from contextlib import contextmanager

import torch.distributed as dist

from mmdet_bnplug.testing.gloo import free_port  # noqa: F401
from mmdet_bnplug.testing.gloo import run_gloo as run_distributed  # noqa: F401

# collectives a layer could call: torch.distributed's functions and the process group's
# own methods (which take a timeout); ``CollectiveCounter`` wraps the ones that exist
COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_into_tensor', 'all_gather_single',
               'all_gather_object', 'broadcast', 'reduce', 'reduce_scatter',
               'reduce_scatter_tensor', 'all_to_all', 'all_to_all_single', 'gather',
               'scatter', 'barrier')
GROUP_COLLECTIVES = ('allreduce', 'allreduce_coalesced', 'allgather', 'allgather_coalesced',
                     'all_gather_single', '_allgather_base', 'allgather_into_tensor_coalesced',
                     'broadcast', 'reduce', 'reduce_scatter', 'reduce_scatter_single',
                     '_reduce_scatter_base', 'alltoall', 'alltoall_base', 'gather', 'scatter',
                     'barrier')


def _descendants(pid):
    """``pid`` and every process below it (Linux /proc), parents first."""
    found = [pid]
    try:
        for task in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{task}/children') as f:
                for child in f.read().split():
                    found += _descendants(int(child))
    except FileNotFoundError:  # it has ended
        pass
    return found


def kill_tree(pid, sig=signal.SIGKILL):
    """Send ``sig`` to ``pid`` and all its descendants, found before any is signalled:
    torchrun starts each worker in a session of its own, out of reach of ``killpg``."""
    for member in _descendants(pid):
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass


def _start(cmd, cwd, env, **streams):
    return subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), text=True,
                            start_new_session=True, **streams)


def run_launcher(cmd, cwd, timeout, env=None):
    """Run ``cmd`` (e.g. tools/dist_train.sh ...); on the deadline it is killed with
    everything it started (torchrun and its workers). CompletedProcess."""
    proc = _start(cmd, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        raise TimeoutError(f'{cmd} did not finish within {timeout} s:\n{stderr[-3000:]}')
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@contextmanager
def launched(runs, cwd, log_dir):
    """Start every ``(cmd, env)`` of ``runs`` side by side, the output of the i-th (stdout
    and stderr) into ``log_dir/launcher<i>.log``; yields the Popens. On exit whatever is
    still running is killed with everything it started."""
    procs = []
    try:
        for i, (cmd, env) in enumerate(runs):
            with open(os.path.join(log_dir, f'launcher{i}.log'), 'w') as log:
                procs.append(_start(cmd, cwd, env, stdout=log, stderr=subprocess.STDOUT))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait()


def wait_all(procs, timeout):
    """The return codes of ``procs`` once every one has ended; TimeoutError if that takes
    longer than ``timeout`` seconds (``launched`` then kills them)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f'{proc.args} did not finish within {timeout} s') from None
    return [proc.returncode for proc in procs]


class CollectiveCounter:
    """Counts outermost calls of collectives (``torch.distributed``'s or a process
    group's) while installed."""

    def __init__(self):
        self.calls = 0
        self._depth = 0

    def _wrap(self, op):
        def counted(*args, **kwargs):
            self.calls += self._depth == 0
            self._depth += 1
            try:
                return op(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    @contextmanager
    def installed(self):
        # the attributes as stored (a class's method descriptors, restored as they were)
        originals = [(owner, name, vars(owner)[name])
                     for owner, names in ((dist, COLLECTIVES),
                                          (dist.ProcessGroup, GROUP_COLLECTIVES))
                     for name in names if name in vars(owner)]
        for owner, name, _ in originals:
            setattr(owner, name, self._wrap(getattr(owner, name)))
        try:
            yield self
        finally:
            for owner, name, stored in originals:
                setattr(owner, name, stored)

    def take(self):
        """Calls since the last ``take``."""
        calls, self.calls = self.calls, 0
        return calls
