"""Run a function on several gloo processes on one machine, bounded in time.

``run_gloo(fn, world_size)`` spawns ``world_size`` processes, initialises a gloo process
group in each (file rendezvous, so no port can clash with a concurrent run; with
``backend='nccl'`` an nccl group, rank r on GPU r), calls
``fn(rank, world_size, *args)``, destroys the group and returns the per-rank results.
On a child's error or on the deadline every child is killed. Used by the small-batch
study and by the distributed tests. ``free_port()`` is a port for launchers that need
one (torchrun's rendezvous).
"""
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, init_file, out_dir, pg_timeout, threads, args, backend):
    torch.set_num_threads(threads)
    if backend == 'nccl':
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f'file://{init_file}', rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=pg_timeout))
    try:
        result = fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():  # fn may have closed it
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))


def run_gloo(fn, world_size=2, args=(), timeout=120, pg_timeout=30, threads=1,
             backend='gloo'):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks of ``threads``
    torch threads each; list of the ranks' results (they must pickle).

    ``fn`` must be a module-level function (it is pickled by name). ``timeout`` (s)
    bounds the whole run, ``pg_timeout`` (s) every collective. ``backend='nccl'``: the
    ranks' group is nccl, rank r on ``cuda:r`` (as many GPUs as ranks needed).
    """
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry, args=(fn, world_size, os.path.join(tmp, 'rendezvous'), tmp, pg_timeout,
                          threads, args, backend),
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
