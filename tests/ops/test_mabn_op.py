"""MABN's torch.library ops (mmdet_bnplug/ops/mabn.py): registered, described correctly
(``torch.library.opcheck``: schema mutations, fake implementation, autograd
registration, AOT dispatch), on both CPU implementations (the ``mabn_path`` fixture)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmdet_bnplug  # noqa: F401  (registers the ops)
from mmdet_bnplug.ops import mabn as mabn_ops

pytestmark = pytest.mark.usefixtures('one_thread')

OPS = ('mabn_train', 'mabn_train_stats', 'mabn_train_affine', 'mabn_train_backward')
HYPER = dict(eps=1e-5, momentum=0.1, r_max=1.5, warmup_iters=3, renorm_iters=5)
C, B = 3, 2


def test_ops_registered_in_the_namespace():
    for name in OPS:
        op = getattr(torch.ops.mmdet_bnplug, name).default
        assert isinstance(op, torch._ops.OpOverload)
    mutated = {name: [a.name for a in getattr(torch.ops.mmdet_bnplug, name).default._schema
                      .arguments if a.alias_info is not None and a.alias_info.is_write]
               for name in OPS}
    assert mutated == {
        'mabn_train': ['running_var', 'num_batches_tracked', 'buffer_x2'],
        'mabn_train_stats': ['running_var', 'num_batches_tracked', 'buffer_x2'],
        'mabn_train_affine': [],
        'mabn_train_backward': ['buffer_gz']}


def _state(dtype, t):
    """running_var, counter at ``t``, buffer_x2, buffer_gz (filled: the SMA is used)."""
    gen = torch.Generator().manual_seed(t)
    return (torch.rand(C, generator=gen, dtype=dtype) + 0.5,
            torch.tensor(t, dtype=torch.long),
            torch.rand(B, C, generator=gen, dtype=dtype),
            torch.rand(B, C, generator=gen, dtype=dtype))


def _hyper():
    return tuple(HYPER.values())


# t before the step: warm-up (batch statistics), SMA, SMA with renorm
PHASES = [0, 3, 9]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('t', PHASES)
def test_opcheck(mabn_path, dtype, affine, t):
    torch.manual_seed(t)
    x = torch.randn(2, C, 4, 3, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, C, 4, 3, dtype=dtype)
    w = torch.rand(C, dtype=dtype, requires_grad=True) + 0.5 if affine else None
    b = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
    if affine:
        w = w.detach().requires_grad_()
    rv, counter, bx, bg = _state(dtype, t)
    ops = torch.ops.mmdet_bnplug
    torch.library.opcheck(ops.mabn_train_stats.default,
                          (x.detach(), rv, counter, bx, *_hyper()))
    coeffs, step = ops.mabn_train_stats.default(x.detach(), rv, counter, bx, *_hyper())
    warmup = HYPER['warmup_iters']
    torch.library.opcheck(ops.mabn_train_affine.default,
                          (x, w, b, coeffs, step, bg, warmup))
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(ops.mabn_train_backward.default,
                              (dy, x.detach(), None if w is None else w.detach(), coeffs,
                               step, bg, warmup, mask))
    torch.library.opcheck(ops.mabn_train.default, (x, w, b, rv, counter, bx, bg, *_hyper()))


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_opcheck_channels_last_and_half(mabn_path, memory_format):
    """channels_last (the compiled affine's broadcast path) and a half input with fp32
    statistics (autocast)."""
    for dtype, stats in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        x = torch.randn(2, C, 4, 5, dtype=dtype).contiguous(memory_format=memory_format)
        x.requires_grad_()
        w = torch.rand(C, requires_grad=True)
        b = torch.randn(C, requires_grad=True)
        rv, counter, bx, bg = _state(stats, 9)
        torch.library.opcheck(torch.ops.mmdet_bnplug.mabn_train.default,
                              (x, w, b, rv, counter, bx, bg, *_hyper()))


def test_both_implementations_agree_float64():
    """The C++ kernels and the PyTorch implementation, op by op, through every phase."""
    def run(pytorch):
        torch.manual_seed(0)
        rv, counter, bx, bg = _state(torch.float64, 0)
        w = torch.rand(C, dtype=torch.float64, requires_grad=True)
        b = torch.randn(C, dtype=torch.float64, requires_grad=True)
        out = []
        with mabn_ops.pytorch_on_cpu() if pytorch else torch.autograd.set_grad_enabled(True):
            for _ in range(10):
                x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
                y, coeffs, step = mabn_ops.train(x, w, b, rv, counter, bx, bg, *_hyper())
                y.backward(torch.randn_like(y))
                out += [y.detach(), coeffs, step, x.grad, rv.clone(), bx.clone(), bg.clone()]
        return out + [w.grad, b.grad]

    for got, want in zip(run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_kernels_check_their_arguments():
    """Shapes, dtypes and layouts are checked in C++ with messages naming the op and the
    argument."""
    if mabn_ops.cpu_kernels is None:
        pytest.fail('the compiled CPU kernels are not built')
    x = torch.randn(2, C, 4, 4)
    rv, counter, bx, bg = _state(torch.float32, 5)
    stats = torch.ops.mmdet_bnplug.mabn_train_stats.default
    with pytest.raises(RuntimeError, match='mabn_train_stats: running_var must have shape'):
        stats(x, torch.ones(C, 1), counter, bx, *_hyper())
    with pytest.raises(RuntimeError, match='mabn_train_stats: buffer_x2 must be contiguous'):
        stats(x, rv, counter, torch.rand(C, B).t(), *_hyper())
    with pytest.raises(RuntimeError, match='num_batches_tracked must be an int64'):
        stats(x, rv, counter.double(), bx, *_hyper())
    with pytest.raises(RuntimeError, match=r'x must have shape \(N, 3, \*\)'):
        stats(torch.randn(2, 4, 3), rv, counter, bx, *_hyper())
    coeffs, step = stats(x, rv, counter, bx, *_hyper())
    with pytest.raises(RuntimeError, match='mabn_train_affine: coeffs must have the statistics'):
        torch.ops.mmdet_bnplug.mabn_train_affine.default(x, None, None, coeffs.double(), step,
                                                          bg, 3)
    with pytest.raises(RuntimeError, match="mabn_train_backward: dy must be a CPU tensor of x's"):
        torch.ops.mmdet_bnplug.mabn_train_backward.default(
            torch.randn(1, C, 4, 4), x, None, coeffs, step, bg, 3, [True, True, True])


def test_ops_write_only_their_declared_mutations_and_bump_versions(mabn_path):
    x = torch.randn(2, C, 4, 4, requires_grad=True)
    w, b = torch.rand(C, requires_grad=True), torch.randn(C, requires_grad=True)
    rv, counter, bx, bg = _state(torch.float32, 9)
    before = [t._version for t in (rv, counter, bx, bg)]
    bg0 = bg.clone()
    y, coeffs, step = mabn_ops.train(x, w, b, rv, counter, bx, bg, *_hyper())
    assert torch.equal(bg, bg0) and bg._version == before[3]  # the forward leaves it
    assert all(t._version > v for t, v in zip((rv, counter, bx), before[:3]))
    y.sum().backward()
    assert bg._version > before[3] and not torch.equal(bg, bg0)


class _Reads(TorchDispatchMode):
    """Counts tensor-to-Python reads (``.item()``, ``int()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += 'local_scalar_dense' in str(func)
        return func(*args, **(kwargs or {}))


def test_pytorch_implementation_never_reads_a_tensor_on_the_host():
    """The GPU path's implementation, watched from inside (a dispatch mode sees only
    the op itself when it calls it): its phase decisions are tensor ops."""
    x = torch.randn(2, C, 4, 4)
    w, b = torch.rand(C), torch.randn(C)
    rv, counter, bx, bg = _state(torch.float32, 0)
    with _Reads() as mode:
        for _ in range(12):  # warm-up, SMA, renorm
            coeffs, step = mabn_ops.train_stats_pytorch(x, rv, counter, bx, *_hyper())
            mabn_ops.train_affine_pytorch(x, w, b, coeffs, step, bg, 3)
            mabn_ops.train_backward_pytorch(torch.randn_like(x), x, w, coeffs, step, bg, 3,
                                            [True, True, True])
    assert mode.reads == 0 and counter.item() == 12


def test_fake_tensors_trace_a_training_step():
    """Under FakeTensorMode (what torch.compile and torch.export trace with) a step
    gives outputs of the right metadata without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.randn(2, C, 4, 4, requires_grad=True)
        w, b = torch.rand(C, requires_grad=True), torch.randn(C, requires_grad=True)
        rv, counter = torch.ones(C), torch.zeros((), dtype=torch.long)
        bx, bg = torch.zeros(B, C), torch.zeros(B, C)
        y, coeffs, step = mabn_ops.train(x, w, b, rv, counter, bx, bg, *_hyper())
        assert y.shape == x.shape and coeffs.shape == (2, C) and step.shape == ()
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == (C, )


WITHOUT_BUILD = r'''
import sys
sys.modules['mmdet_bnplug.ops._mabn_cpu'] = None  # as if the extension were not built
import warnings
import numpy as np
import torch
import mmdet_bnplug
from mmdet_bnplug.layers.mabn import MABN
from mmdet_bnplug.ops import mabn as mabn_ops
from mmdet_bnplug.testing.mabn_reference import SpecMABN
assert mabn_ops.cpu_kernels is None
warnings.simplefilter('ignore')
torch.set_num_threads(1)
hyper = (1e-5, 0.1, 1.5, 3, 5)
for dtype in (torch.float32, torch.float64):
    for affine in (True, False):
        x = torch.randn(2, 3, 4, 3, dtype=dtype, requires_grad=True)
        w = torch.rand(3, dtype=dtype, requires_grad=True) if affine else None
        b = torch.randn(3, dtype=dtype, requires_grad=True) if affine else None
        for t in (0, 9):
            state = (torch.ones(3, dtype=dtype), torch.tensor(t), torch.rand(2, 3, dtype=dtype),
                     torch.rand(2, 3, dtype=dtype))
            torch.library.opcheck(torch.ops.mmdet_bnplug.mabn_train.default,
                                  (x, w, b, *state, *hyper))
hp = dict(buffer_size=2, warmup_iters=3, renorm_iters=5, r_max=1.5, momentum=0.1, eps=1e-5)
layer, spec = MABN(3, **hp).double(), SpecMABN(3, **hp)
rng = np.random.default_rng(0)
for _ in range(12):
    x, dy = rng.standard_normal((2, 3, 4, 4)) * 2, rng.standard_normal((2, 3, 4, 4))
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    assert 'GeneratedBackwardFor' in y.grad_fn.name(), y.grad_fn.name()  # register_autograd
    y.backward(torch.tensor(dy))
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), spec.forward(x, w, b), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(xt.grad.numpy(), spec.backward(dy)[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.buffer_gz.numpy(), spec.buffer_gz, rtol=1e-9, atol=1e-9)
print('ok')
'''


def test_without_the_build_pytorch_implementation_and_python_autograd_rule():
    """Without the extension every CPU call runs the PyTorch implementation with the
    autograd rule of register_autograd: opcheck passes, and MABN still follows the
    float64 reference (a fresh process: the kernels register at import)."""
    import subprocess
    import sys

    from conftest import REPO
    result = subprocess.run([sys.executable, '-c', WITHOUT_BUILD], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]


@pytest.mark.filterwarnings('ignore')
def test_compile_fullgraph_and_export_trace_a_training_step():
    """torch.compile(fullgraph=True) (AOTAutograd, forward and backward) runs a training
    step through the ops exactly like eager; torch.export records it as one op."""
    from mmdet_bnplug.layers.mabn import MABN
    torch._dynamo.reset()
    hp = dict(buffer_size=2, warmup_iters=1, renorm_iters=2, r_max=1.5)
    eager, compiled = MABN(C, **hp), MABN(C, **hp)
    step = torch.compile(lambda x: compiled(x), backend='aot_eager', fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # warm-up, SMA, renorm
        x = torch.randn(2, C, 3, 3, generator=gen, requires_grad=True)
        xc = x.detach().clone().requires_grad_()
        y, yc = eager(x), step(xc)
        y.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(yc, y)
        torch.testing.assert_close(xc.grad, x.grad)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
    torch.testing.assert_close(compiled.weight.grad, eager.weight.grad)
    program = torch.export.export(MABN(C).train(), (torch.randn(2, C, 3, 3), ))
    targets = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
    assert 'mmdet_bnplug.mabn_train.default' in targets


STALE_BUILD = r'''
import sys, types, warnings
sys.modules['mmdet_bnplug.ops._mabn_cpu'] = types.ModuleType('_mabn_cpu')  # an old build
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import torch
    from mmdet_bnplug.ops import mabn as mabn_ops
assert mabn_ops.cpu_kernels is None
assert any('stale build' in str(w.message) for w in caught), [str(w.message) for w in caught]
from mmdet_bnplug.layers.mabn import MABN
MABN(2)(torch.randn(2, 2, 3, 3, requires_grad=True)).sum().backward()
print('ok')
'''


def test_a_stale_build_is_refused_loudly():
    """An extension from before the ops (e.g. an old editable install) registers no
    kernel: the package says so and runs the PyTorch implementation."""
    import subprocess
    import sys

    from conftest import REPO
    result = subprocess.run([sys.executable, '-c', STALE_BUILD], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]
