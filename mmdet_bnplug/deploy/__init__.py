"""Deployment: a detector's tensor part as one module, its ONNX export with the norms
folded, and the normalisation an ONNX graph still computes. onnx, onnxscript and
onnxruntime (the ``deploy`` extra) are imported only by the functions that use them."""
from .detector_tensors import DetectorTensors
from .onnx_export import DetectorExport, compare_outputs, export_detector, onnx_session, to_onnx
from .onnx_norms import NORM_OPS, norm_nodes

__all__ = ['DetectorExport', 'DetectorTensors', 'NORM_OPS', 'compare_outputs', 'export_detector',
           'norm_nodes', 'onnx_session', 'to_onnx']
