"""PortableSyncBN when the ranks of a group disagree, on 2 gloo processes: a channel count
or statistics dtype that differs is a ValueError on every rank naming the layer and both
ranks' values (the layer's handshake), not a gloo abort; a rank in eval mode while the
other trains makes the training rank raise after ``sync_timeout``, not hang. Every
launch is bounded (``pg_timeout``, ``timeout``), so a hang fails the test quickly."""
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from mmdet_bnplug.layers import PortableSyncBN

BOUND = 2  # sync_timeout of the eval/train tests, seconds (an int: ints are accepted)
PG_TIMEOUT = 30  # the process group's timeout: a wait that reaches it has not been bounded
all_gather = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor


def outcome(fn):
    """``fn()``'s error (type name, message) and how long it took, in seconds."""
    start = time.monotonic()
    try:
        fn()
    except Exception as err:  # noqa: BLE001 (the test inspects any error)
        return dict(type=type(err).__name__, message=str(err),
                    seconds=time.monotonic() - start)
    return dict(type=None, message='', seconds=time.monotonic() - start)


def train_step(layer, channels=3, dtype=torch.float32):
    x = torch.randn(2, channels, 5, dtype=dtype, requires_grad=True)
    layer(x).square().sum().backward()


def disagreeing_ranks(rank, world_size):
    """Rank 0 and rank 1 disagree on the channel count, then on the dtype; then rank 1
    makes a collective of the handshake's size instead; then they agree."""
    channels, dtype = (4, 3)[rank], (torch.float64, torch.float32)[rank]
    res = dict(channels=outcome(lambda: train_step(PortableSyncBN(channels), channels)),
               dtype=outcome(lambda: train_step(PortableSyncBN(3).to(dtype), dtype=dtype)))
    if rank == 0:
        res['out_of_step'] = outcome(lambda: train_step(PortableSyncBN(3)))
    else:
        row = torch.zeros(1, 4, dtype=torch.float64)
        res['out_of_step'] = outcome(lambda: all_gather(row.new_empty(2, 4), row))
    # layer #4 on rank 0, #3 on rank 1: the numbers only name layers, they are not checked
    res['agreeing'] = outcome(lambda: train_step(PortableSyncBN(3)))
    return res


@pytest.fixture(scope='module')
def disagreeing():
    return run_distributed(disagreeing_ranks, 2, timeout=120, pg_timeout=PG_TIMEOUT)


def test_channel_mismatch_is_a_clear_error_on_every_rank(disagreeing):
    for res in disagreeing:
        got = res['channels']
        assert got['type'] == 'ValueError', got
        assert got['message'].startswith('PortableSyncBN #1 (')
        assert 'disagree on the channel count or the statistics dtype' in got['message']
        assert 'rank 0: 4 channels float32; rank 1: 3 channels float32' in got['message']
        assert got['seconds'] < 10


def test_dtype_mismatch_is_a_clear_error_on_every_rank(disagreeing):
    for res in disagreeing:
        got = res['dtype']
        assert got['type'] == 'ValueError', got
        assert got['message'].startswith('PortableSyncBN #2 (3 channels)')
        assert 'rank 0: 3 channels float64; rank 1: 3 channels float32' in got['message']
        assert got['seconds'] < 10


def test_another_collective_in_place_of_the_handshake_is_an_error(disagreeing):
    got = disagreeing[0]['out_of_step']
    assert got['type'] == 'RuntimeError', got
    assert got['message'].startswith('PortableSyncBN #3 (3 channels) on rank 0: rank 1 sent')
    assert 'call collectives in different orders' in got['message']
    assert disagreeing[1]['out_of_step']['type'] is None


def test_ranks_stay_in_step_after_a_mismatch(disagreeing):
    assert [res['agreeing']['type'] for res in disagreeing] == [None, None]


def one_rank_in_eval(rank, world_size, steps_before):
    """Both ranks train ``steps_before`` steps; then rank 0 runs the layer in eval mode
    (no collective) and stays up, while rank 1 trains on."""
    layer = PortableSyncBN(3, sync_timeout=BOUND)
    for _ in range(steps_before):
        train_step(layer)
    if rank == 0:
        layer.eval()(torch.randn(2, 3, 5))
        time.sleep(BOUND + 4)  # rank 1's error must come from the bound, not a closed peer
        return None
    return outcome(lambda: train_step(layer))


@pytest.mark.parametrize('steps_before', [0, 1], ids=['first_call', 'later_call'])
def test_rank_in_eval_makes_the_training_rank_raise_within_sync_timeout(steps_before):
    """At the first call the training rank waits in the handshake, later in the batch
    statistics' all_gather; either way it raises after ``sync_timeout``."""
    _, got = run_distributed(one_rank_in_eval, 2, args=(steps_before, ), timeout=90,
                             pg_timeout=PG_TIMEOUT)
    assert got['type'] == 'RuntimeError', got
    what = 'the handshake' if steps_before == 0 else 'batch statistics'
    assert got['message'].startswith('PortableSyncBN #1 (3 channels) on rank 1: waited '), got
    assert f'for ranks 0, 1 to all_gather {what}' in got['message']
    assert f'the bound is {BOUND:g} s (sync_timeout={BOUND}, or' in got['message']
    assert 'in eval mode while this one trains' in got['message']
    assert 'a different model or branch' in got['message']
    assert BOUND - 0.1 < got['seconds'] < BOUND + 3


@pytest.mark.parametrize('value', [0, -1.0, float('inf'), float('nan'), True, '600'])
def test_sync_timeout_is_validated(value):
    with pytest.raises(ValueError, match='PortableSyncBN: sync_timeout must be None or a '
                                         'finite number of seconds > 0, got'):
        PortableSyncBN(3, sync_timeout=value)


def test_sync_timeout_none_and_in_repr():
    assert 'sync_timeout=None' in repr(PortableSyncBN(3, sync_timeout=None))
    assert 'sync_timeout=600.0' in repr(PortableSyncBN(3))
