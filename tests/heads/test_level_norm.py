"""Per-level norm statistics in shared detection heads (mmdet_bnplug.heads.level_norm):
the routed head equals each level run through its own norms (float64), in training and
eval, under activation checkpointing; what cannot be routed is refused; shared-norm
checkpoints load; the package's tools see every level; folding is exact per level."""
import copy

import pytest
import torch
from mmdet.models.dense_heads import ATSSHead, FCOSHead, RetinaHead
from mmdet.registry import MODELS
from mmengine.registry import DefaultScope
from mmengine.runner.checkpoint import load_state_dict
from torch.utils.checkpoint import checkpoint

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.heads import NormedRPNHead
from mmdet_bnplug.layers import LevelNorm, LevelRouted, apply_norm_eval, level_norm
from mmdet_bnplug.layers.level_norm import at_level
from mmdet_bnplug.transforms import convert_norm, fuse_norm_report
from mmdet_bnplug.utils.bn_like import bn_like_layers

STRIDES = [8, 16, 32, 64]
SIZES = [16, 8, 4, 2]
BN = dict(type='BN', requires_grad=True)
MABN = dict(type='MABN', requires_grad=True, buffer_size=2, warmup_iters=0,
            renorm_iters=0, r_max=5.0)

# head type -> (mmdet class, extra config, forward_single's extra arguments at level i)
HEADS = {
    'LevelNormRetinaHead': (RetinaHead, dict(
        stacked_convs=2, anchor_generator=dict(
            type='AnchorGenerator', octave_base_scale=2, scales_per_octave=1,
            ratios=[1.0], strides=STRIDES)), lambda head, i: ()),
    'LevelNormFCOSHead': (FCOSHead, dict(stacked_convs=2, strides=STRIDES),
                          lambda head, i: (head.scales[i], head.strides[i])),
    'LevelNormATSSHead': (ATSSHead, dict(stacked_convs=2, anchor_generator=dict(
        type='AnchorGenerator', ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
        strides=STRIDES)), lambda head, i: (head.scales[i], )),
    'LevelNormRPNHead': (NormedRPNHead, dict(num_convs=2, anchor_generator=dict(
        type='AnchorGenerator', scales=[8], ratios=[1.0], strides=STRIDES)),
        lambda head, i: ()),
}


def _build(cfg):
    """A head from mmdet's registry, under mmdet's scope whatever test ran before."""
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg)


def _head(type_, norm_cfg=BN, **kwargs):
    _, extra, _ = HEADS[type_]
    num_classes = 1 if type_ == 'LevelNormRPNHead' else 3
    torch.manual_seed(0)
    head = _build(dict(type=type_, num_classes=num_classes, in_channels=8, feat_channels=8,
                       norm_cfg=norm_cfg, **extra, **kwargs))
    return head.double()


def _feats(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 8, s, s, generator=g, dtype=torch.float64) * (i + 1)
                 for i, s in enumerate(SIZES))


def _views(head):
    """Per level, a copy of the head as its mmdet class with that level's norms."""
    base = HEADS[type(head).__name__][0]
    views = []
    for i in range(head.num_levels):
        view = copy.deepcopy(head)
        for name, module in list(view.named_modules()):
            if isinstance(module, LevelNorm):
                parent, _, child = name.rpartition('.')
                setattr(view.get_submodule(parent), child, module[i])
        view.__class__ = base
        views.append(view)
    return views


def _scalar(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights))


def _randomise_statistics(head):
    g = torch.Generator().manual_seed(5)
    for _, layer in bn_like_layers(head):
        layer.running_mean.copy_(torch.randn(layer.num_features, generator=g))
        layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)


EVALBN = dict(type='EvalBN', requires_grad=True)
PSBN = dict(type='PortableSyncBN', requires_grad=True)  # one process: BN on its batch
CASES = [(type_, BN) for type_ in HEADS] + [
    ('LevelNormRetinaHead', norm) for norm in (MABN, EVALBN, PSBN)]


@pytest.mark.parametrize('type_, norm_cfg', CASES,
                         ids=[f"{t}-{n['type']}" for t, n in CASES])
@pytest.mark.parametrize('training', [True, False])
def test_routing_equals_each_level_through_its_own_norms(type_, norm_cfg, training):
    head = _head(type_, norm_cfg)
    with torch.no_grad():
        _randomise_statistics(head)
    views = _views(head)
    head.train(training)
    feats = _feats()
    outs = head(feats)  # (cls scores per level, bbox preds per level[, ...])
    extra = HEADS[type_][2]
    g = torch.Generator().manual_seed(2)
    weights = [[torch.randn(o.shape, generator=g, dtype=torch.float64) for o in part]
               for part in outs]
    _scalar([o for part in outs for o in part],
            [w for part in weights for w in part]).backward()
    for i, view in enumerate(views):
        view.train(training)
        ref = type(view).forward_single(view, feats[i], *extra(view, i))
        for part, r, w in zip(outs, ref, weights):
            torch.testing.assert_close(part[i], r, rtol=1e-12, atol=1e-12)
        _scalar(ref, [w[i] for w in weights]).backward()
    # every level's statistics moved (training) or not (eval) as its own norm's
    for name, module in head.named_modules():
        if isinstance(module, LevelNorm):
            for i, view in enumerate(views):
                own = view.get_submodule(name)
                for a, b in zip(module[i].buffers(), own.buffers()):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(module[i].weight.grad, own.weight.grad,
                                           rtol=1e-10, atol=1e-12)
    # the shared convs' gradient is the sum over the levels
    for name, param in head.named_parameters():
        if '.bn.' not in name and param.grad is not None:
            total = sum(v.get_parameter(name).grad for v in views
                        if v.get_parameter(name).grad is not None)  # FCOS: scales[i]
            torch.testing.assert_close(param.grad, total, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('norm_cfg', [BN, MABN], ids=['BN', 'MABN'])
def test_with_cp_equals_without(norm_cfg):
    """Activation-checkpointed levels (with_cp): same outputs, gradients and buffers
    over 3 iterations (MABN past its warm-up, where its averages feed the output): the
    recomputation sees each level's norms as they were before its forward."""
    runs = []
    for with_cp in (False, True):
        head = _head('LevelNormRetinaHead', norm_cfg, with_cp=with_cp).train()
        grads = []
        for step in range(3):
            head.zero_grad()
            feats = tuple(f.requires_grad_() for f in _feats(step))
            cls, reg = head(feats)
            (sum(c.square().sum() for c in cls) + sum(r.sum() for r in reg)).backward()
            grads.append([p.grad.clone() for p in head.parameters()])
        runs.append((grads, [b.clone() for b in head.buffers()]))
    (g0, b0), (g1, b1) = runs
    for a, b in zip(sum(g0, []), sum(g1, [])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(b0, b1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_what_cannot_be_routed_is_refused():
    head = _head('LevelNormRetinaHead').train()
    feats = _feats()
    with pytest.raises(ValueError, match='got 3 feature levels, its per-level norms hold 4'):
        head(feats[:3])
    with pytest.raises(RuntimeError, match='forward_single called on a tensor that is not'):
        head.forward_single(feats[0])
    norm = head.cls_convs[0].bn
    with pytest.raises(RuntimeError, match='LevelNorm: called with no FPN level set'):
        norm(torch.randn(2, 8, 4, 4, dtype=torch.float64))
    with at_level(4), pytest.raises(RuntimeError, match='FPN level 4 out of range'):
        norm(torch.randn(2, 8, 4, 4, dtype=torch.float64))
    # a checkpoint that the head did not set up recomputes outside the routing: refused
    head.cls_convs[0].forward = (lambda m: lambda x: checkpoint(m.__class__.forward, m, x,
                                                                use_reentrant=False))(
        head.cls_convs[0])
    cls, _ = head(tuple(f.requires_grad_() for f in feats))
    with pytest.raises(RuntimeError, match='called with no FPN level set'):
        sum(c.sum() for c in cls).backward()
    with pytest.raises(ValueError, match='no norm layer with batch statistics'):
        _head('LevelNormRetinaHead', norm_cfg=None)
    with pytest.raises(ValueError, match='shared_affine must be True or False'):
        _head('LevelNormRetinaHead', shared_affine='yes')


@pytest.mark.parametrize('norm_cfg', [BN, MABN], ids=['BN', 'MABN'])
def test_a_shared_norm_checkpoint_loads_into_every_level(norm_cfg, monkeypatch):
    logged = []
    monkeypatch.setattr(level_norm, 'print_log', lambda msg, **kw: logged.append(msg))
    torch.manual_seed(3)
    shared = _build(dict(type='RetinaHead', num_classes=3, in_channels=8, feat_channels=8,
                         norm_cfg=norm_cfg, **HEADS['LevelNormRetinaHead'][1])).double().train()
    shared(_feats())  # statistics away from their initial values
    state = shared.state_dict()
    head = _head('LevelNormRetinaHead', norm_cfg)
    load_state_dict(head, state, strict=True)
    for name, module in head.named_modules():
        if isinstance(module, LevelNorm):
            own = shared.get_submodule(name).state_dict()
            for level in module:
                for key, value in level.state_dict().items():
                    torch.testing.assert_close(value, own[key], rtol=0, atol=0)
    assert len(logged) == 4 and logged[0].startswith(
        'LevelNorm cls_convs.0.bn: loaded the shared norm of the checkpoint into each of '
        'its 4 levels')
    # its own state dict round-trips with strict=True, level by level
    head2 = _head('LevelNormRetinaHead', norm_cfg)
    load_state_dict(head2, head.state_dict(), strict=True)
    for a, b in zip(head.state_dict().values(), head2.state_dict().values()):
        assert torch.equal(a, b)


def test_shared_affine_is_one_parameter_and_survives_conversion():
    head = _head('LevelNormRetinaHead', shared_affine=True)
    norm = head.cls_convs[0].bn
    assert all(level.weight is norm[0].weight and level.bias is norm[0].bias
               for level in norm)
    assert len(list(head.parameters())) == len(list(_head('LevelNormRetinaHead').parameters())) \
        - 3 * 2 * len(head.level_norm_names)
    convert_norm(head, dict(type='EvalBN', requires_grad=False))
    norm = head.cls_convs[0].bn
    assert type(norm[1]).__name__ == 'EvalBN'
    assert all(level.weight is norm[0].weight for level in norm)


def test_the_tools_see_every_level():
    head = _head('LevelNormRetinaHead')
    names = [n for n, _ in bn_like_layers(head)]
    assert len(names) == 4 * 4 and 'cls_convs.0.bn.3' in names
    convert_norm(head, 'MABN', include='reg_convs.*')
    assert sorted({type(m).__name__ for _, m in bn_like_layers(head)}) == \
        ['BatchNorm2d', 'MABN']
    assert sum(type(m).__name__ == 'MABN' for _, m in bn_like_layers(head)) == 8
    assert len(apply_norm_eval(head, True)) == 16
    head.train()
    before = [b.clone() for b in head.buffers()]
    head(_feats())  # each level's pre-hook puts it back in eval: no statistic moves
    assert not any(m.training for _, m in bn_like_layers(head))
    assert all(torch.equal(a, b) for a, b in zip(before, head.buffers()))


@pytest.mark.parametrize('norm_cfg', [BN, MABN], ids=['BN', 'MABN'])
def test_folded_per_level_head_equals_the_unfused(norm_cfg):
    head = _head('LevelNormRetinaHead', norm_cfg).train()
    for step in range(3):  # MABN: moving averages into its eval map
        head(_feats(step))
    head.eval()
    with torch.no_grad():
        if norm_cfg is BN:  # MABN's running_mean stays zero
            _randomise_statistics(head)
        expected = head(_feats(9))
        folded = copy.deepcopy(head)
        assert fuse_norm_report(folded) == {}
        assert not bn_like_layers(folded)
        assert isinstance(folded.cls_convs[0].conv, LevelRouted)
        got = folded(_feats(9))
    for a, b in zip(sum(expected, []), sum(got, [])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # on a probe too (every pair verified locally and for the whole head)
    probed = copy.deepcopy(head)
    assert fuse_norm_report(probed, (_feats(9), )) == {}
    assert not bn_like_layers(probed)
