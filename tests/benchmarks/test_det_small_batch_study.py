"""Smoke test of the detection small-batch study (benchmarks/det_small_batch_study.py):
the script, run as a subprocess on its --tiny setting (a 16-image dataset, a few
iterations), trains and evaluates one MABN run through tools/train.py and tools/test.py
and writes its records, markdown table and plots. Structure only: no timing, no accuracy.
"""
import json
import os.path as osp
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TYPES = dict(norm=str, where=str, images_per_gpu=int, processes=int, seed=int, iters=int,
             bbox_mAP=float, bbox_mAP_50=float)


def _run(tmp_path, *extra):
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'benchmarks.det_small_batch_study', '--tiny',
           '--only', 'mabn2', '--seeds', '0', '--threads', '1',
           '--data-root', str(tmp_path / 'data'),
           '--work-root', str(tmp_path / 'work_dirs'), '--out-json', str(out / 'r.json'),
           '--out-md', str(out / 'r.md'), '--img-dir', str(out / 'img'), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_tiny_study_writes_records_table_and_plots(tmp_path):
    out, _ = _run(tmp_path)
    records = json.loads((out / 'r.json').read_text())
    assert isinstance(records, list) and len(records) == 1
    rec = records[0]
    for key, typ in TYPES.items():
        assert isinstance(rec[key], typ), (key, rec[key])
    assert (rec['norm'], rec['where'], rec['images_per_gpu'], rec['processes'],
            rec['seed']) == ('MABN', 'backbone', 2, 1, 0)
    assert 0.0 <= rec['bbox_mAP'] <= 1.0 and 0.0 <= rec['bbox_mAP_50'] <= 1.0
    assert rec['curve']['iter'] and len(rec['curve']['loss']) == len(rec['curve']['iter'])
    md = (out / 'r.md').read_text()
    assert '| row | norm | where |' in md and '| mabn2 | MABN | backbone |' in md
    assert (out / 'img' / 'det_small_batch_study_tiny_map.png').stat().st_size > 0
    assert (out / 'img' / 'det_small_batch_study_tiny_curves.png').stat().st_size > 0
    # each run in its own work dir, the run config written there
    assert osp.isfile(tmp_path / 'work_dirs' / 'adamw' / 'mabn2_s0' / 'mabn2_s0.py')
    # resumable: the recorded run is skipped on a second invocation (report only)
    _, stdout = _run(tmp_path)
    assert 'recorded, skipped' in stdout
    assert len(json.loads((out / 'r.json').read_text())) == 1
