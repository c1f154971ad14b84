"""A pytest plugin for test_gpu_check.py (``-p cuda_skips_plugin``, this directory on
PYTHONPATH): at the end of collection it writes to the JSON file named by
``$CUDA_SKIPS_OUT`` the node ids pytest selected and those of every collected test,
selected or deselected, that would be skipped for lack of CUDA on this machine."""
import json
import os
import re

# pytest's own evaluation of skip/skipif marks, as at the start of a test run
from _pytest.skipping import evaluate_skip_marks

CUDA = re.compile(r'cuda|gpu', re.I)
_deselected = []


def pytest_deselected(items):
    _deselected.extend(items)


def pytest_collection_finish(session):
    skips = {item.nodeid: evaluate_skip_marks(item) for item in [*session.items, *_deselected]}
    with open(os.environ['CUDA_SKIPS_OUT'], 'w') as f:
        json.dump(dict(selected=[item.nodeid for item in session.items],
                       cuda_skipped=[nodeid for nodeid, skip in skips.items()
                                     if skip and CUDA.search(skip.reason)]), f)
