"""Helpers for tests that need several gloo processes on one machine.

``run_distributed(fn, world_size)`` spawns ``world_size`` processes, initialises a gloo
process group in each (file rendezvous, so no port can clash with a concurrent run),
calls ``fn(rank, world_size, *args)`` and returns the per-rank results.
``run_launcher(cmd)`` runs a launcher script (torchrun and its workers). Both are
bounded in time: on a child's error or on the deadline every child is killed.
"""
import os
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# public collectives a layer could call; ``count_collectives`` wraps the ones that exist
COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_into_tensor', 'all_gather_single',
               'all_gather_object', 'broadcast', 'reduce', 'reduce_scatter',
               'reduce_scatter_tensor', 'all_to_all', 'all_to_all_single', 'gather',
               'scatter', 'barrier')


def free_port():
    """A TCP port that was free a moment ago (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, init_file, out_dir, pg_timeout, args):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=pg_timeout))
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))


def run_distributed(fn, world_size=2, args=(), timeout=120, pg_timeout=30):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; list of results.

    ``fn`` must be a module-level function (it is pickled by name). ``timeout`` (s)
    bounds the whole run, ``pg_timeout`` (s) every collective.
    """
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry, args=(fn, world_size, os.path.join(tmp, 'rendezvous'), tmp, pg_timeout,
                          args),
            nprocs=world_size, join=False, start_method='spawn')
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f'{fn.__name__} on {world_size} ranks did not finish '
                                       f'within {timeout} s')
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(os.path.join(tmp, f'rank{r}.pt'), weights_only=False)
                for r in range(world_size)]


def run_launcher(cmd, cwd, timeout, env=None):
    """Run ``cmd`` (e.g. tools/dist_train.sh ...) in its own process group; on the
    deadline the whole group (torchrun and its workers) is killed. CompletedProcess."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise TimeoutError(f'{cmd} did not finish within {timeout} s:\n{stderr[-3000:]}')
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


class CollectiveCounter:
    """Counts outermost calls of ``torch.distributed`` collectives while installed."""

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
        originals = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
        for name, op in originals.items():
            setattr(dist, name, self._wrap(op))
        try:
            yield self
        finally:
            for name, op in originals.items():
                setattr(dist, name, op)

    def take(self):
        """Calls since the last ``take``."""
        calls, self.calls = self.calls, 0
        return calls
