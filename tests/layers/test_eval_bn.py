"""EvalBN: frozen statistics in every mode, BN-exact maths, checkpoints, dtypes."""
import pytest
import torch
from mmcv.cnn import build_norm_layer
from mmengine.registry import MODELS, DefaultScope
from torch import nn

import mmdet_bnplug  # noqa: F401  (registers EvalBN)
from mmdet_bnplug.layers.eval_bn import EvalBN


def random_state(layer, seed=0):
    """Give a BN-like layer non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        layer.weight.copy_(torch.randn(c, generator=g))
        layer.bias.copy_(torch.randn(c, generator=g))
        if getattr(layer, 'num_batches_tracked', None) is not None:
            layer.num_batches_tracked.fill_(7)
    return layer


def reference(x, layer):
    """Independent float64 eval-mode BN: (x - mean) / sqrt(var + eps) * w + b."""
    shape = (1, -1) + (1, ) * (x.dim() - 2)
    mean, var, w, b = (t.detach().double().view(shape) for t in (
        layer.running_mean, layer.running_var, layer.weight, layer.bias))
    return (x.double() - mean) / torch.sqrt(var + layer.eps) * w + b


def buffers(layer):
    return {k: v.clone() for k, v in layer.named_buffers()}


@pytest.mark.parametrize('shape', [(5, 3), (4, 3, 7), (2, 3, 5, 6), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize('training', [True, False])
def test_matches_float64_reference_any_rank(shape, training):
    layer = random_state(EvalBN(3).double()).train(training)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, reference(x, layer), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (x, ))  # grads of x, weight and bias


@pytest.mark.parametrize('frozen_affine', [False, True])
@pytest.mark.parametrize('size', [5, 128])  # the frozen path differs above 2**18 elements
def test_equals_batchnorm2d_eval_forward_and_backward(frozen_affine, size):
    ebn = random_state(EvalBN(8)).train()
    bn = nn.BatchNorm2d(8)
    bn.load_state_dict(ebn.state_dict())
    bn.eval()
    ebn.requires_grad_(not frozen_affine)
    bn.requires_grad_(not frozen_affine)
    x = torch.randn(2, 8, size, size)
    g = torch.randn(2, 8, size, size)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ebn(x1), bn(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    for p1, p2 in zip(ebn.parameters(), bn.parameters()):
        if frozen_affine:
            assert p1.grad is None and p2.grad is None
        else:
            torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.cuda
@pytest.mark.parametrize('frozen_affine', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['float32', 'float16'])
def test_on_cuda_equals_batchnorm2d_eval(dtype, frozen_affine):
    """On CUDA, EvalBN in training mode is cuDNN's BN in eval mode, fp32 or in a half
    model (fp32 statistics), above the frozen path's threshold; no buffer moves."""
    ebn = random_state(EvalBN(8)).cuda().train()
    bn = nn.BatchNorm2d(8).cuda()
    bn.load_state_dict(ebn.state_dict())
    bn.eval()
    ebn.requires_grad_(not frozen_affine)
    bn.requires_grad_(not frozen_affine)
    before = buffers(ebn)
    x = torch.randn(2, 8, 128, 128, device='cuda').to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ebn(x1), bn(x2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    assert y1.dtype == dtype
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    if not frozen_affine:
        torch.testing.assert_close(ebn.weight.grad, bn.weight.grad, **tol)
        torch.testing.assert_close(ebn.bias.grad, bn.bias.grad, **tol)
    assert all(torch.equal(v, before[k]) for k, v in buffers(ebn).items())


def test_frozen_backward_keeps_no_activation():
    layer = random_state(EvalBN(4)).requires_grad_(False).train()
    y = layer(torch.randn(2, 4, 256, 256, requires_grad=True))
    assert [t.shape for t in y.grad_fn.saved_tensors] == [torch.Size([4])]


def test_statistics_never_move_and_affine_trains():
    layer = random_state(EvalBN(4))
    before = buffers(layer)
    weight0 = layer.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for mode in (True, False, True):
        layer.train(mode)
        for _ in range(3):
            opt.zero_grad()
            (layer(torch.randn(3, 4, 5, 5) * 3 + 2) ** 2).mean().backward()
            opt.step()
    for k, v in buffers(layer).items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(layer.weight, weight0)  # affine trains by default


def test_requires_grad_false_freezes_everything():
    _, layer = build_norm_layer(dict(type='EvalBN', requires_grad=False), 4)
    random_state(layer).train()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(x.grad, scale.view(1, -1, 1, 1).expand_as(x))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_zero_size_batch():
    layer = random_state(EvalBN(4)).train()
    before = buffers(layer)
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in buffers(layer).items())


def _frozen_bn_state(with_metadata_version):
    from mmdet.models.layers import FrozenBatchNorm2d
    frozen = FrozenBatchNorm2d(6)
    with torch.no_grad():
        for name in ('weight', 'bias', 'running_mean'):
            getattr(frozen, name).copy_(torch.randn(6))
        frozen.running_var.copy_(torch.rand(6) + 0.5)
    state = frozen.state_dict()
    if with_metadata_version is None:
        del state._metadata
    else:
        state._metadata[''] = {'version': with_metadata_version}
    return frozen, state


@pytest.mark.parametrize('source', ['BN', 'SyncBN', 'FrozenBN', 'FrozenBN-no-metadata',
                                    'FrozenBN-version-2'])
def test_loads_checkpoints_strictly(source):
    x = torch.randn(2, 6, 4, 4)
    if source.startswith('FrozenBN'):
        version = {'FrozenBN': 1, 'FrozenBN-no-metadata': None}.get(source, 2)
        src, state = _frozen_bn_state(version)
        assert 'num_batches_tracked' not in state
    else:
        src = random_state(nn.SyncBatchNorm(6) if source == 'SyncBN' else nn.BatchNorm2d(6))
        state = src.state_dict()
    layer = EvalBN(6)
    layer.load_state_dict(state, strict=True)
    torch.testing.assert_close(layer(x), src.eval()(x))
    # and back: EvalBN checkpoints load into plain BN
    nn.BatchNorm2d(6).load_state_dict(layer.state_dict(), strict=True)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('frozen_affine', [False, True])
def test_half_model_trains(dtype, frozen_affine):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), EvalBN(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), EvalBN(8, affine=not frozen_affine))
    random_state(model[1])
    model[1].requires_grad_(not frozen_affine)
    model.to(dtype).train()
    x = torch.randn(2, 3, 8, 8, dtype=dtype, requires_grad=True)
    y = model(x)
    assert y.dtype == dtype
    big = model[:2](torch.randn(1, 3, 256, 256, dtype=dtype))  # the frozen fast path
    big.float().mean().backward()
    y.float().square().mean().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert (model[1].weight.grad is None) == frozen_affine
    ref = reference(model[0](x).float(), model[1])
    torch.testing.assert_close(model[1](model[0](x)).double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_and_mixed_dtypes(dtype):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), EvalBN(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    random_state(model[1])
    with torch.autocast('cpu', dtype=dtype):
        y = model(torch.randn(2, 3, 8, 8))
        assert model[1](torch.randn(2, 8, 3, 3, dtype=dtype)).dtype == dtype
    assert y.dtype == dtype
    y.float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32
    # fp32 layer inside a half network, outside autocast: output stays half
    x = torch.randn(2, 8, 3, 3, dtype=dtype, requires_grad=True)
    out = model[1](x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert x.grad.dtype == dtype


def test_bad_input_errors():
    with pytest.raises(ValueError, match='track_running_stats'):
        EvalBN(4, track_running_stats=False)
    with pytest.raises(ValueError, match=r'\(N, 4, \*\)'):
        EvalBN(4)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r'\(N, 4, \*\)'):
        EvalBN(4)(torch.randn(4))


@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_registry_resolution(scope):
    with DefaultScope.overwrite_default_scope(scope):
        name, layer = build_norm_layer(dict(type='EvalBN'), 4, postfix=1)
        assert name == 'bn1' and isinstance(layer, EvalBN)
        assert isinstance(MODELS.build(dict(type='EvalBN', num_features=3)), EvalBN)


def test_mmengine_sync_bn_conversion_keeps_it():
    """The trap: cfg.sync_bn makes mmengine's Runner replace every _BatchNorm by torch
    SyncBatchNorm. The plugin's layers survive it (mmdet_bnplug.patches.sync_bn_conversion):
    EvalBN stays EvalBN, frozen even in training mode without norm_eval.
    """
    from mmdet.models.backbones import ResNet
    from mmengine.runner.runner import convert_sync_batchnorm  # what the Runner calls
    model = ResNet(18, norm_cfg=dict(type='EvalBN'), norm_eval=False, out_indices=(3, ))
    for m in model.modules():
        if isinstance(m, EvalBN):
            random_state(m)
    x = torch.randn(1, 3, 64, 64)
    model.train()  # mmdet's ResNet.train returns None
    expected = model(x)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, 'torch')
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert sum(isinstance(m, EvalBN) for m in converted.modules()) == 20
    converted.train()
    torch.testing.assert_close(converted(x)[0], expected)
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k
