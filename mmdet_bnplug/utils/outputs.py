"""Comparing model outputs: the tensors of a nested output, relative differences."""
import torch


def output_tensors(out) -> list:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def relative_change(got, want) -> float:
    """``||got - want|| / ||want||`` over the tensors of two outputs, in float64
    (``inf`` when their structure or shapes differ)."""
    got, want = output_tensors(got), output_tensors(want)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float('inf')
    if not want:
        return 0.0
    got = torch.cat([t.detach().double().flatten() for t in got])
    want = torch.cat([t.detach().double().flatten() for t in want])
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
