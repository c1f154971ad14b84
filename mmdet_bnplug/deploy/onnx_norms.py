"""The normalisation an ONNX graph still computes: norm operators, and normalisations
decomposed into elementary operators, with the module each came from."""
import ast

# ONNX operators that normalise their input
NORM_OPS = ('BatchNormalization', 'GroupNormalization', 'InstanceNormalization',
            'LayerNormalization')
DECOMPOSED = 'ReduceMean->Sub'  # x - mean(x): the centring step of a decomposed norm
_SCOPES = 'pkg.torch.onnx.name_scopes'


def _module(node, module_names):
    """The innermost of ``module_names`` among the node's name scopes (the modules that
    torch's dynamo exporter records it under), or None."""
    props = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(props[_SCOPES]) if _SCOPES in props else []
    return next((s for s in reversed(scopes) if s in module_names), None)


def norm_nodes(model, module_names=()) -> list:
    """``[(node name, kind, module name or None)]`` for each normalisation in the main
    graph of ``model`` (an ``onnx.ModelProto``), in graph order.

    kind: the operator type for :data:`NORM_OPS`; :data:`DECOMPOSED` for a ``ReduceMean``
    whose output is subtracted from its own input (``Sub(x, ReduceMean(x))``), the
    centring that a decomposed BN/GN/LN/IN starts with (then Pow or Mul, ReduceMean, Add
    eps, Sqrt, Div). ``module_names``: names of the exported module's submodules.
    """
    names = set(module_names)
    means = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == 'ReduceMean'}
    found = []
    for node in model.graph.node:
        if node.op_type in NORM_OPS:
            found.append((node.name, node.op_type, _module(node, names)))
        elif node.op_type == 'Sub' and len(node.input) == 2 and \
                means.get(node.input[1]) == node.input[0]:
            found.append((node.name, DECOMPOSED, _module(node, names)))
    return found
