"""MABN's contract beyond the spec's arithmetic: inputs, dtypes, state, registry,
conversion to and from BN, activation checkpointing, no host-device sync; on both CPU
training paths (compiled and PyTorch: the ``mabn_path`` fixture)."""
import contextlib
import copy
import io
import warnings

import pytest
import torch
from mmcv.cnn import build_norm_layer
from mmengine.registry import DefaultScope
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import mmdet_bnplug  # noqa: F401  (registers the layers)
from mmdet_bnplug.layers.conv_wc import ConvWC
from mmdet_bnplug.layers.mabn import MABN

pytestmark = pytest.mark.usefixtures('one_thread', 'mabn_path')  # tiny tensors

QUICK = dict(buffer_size=2, warmup_iters=3, renorm_iters=5, r_max=1.5)


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('kwargs, name', [
    (dict(buffer_size=0), 'buffer_size'), (dict(buffer_size=2.0), 'buffer_size'),
    (dict(warmup_iters=-1), 'warmup_iters'), (dict(renorm_iters=-3), 'renorm_iters'),
    (dict(r_max=0.5), 'r_max'), (dict(momentum=0.0), 'momentum'),
    (dict(momentum=1.5), 'momentum'), (dict(momentum=None), 'momentum'),
    (dict(eps=0.0), 'eps'), (dict(num_features=0), 'num_features')])
def test_bad_hyper_parameters_name_the_parameter(kwargs, name):
    kwargs = {'num_features': 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        MABN(**kwargs)


def test_bad_input_is_refused_clearly():
    layer = MABN(4)
    with pytest.raises(ValueError, match='rank >= 2'):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match='num_features'):
        layer(torch.randn(2, 3, 5, 5))
    assert layer.num_batches_tracked.item() == 0


def test_momentum_is_pytorch_sense():
    layer = MABN(2, momentum=0.25)
    x = torch.full((1, 2, 1, 1), 3.0)  # second moment 9
    layer(x)
    torch.testing.assert_close(layer.running_var, torch.full((2, ), 0.75 * 1 + 0.25 * 9))
    assert MABN(2).momentum == 0.02  # the paper's 0.98 decay


def test_zero_size_batch_changes_no_state():
    layer = MABN(3, **QUICK).train()
    for _ in range(7):
        layer(torch.randn(2, 3, 4, 4)).sum().backward()
    before = _state(layer)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    _assert_same_state(before, _state(layer))


def test_batch_one_with_one_pixel():
    layer = MABN(3).train()
    x = torch.randn(1, 3, 1, 1, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    # a single value per channel normalised by its own second moment
    xd = x.detach()
    torch.testing.assert_close(y, xd / (xd**2 + layer.eps).sqrt())
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):  # where BN gives up
        nn.BatchNorm2d(3).train()(x)


def test_channels_last_kept_and_same_values():
    torch.manual_seed(0)
    a, b = MABN(4, **QUICK), MABN(4, **QUICK)
    for _ in range(8):
        x = torch.randn(2, 4, 5, 6)
        dy = torch.randn(2, 4, 5, 6)
        xa = x.clone().requires_grad_()
        xb = x.to(memory_format=torch.channels_last).requires_grad_()
        ya, yb = a(xa), b(xb)
        ya.backward(dy)
        yb.backward(dy.to(memory_format=torch.channels_last))
        assert yb.is_contiguous(memory_format=torch.channels_last)
        assert xb.grad.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(a.buffer_gz, b.buffer_gz)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_statistics_fp32_output_in_input_dtype(dtype):
    torch.manual_seed(0)
    conv = ConvWC(3, 4, 3, padding=1, bias=False)
    layer, ref = MABN(4, **QUICK), MABN(4, **QUICK)
    for _ in range(8):  # through warm-up, SMA and renorm
        x = torch.randn(2, 3, 8, 8)
        with torch.autocast('cpu', dtype=dtype):
            h = conv(x)
            y = layer(h)
        assert h.dtype == y.dtype == dtype
        y.float().square().sum().backward()
        hr = h.detach().float().requires_grad_()
        ref(hr).square().sum().backward()  # same half-precision input, all in fp32
    for name in ('running_var', 'buffer_x2', 'buffer_gz'):
        got, want = getattr(layer, name), getattr(ref, name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=1e-3)
    assert layer.weight.grad.dtype == torch.float32


def test_fp16_second_moment_does_not_overflow():
    layer = MABN(2)
    x = torch.full((2, 2, 4, 4), 300.0, dtype=torch.float16, requires_grad=True)
    y = layer(x)  # x^2 = 90000 > fp16 max 65504
    y.sum().backward()
    torch.testing.assert_close(layer.buffer_x2[1], torch.full((2, ), 90000.0))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.float(), torch.ones_like(y, dtype=torch.float32))


def test_half_module_without_autocast():
    layer = MABN(3, **QUICK).half()
    for _ in range(7):
        x = torch.randn(2, 3, 4, 4, dtype=torch.float16, requires_grad=True)
        y = layer(x)
        y.float().square().sum().backward()
        assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == torch.float16
    assert layer.buffer_gz.dtype == torch.float16 and torch.isfinite(layer.buffer_gz).all()
    layer.eval()
    assert layer(x).dtype == torch.float16


def test_eval_never_touches_state():
    layer = MABN(3, **QUICK)
    for _ in range(6):
        layer(torch.randn(2, 3, 4, 4)).sum().backward()
    before = _state(layer)
    layer.eval()
    layer(torch.randn(2, 3, 4, 4))
    _assert_same_state(before, _state(layer))


def test_no_grad_training_forward_still_advances():
    layer = MABN(3)
    with torch.no_grad():
        layer(torch.randn(2, 3, 4, 4))
    assert layer.num_batches_tracked.item() == 1
    assert layer.buffer_x2[1].abs().sum() > 0


class _Ops(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_host_sync_per_step(mabn_path):
    """No tensor-to-Python read (``.item()``, ``int()``, ``bool()``) per step, on either
    implementation: the compiled CPU kernels read the counter in C++ (a plain memory
    read on CPU, never by a tensor op), the PyTorch implementation (the GPU path) never
    reads it: its phase decisions are tensor ops (test_pytorch_implementation_never_
    reads_a_tensor_on_the_host in tests/ops/test_mabn_op.py watches inside it)."""
    reads = 0
    layer = MABN(3, **QUICK)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with _Ops() as ops:
        layer(x).sum().backward()
    assert sum('_local_scalar_dense' in n for n in ops.names) == reads
    with _Ops() as ops:
        for _ in range(10):  # through SMA and renorm
            layer(x).sum().backward()
    assert not [n for n in ops.names if '_local_scalar_dense' in n or 'item' in n]
    # someone else writes the counter: the layer follows it
    layer.load_state_dict(layer.state_dict())
    with _Ops() as ops:
        layer(x).sum().backward()
    assert sum('_local_scalar_dense' in n for n in ops.names) == reads
    assert layer.num_batches_tracked.item() == 12


def test_cpu_training_runs_the_path_under_test(mabn_path):
    """The kernel that runs on CPU is the one under test: the CPU key's kernel of the
    ops is the C++ one, or the PyTorch implementation inside pytorch_on_cpu()."""
    from mmdet_bnplug.ops import mabn as mabn_ops
    calls, impls = [], mabn_ops.PYTORCH_IMPLS
    saved = dict(impls)
    for name, real in saved.items():
        impls[name] = lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a)
    try:  # (re-entered, so that the recording implementations are the registered ones)
        with mabn_ops.pytorch_on_cpu() if mabn_path == 'pytorch' else _nothing():
            y = MABN(3)(torch.randn(2, 3, 4, 4, requires_grad=True))
            y.sum().backward()
    finally:
        impls.update(saved)
    expect = ['mabn_train_stats', 'mabn_train_affine', 'mabn_train_backward']
    assert calls == (expect if mabn_path == 'pytorch' else [])
    assert 'mabn_train_affine' in str(mabn_ops.train_affine)


@contextlib.contextmanager
def _nothing():
    yield


def test_both_paths_share_their_state():
    """Switching implementations mid-training (e.g. moving a CPU-trained model to a GPU)
    continues the same run: every statistic lives in the buffers. Float64: the two
    implementations round differently only in the last bits."""
    from mmdet_bnplug.ops import mabn as mabn_ops

    def run(paths):
        torch.manual_seed(0)
        layer = MABN(3, **QUICK).double()
        gen = torch.Generator().manual_seed(1)
        out = []
        for use_compiled in paths:
            with _nothing() if use_compiled else mabn_ops.pytorch_on_cpu():
                x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64,
                                requires_grad=True)
                y = layer(x)
                y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64))
            out += [y.detach(), x.grad, *[v.clone() for v in layer.state_dict().values()]]
        return out

    mixed = run([i % 3 == 0 for i in range(12)])  # warm-up, SMA, renorm
    for got, want in zip(mixed, run([False] * 12)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_deepcopy_and_pickle_continue_identically():
    """EMA hooks deepcopy the model, ``torch.save(model)`` pickles it: the copies train
    on exactly like the original."""
    layer = MABN(3, **QUICK)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(12)]
    for x in batches[:6]:
        layer(x).sum().backward()
    blob = io.BytesIO()
    torch.save(layer, blob)
    blob.seek(0)
    copies = [copy.deepcopy(layer), torch.load(blob, weights_only=False)]
    for x in batches[6:]:  # on into SMA and renorm
        outs = []
        for m in [layer, *copies]:
            xm = x.clone().requires_grad_()
            y = m(xm)
            y.backward(torch.ones_like(y))
            outs.append((y, xm.grad))
        for y, dx in outs[1:]:
            assert torch.equal(y, outs[0][0]) and torch.equal(dx, outs[0][1])
    for m in copies:
        _assert_same_state(_state(layer), _state(m))


class _Block(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv1 = ConvWC(3, 4, 3, padding=1, bias=False)
        self.bn1 = MABN(4, **QUICK)
        self.conv2 = ConvWC(4, 4, 3, padding=1, bias=False)
        self.bn2 = MABN(4, **QUICK)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize('use_reentrant', [True, False])
def test_activation_checkpointing_runs_each_step_once(use_reentrant):
    """The forward that checkpointing re-runs in the backward reuses the step's
    statistics and changes no state: identical to running without checkpointing."""
    torch.manual_seed(0)
    plain = _Block()
    ckpt = _Block()
    ckpt.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    for _ in range(9):  # warm-up, SMA, renorm
        x = torch.randn(2, 3, 6, 6, generator=gen, requires_grad=True)
        xc = x.detach().clone().requires_grad_()
        y = plain(x)
        yc = checkpoint(ckpt, xc, use_reentrant=use_reentrant)
        assert torch.equal(y, yc)
        dy = torch.randn(y.shape, generator=gen)
        y.backward(dy)
        yc.backward(dy)
        assert torch.equal(x.grad, xc.grad)
        for (n, p), pc in zip(plain.named_parameters(), ckpt.parameters()):
            assert torch.equal(p.grad, pc.grad), n
        _assert_same_state(_state(plain), _state(ckpt))
    assert ckpt.bn1.num_batches_tracked.item() == 9


@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_registered_in_root_models(scope):
    import mmdet.models  # noqa: F401  (mmdet's registry, as in a detector config)
    with DefaultScope.overwrite_default_scope(scope):
        name, layer = build_norm_layer(dict(type='MABN', buffer_size=4, momentum=0.1),
                                       8, postfix=1)
    assert name == 'bn1' and isinstance(layer, MABN)
    assert layer.buffer_size == 4 and layer.momentum == 0.1 and layer.eps == 1e-5
    _, frozen = build_norm_layer(dict(type='MABN', requires_grad=False), 8)
    assert not any(p.requires_grad for p in frozen.parameters())


def _random_bn(c=5, cls=nn.BatchNorm2d):
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.normal_(0, 2)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize('bn_cls', ['BatchNorm2d', 'FrozenBN'])
def test_from_batchnorm_is_eval_exact(bn_cls):
    if bn_cls == 'FrozenBN':
        from mmdet.models.layers.brick_wrappers import FrozenBatchNorm2d as cls
    else:
        cls = nn.BatchNorm2d
    bn = _random_bn(cls=cls).double()
    layer = MABN.from_batchnorm(bn, buffer_size=4).eval()
    assert layer.buffer_size == 4 and layer.num_batches_tracked.item() == 0
    assert layer.running_var.dtype == torch.float64
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-12, atol=1e-12)
    # the stated mapping
    mean, var, eps = bn.running_mean, bn.running_var, bn.eps
    torch.testing.assert_close(layer.running_var, var + mean**2)
    torch.testing.assert_close(layer.weight.detach(),
                               bn.weight * ((var + mean**2 + eps) / (var + eps)).sqrt())
    torch.testing.assert_close(layer.bias.detach(), bn.bias - bn.weight * mean /
                               (var + eps).sqrt())


def test_batchnorm_state_is_eval_exact():
    layer = MABN(5, **QUICK)
    for _ in range(8):
        layer(torch.randn(2, 5, 3, 3) * 2 + 1).sum().backward()
    layer.eval()
    bn = nn.BatchNorm2d(5).eval()
    bn.load_state_dict(layer.batchnorm_state(), strict=True)
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(bn(x), layer(x))
    assert torch.equal(layer.running_mean, torch.zeros(5))


def test_loads_a_batchnorm_state_dict_eval_exactly():
    bn = _random_bn()
    bn.num_batches_tracked.fill_(1234)
    layer = MABN(5, **QUICK)
    with pytest.warns(UserWarning, match='eval-exact'):
        layer.load_state_dict(bn.state_dict(), strict=True)
    layer.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    assert layer.num_batches_tracked.item() == 0  # a fresh warm-up
    assert not layer.buffer_x2.any() and not layer.running_mean.any()
    with warnings.catch_warnings():  # its own state dict loads as is
        warnings.simplefilter('error')
        MABN(5, **QUICK).load_state_dict(layer.state_dict(), strict=True)


@pytest.mark.filterwarnings('ignore:torch.utils.checkpoint')
def test_mmdet_resnet_with_cp_advances_once_per_step():
    from mmdet.registry import MODELS
    backbone = MODELS.build(
        dict(type='ResNet', depth=18, out_indices=(3, ), with_cp=True, norm_eval=False,
             init_cfg=None,
             conv_cfg=dict(type='ConvWC'), norm_cfg=dict(type='MABN', **QUICK)))
    backbone.train()
    for _ in range(3):
        backbone(torch.randn(1, 3, 32, 32))[0].sum().backward()
    counts = {m.num_batches_tracked.item() for m in backbone.modules()
              if isinstance(m, MABN)}
    assert counts == {3}
