"""tools/dist_train.sh as two torchrun agents on this machine, the two nodes of one run
(NNODES=2, NODE_RANK 0 and 1, MASTER_ADDR 127.0.0.1, gloo): PortableSyncBN over both
nodes and, with ``group_size``, within each; and a node lost in the middle of a run."""
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import REPO, SHORT, data_root_options, pythonpath
from dist_utils import free_port, kill_tree, launched, wait_all
from norm_helpers import STATISTICS
from rank_watch import Heartbeat

SYNCBN_TOY = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_syncbn_toy.py')
HERE = osp.dirname(osp.abspath(__file__))  # rank_state_hook.py
# a few iterations, no validation or checkpoint: the tests compare what the ranks hold
FEW = ['train_cfg.max_iters=3', 'train_cfg.val_begin=100',
       'default_hooks.checkpoint.interval=100', 'train_dataloader.batch_size=2']
RUN_TIMEOUT_S = 300  # a whole 2-node run on a busy machine


def node_runs(config, nproc, work_dir, options):
    """``(cmd, env)`` of the two agents of one 2-node run of tools/dist_train.sh."""
    env = dict(NNODES='2', MASTER_ADDR='127.0.0.1', PORT=str(free_port()),
               PYTHON=sys.executable, PYTHONUNBUFFERED='1', PYTHONPATH=pythonpath(HERE))
    return [(['bash', 'tools/dist_train.sh', config, str(nproc), '--work-dir',
              osp.join(work_dir, f'node{node}'), '--cfg-options', *options],
             dict(env, NODE_RANK=str(node))) for node in (0, 1)]


def logs(tmp_path):
    return [(tmp_path / f'launcher{node}.log').read_text() for node in (0, 1)]


def rank_state_config(tmp_path):
    """The PortableSyncBN toy with ``RankStateHook``: every rank's state into a folder."""
    out = tmp_path / 'ranks'
    out.mkdir()
    config = tmp_path / 'syncbn_rank_state.py'
    config.write_text(
        f'_base_ = [{SYNCBN_TOY!r}]\n'
        "custom_imports = dict(imports=['mmdet_bnplug', 'rank_state_hook'], "
        'allow_failed_imports=False)\n'
        "custom_hooks = [dict(type='GlobalLossNormHook'), "
        f"dict(type='RankStateHook', out_dir={str(out)!r})]\n")
    return str(config), out


def bn_on(group):
    """BN (training, momentum 0.1) on the group's concatenated first batch of the hooked
    layer: (output, running mean, running variance) after that step."""
    first = [rank['first'] for rank in group]
    mean, var = first[0]['mean_before'].clone(), first[0]['var_before'].clone()
    y = F.batch_norm(torch.cat([f['input'] for f in first]), mean, var, first[0]['weight'],
                     first[0]['bias'], True, 0.1, 1e-5)
    return y, mean, var


@pytest.mark.parametrize('nproc, group_size', [(1, None), (2, 2)],
                         ids=['2x1-one-group', '2x2-group-per-node'])
def test_two_nodes_train_in_sync(tiny_synthetic, tmp_path, nproc, group_size):
    """Both agents exit 0; every rank holds the same weights (DDP over the world); the
    BN statistics are the same within a PortableSyncBN group and differ between groups;
    and in a group the first BN layer's first forward (output and running statistics)
    is BN's on the group's concatenated batch, not on the rank's own."""
    config, out = rank_state_config(tmp_path)
    options = [*SHORT, *data_root_options(tiny_synthetic), *FEW]
    if group_size:
        options.append(f'model.backbone.norm_cfg.group_size={group_size}')
    with launched(node_runs(config, nproc, str(tmp_path), options), REPO,
                  str(tmp_path)) as agents:
        codes = wait_all(agents, RUN_TIMEOUT_S)
    assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs(tmp_path))
    world = 2 * nproc
    assert f'GPU number: {world}' in logs(tmp_path)[0]  # mmengine's world size
    ranks = [torch.load(out / f'rank{r}.pth') for r in range(world)]
    assert [rank['node'] for rank in ranks] == [r // nproc for r in range(world)]
    groups = [ranks] if group_size is None else [ranks[:nproc], ranks[nproc:]]

    state = ranks[0]['state']
    assert state['backbone.bn1.num_batches_tracked'] == 3
    for key in state:
        if not key.endswith(STATISTICS):  # parameters: DDP averages over the world
            assert all(torch.equal(rank['state'][key], state[key]) for rank in ranks), key
        for group in groups:  # statistics: one group, one set, bit for bit
            assert all(torch.equal(rank['state'][key], group[0]['state'][key])
                       for rank in group), key
        if len(groups) == 2 and key.endswith('running_mean'):  # the nodes saw other images
            assert not torch.equal(groups[0][0]['state'][key], groups[1][0]['state'][key])

    for group in groups:
        y, mean, var = bn_on(group)
        for rank, part in zip(group, y.split([len(r['first']['input']) for r in group])):
            torch.testing.assert_close(rank['first']['output'], part, rtol=1e-5, atol=5e-5)
            torch.testing.assert_close(rank['first']['mean_after'], mean)
            torch.testing.assert_close(rank['first']['var_after'], var)
        _, own_mean, _ = bn_on(group[:1])  # the criterion tells the group from one rank
        assert (own_mean - mean).abs().max() > 100 * (group[0]['first']['mean_after']
                                                      - mean).abs().max()


def wait_for(pattern, path, agents, timeout):
    """Until ``pattern`` appears in the log at ``path``; fail if an agent ends first."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, path.read_text()):
        ended = [proc.args for proc in agents if proc.poll() is not None]
        assert not ended and time.monotonic() < deadline, (ended, path.read_text()[-3000:])
        time.sleep(0.5)


TIMEOUT_S = 20  # PortableSyncBN's sync_timeout and the process group's timeout (s)
# the survivor's bound after the loss: the timeout, the report (2.5 s of heartbeats, at
# most 10 s more for a store that does not answer), a margin to exit
BOUND_S = TIMEOUT_S + 12.5 + 20


@pytest.mark.parametrize('how, victim', [('killed', 1), ('frozen', 0)])
def test_a_lost_node_ends_the_other_naming_it(tiny_synthetic, tmp_path, how, victim):
    """Mid-run, one node's agent and workers are killed (SIGKILL: their connections
    close) or frozen (SIGSTOP: a node that stops answering; node 0 also hosts the run's
    store). The other node's agent exits non-zero within the bound, its rank having
    printed which rank it lost, or that the store's node is lost."""
    options = [*SHORT, *data_root_options(tiny_synthetic), *FEW,
               'train_cfg.max_iters=1000',  # a long run, cut short by the loss
               f'model.backbone.norm_cfg.sync_timeout={TIMEOUT_S}',
               f'env_cfg.dist_cfg.timeout={TIMEOUT_S}']
    runs = node_runs(SYNCBN_TOY, 1, str(tmp_path), options)
    with launched(runs, REPO, str(tmp_path)) as agents:
        wait_for(r'Iter\(train\) \[\s*2/', tmp_path / 'launcher0.log', agents, RUN_TIMEOUT_S)
        kill_tree(agents[victim].pid, signal.SIGKILL if how == 'killed' else signal.SIGSTOP)
        start = time.monotonic()
        [code] = wait_all([agents[1 - victim]], BOUND_S)
        elapsed = time.monotonic() - start
    log = logs(tmp_path)[1 - victim]
    assert code != 0 and elapsed < BOUND_S, log[-3000:]
    if victim == 1:
        assert re.search(r'rank 0: rank 1 \(.*node 1, local rank 0\) is lost \(no heartbeat '
                         r'for 2\.5 s, no error of its own\)', log), log[-3000:]
    else:
        assert (f"rank 1: the run's store at 127.0.0.1:{runs[0][1]['PORT']} does not answer "
                "within 10 s: the node that hosts it (node 0") in log, log[-3000:]


@pytest.mark.parametrize('env, message', [
    (dict(NNODES='2'), "NNODES=2: set MASTER_ADDR to node 0's address"),
    (dict(NNODES='2', NODE_RANK='2', MASTER_ADDR='127.0.0.1'),
     'NNODES=2 NODE_RANK=2: NNODES must be a positive integer and NODE_RANK one of '
     '0..NNODES-1'),
    (dict(NNODES='two'), 'NNODES=two NODE_RANK=0: NNODES must be')],
    ids=['no-master-addr', 'node-rank-too-large', 'nnodes-not-a-number'])
def test_dist_scripts_refuse_a_bad_node_setting(env, message):
    """Before torchrun starts (which would wait for a rendezvous that never comes)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ('NNODES', 'NODE_RANK', 'MASTER_ADDR')}
    result = subprocess.run(['bash', 'tools/dist_train.sh', SYNCBN_TOY, '1'], cwd=REPO,
                            env=dict(base, **env), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_heartbeat_tells_lost_from_failed_ranks(monkeypatch):
    """In one process, over a real TCP store: rank 0 alive, rank 1 lost (its heartbeat
    stopped with no error), rank 2 stopped after an error of its own, rank 3 alive, rank
    4 never seen; then the store's host gone."""
    monkeypatch.setenv('GROUP_RANK', '1')
    monkeypatch.setenv('LOCAL_RANK', '0')
    server = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(server.port))
    beats = [Heartbeat(dist.TCPStore('127.0.0.1', server.port), rank, 5, interval=0.1)
             for rank in range(4)]
    beats[1].stop()
    beats[2].lost_ranks(RuntimeError('boom\nC++ stack'))
    beats[2].stop()
    report = beats[0].report(RuntimeError('Connection closed by peer'))
    where = 'node 1, local rank 0'
    assert re.fullmatch(
        rf'rank 0: rank 1 \([^)]*{where}\) is lost \(no heartbeat for 0\.25 s, no error of '
        r'its own\): killed, or its node is down or unreachable; '
        rf'rank 2 \([^)]*{where}\) stopped after its own error \(no heartbeat for 0\.25 s\): '
        r'boom; rank 4 \(never seen\) is lost .*', report), report
    del server
    assert beats[3].report(RuntimeError('x'), store_wait=5).startswith(
        f"rank 3: the run's store at 127.0.0.1:{os.environ['MASTER_PORT']} does not answer (")
    for beat in beats:
        beat.stop()
