"""ONNX export at one fixed input shape (of any module, and of a detector with its norms
folded), onnxruntime sessions to run the result, and its errors against PyTorch."""
import contextlib
import copy
import logging
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ..transforms import fuse_norm_report
from .detector_tensors import DetectorTensors

# ONNX opset of the exported graphs; onnxruntime >= 1.14 runs it
OPSET = 18


@contextlib.contextmanager
def _quiet_exporter():
    """Silences what torch's exporter prints on every call without being about the model:
    torchvision's ops it skips (not installed) and a pytree deprecation warning."""
    registration = logging.getLogger('torch.onnx._internal.exporter._registration')
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*LeafSpec', category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def to_onnx(module: nn.Module, example: torch.Tensor, output_names, input_name='inputs'):
    """The ``onnx.ModelProto`` of ``module`` (put in eval mode) for inputs of
    ``example``'s shape and dtype (static shapes), by torch's dynamo exporter
    (``torch.export``, then onnxscript's translation and graph optimisation; opset
    :data:`OPSET`). Each node's ``metadata_props['pkg.torch.onnx.name_scopes']`` names
    the modules it came from."""
    module.eval()
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(module, (example, ), dynamo=True, opset_version=OPSET,
                                    input_names=[input_name], output_names=list(output_names),
                                    verbose=False)
    return program.model_proto


class DetectorExport(NamedTuple):
    """What :func:`export_detector` gives."""
    unfused: DetectorTensors  # the detector as it was, in eval mode
    folded: DetectorTensors  # a folded copy, in eval mode
    unfused_norms: dict  # {module name below ``folded``: why it is not folded}
    onnx_model: object  # onnx.ModelProto of ``folded``
    output_names: list


def export_detector(detector: nn.Module, shape, seed: int = 0) -> DetectorExport:
    """The tensor part of ``detector`` (:class:`DetectorTensors`) with every foldable norm
    folded into its conv, exported to ONNX for inputs of ``shape`` (N, C, H, W), float32.

    Folding is ``fuse_norm_report`` on a copy, each fold verified on a probe input of
    ``shape`` (standard normal, ``seed``) through the exported forward; ``detector``
    itself is unchanged (but put in eval mode)."""
    unfused = DetectorTensors(detector).eval()
    folded = DetectorTensors(copy.deepcopy(detector)).eval()
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    left = fuse_norm_report(folded, example_inputs=probe)
    example = torch.zeros(shape)
    names = folded.output_names(example)
    return DetectorExport(unfused, folded, left, to_onnx(folded, example, names), names)


def onnx_session(model, threads: int = 1):
    """An onnxruntime CPU session of ``model`` (a file path or serialised bytes) with
    ``threads`` intra-op threads, one inter-op thread, and idle threads that sleep rather
    than spin (so that they take no core from other work between runs)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(model, options, providers=['CPUExecutionProvider'])


def compare_outputs(session, module: nn.Module, inputs, names) -> list:
    """``[(output name, max abs error, max |PyTorch output|, relative error)]`` of the
    onnxruntime ``session`` against ``module`` (PyTorch, as it is: put it in eval mode)
    over ``inputs`` (tensors, the graph's input ``inputs``), in float64. Relative error =
    max abs error / max |PyTorch output| over all inputs (0 when both are 0, inf when
    only the PyTorch output is 0)."""
    errors, scales = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for x in inputs:
        got = session.run(list(names), {'inputs': x.numpy()})
        with torch.no_grad():
            want = module(x)
        for name, g, w in zip(names, got, want):
            w = w.double()
            diff = torch.from_numpy(g).double() - w
            errors[name] = max(errors[name], diff.abs().max().item())
            scales[name] = max(scales[name], w.abs().max().item())
    return [(name, errors[name], scales[name], errors[name] / scales[name] if scales[name]
             else float('inf') if errors[name] else 0.0) for name in names]
