"""When a distributed run of ``tools/train.py`` or ``tools/test.py`` fails, name the
ranks it lost: every rank keeps a heartbeat in the run's TCP store (``watch_ranks``)."""
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

SILENCE = 2.5  # heartbeat intervals without a beat after which a rank counts as stopped


def _first_line(err):
    """An error's first line, at most 200 characters (torch's carry a C++ stack)."""
    return (str(err).splitlines() or [''])[0][:200]


class Heartbeat:
    """This rank's heartbeat in the run's TCP store, and who else is alive.

    A daemon thread adds 1 to ``beat/<rank>`` every ``interval`` seconds, on a store
    connection of its own (never held up by the training's collectives);
    ``where/<rank>`` says where the rank runs, ``failed/<rank>`` what it failed with. A
    rank whose counter stops without a failure of its own was killed, or its node is
    down or unreachable.
    """

    def __init__(self, store, rank, world_size, interval=1.0):
        self.store, self.rank, self.world_size, self.interval = store, rank, world_size, interval
        self._stop = threading.Event()
        node = os.environ.get('GROUP_RANK')  # torchrun's node rank
        store.set(f'where/{rank}', f'{socket.gethostname()}, '
                  + (f'node {node}, ' if node else '')
                  + f'local rank {os.environ.get("LOCAL_RANK", "?")}')
        threading.Thread(target=self._beat, daemon=True, name='heartbeat').start()

    def _beat(self):
        while not self._stop.is_set():
            try:
                self.store.add(f'beat/{self.rank}', 1)
            except Exception:  # the store is gone: its host is lost, or the run ended
                return
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()

    def _text(self, key, rank):
        full = f'{key}/{rank}'
        return self.store.get(full).decode() if self.store.check([full]) else None

    def lost_ranks(self, failure):
        """Record ``failure`` as this rank's; then one line naming the ranks whose
        heartbeat stopped (none for ``SILENCE`` intervals), where they ran and whether
        they ended after an error of their own."""
        self.store.set(f'failed/{self.rank}', _first_line(failure))
        others = [r for r in range(self.world_size) if r != self.rank]
        before = {r: self.store.add(f'beat/{r}', 0) for r in others}  # add 0: a read
        time.sleep(SILENCE * self.interval)
        silent = [r for r in others if self.store.add(f'beat/{r}', 0) == before[r]]
        if not silent:
            return f'rank {self.rank}: every other rank is alive (no rank was lost)'
        quiet = f'no heartbeat for {SILENCE * self.interval:g} s'
        parts = []
        for r in silent:
            failed = self._text('failed', r)
            parts.append(f'rank {r} ({self._text("where", r) or "never seen"}) '
                         + (f'stopped after its own error ({quiet}): {failed}' if failed
                            else f'is lost ({quiet}, no error of its own): killed, or its '
                            'node is down or unreachable'))
        return f'rank {self.rank}: ' + '; '.join(parts)

    def report(self, failure, store_wait=10.0):
        """:meth:`lost_ranks`, or, when the store does not answer within ``store_wait``
        seconds (its host frozen or gone), a line saying so."""
        found = []

        def probe():
            try:
                found.append(self.lost_ranks(failure))
            except Exception as err:  # the store's host is gone
                found.append(err)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(SILENCE * self.interval + store_wait)
        if found and isinstance(found[0], str):
            return found[0]
        why = f'({_first_line(found[0])})' if found else f'within {store_wait:g} s'
        return (f'rank {self.rank}: the run\'s store at {os.environ.get("MASTER_ADDR")}:'
                f'{os.environ.get("MASTER_PORT")} does not answer {why}: the node that hosts '
                "it (node 0: torchrun's agent there, or rank 0 without torchrun) is lost or "
                'unreachable')


@contextmanager
def watch_ranks(interval=1.0):
    """Around a distributed run: every rank keeps a :class:`Heartbeat` in the run's store
    (``MASTER_ADDR:MASTER_PORT``: torchrun's agent on node 0, or rank 0); when the run
    fails on this rank, it prints which ranks were lost (a killed or unreachable node),
    then the error propagates. No-op without a process group of more than one rank (or
    without the store's address in the environment)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and 'MASTER_ADDR' in os.environ and 'MASTER_PORT' in os.environ):
        yield
        return
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']),
                          is_master=False, timeout=timedelta(seconds=30))
    run = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')  # a restarted run starts afresh
    heartbeat = Heartbeat(dist.PrefixStore(f'mmdet_bnplug/heartbeat/{run}', store),
                          dist.get_rank(), dist.get_world_size(), interval)
    try:
        yield
    except Exception as err:
        print(heartbeat.report(err), file=sys.stderr, flush=True)
        raise
    finally:
        heartbeat.stop()
