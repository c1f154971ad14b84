"""Fixtures of the benchmarks' own tests (the study machinery)."""
import pytest

from mmdet_bnplug.testing.threads import torch_threads


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP stalls on a busy machine."""
    with torch_threads(1):
        yield
