"""Smoke runs of the benchmark scripts on tiny inputs: they run, and their reports are
complete and consistent. No time is asserted (timings on a shared machine are noise)."""
import math

import pytest

from conftest import run_tool

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def tables(markdown):
    """Heading (without '#') -> {first cell -> the other cells} for each markdown table."""
    found, heading = {}, None
    for line in markdown.splitlines():
        if line.startswith('#'):
            heading = line.lstrip('#').strip()
        elif line.startswith('|') and not line.startswith('| ---'):
            cells = [c.strip() for c in line.strip('|').split('|')]
            found.setdefault(heading, {})[cells[0]] = cells[1:]
    return found


def table(found, prefix):
    """The one table whose heading starts with ``prefix``."""
    matches = [rows for heading, rows in found.items() if heading.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(found))
    return matches[0]


def run_benchmark(tmp_path, module, *args):
    md, png = tmp_path / 'report.md', tmp_path / 'plot.png'
    proc = run_tool(['-m', f'benchmarks.{module}', '--quick', '--threads', '1',
                     '--out-md', str(md), '--out-png', str(png), *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = md.read_text()
    assert text in proc.stdout  # printed too
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) < 200_000
    return tables(text)


def positive(cell):
    value = float(cell)
    assert math.isfinite(value) and value > 0, cell
    return value


def test_bench_norms_quick(tmp_path):
    found = run_benchmark(tmp_path, 'bench_norms', '--max-numel', '50000')
    summary = table(found, 'Summary')
    layers = ['MABN', 'MABN PyTorch step', 'MABN naive', 'BN eval', 'EvalBN', 'BN eval frozen',
              'EvalBN frozen', 'PortableSyncBN', 'FrozenBN', 'GroupNorm', 'PortableSyncBN x2']
    assert list(summary) == ['layer'] + layers
    for layer in layers:  # fwd+bwd, eval forward, memory: median and worst
        cells = summary[layer]
        for cell in cells[:2] + cells[4:]:
            positive(cell)
        if layer in ('MABN PyTorch step', 'BN eval', 'BN eval frozen', 'EvalBN frozen',
                     'PortableSyncBN x2'):
            assert cells[2:4] == ['-', '-']  # its eval forward is another entry's
        else:
            positive(cells[2]), positive(cells[3])
    held = table(found, 'EvalBN against')
    for name in ('EvalBN / BN eval', 'EvalBN frozen / BN eval frozen',
                 'EvalBN frozen / BN eval'):
        assert all(positive(c) for c in held[name])
    assert len(table(found, 'Targets')) == 1 + 4
    for prefix in ('fwd+bwd time', 'eval forward time', 'peak memory'):
        assert list(table(found, prefix))[1:] == ['P7']
    # 1-process PortableSyncBN is plain BN's kernel: the same memory, plus the per-channel
    # copies of the running statistics its non-finite guard updates
    memory = table(found, 'peak memory')
    assert float(memory['P7'][memory['shape'].index('PortableSyncBN')]) <= 1.01
    sync = table(found, 'PortableSyncBN on 2')['P7']
    assert sync[0] == '2x256x7x11' and sync[-1] == '1+1'
    positive(sync[1]), positive(sync[2]), positive(sync[3])


def test_bench_norms_compiled_quick(tmp_path):
    found = run_benchmark(tmp_path, 'bench_norms', '--max-numel', '50000', '--only', 'MABN',
                          'EvalBN', '--compiled', '--sync-procs', '0')
    summary = table(found, 'torch.compile: compiled')
    assert list(summary) == ['layer', 'BatchNorm2d', 'MABN', 'EvalBN']
    for layer in ('BatchNorm2d', 'MABN', 'EvalBN'):  # median, worst, best
        cells = summary[layer]
        median, worst, best = map(positive, cells)
        assert best <= median <= worst
    per_shape = table(found, 'torch.compile per shape')
    assert per_shape['shape'][1:] == ['BatchNorm2d', 'MABN', 'EvalBN']
    assert [positive(c) for c in per_shape['P7'][1:]]


def test_bench_toy_quick(tmp_path):
    found = run_benchmark(tmp_path, 'bench_toy')
    train = table(found, 'Training iteration')
    assert list(train)[1:] == ['BN', 'EvalBN', 'EvalBN frozen', 'ConvWC+MABN',
                               'PortableSyncBN', 'GN', 'BN x2 (DDP)',
                               'PortableSyncBN x2 (DDP)']
    for variant, (ms, ratio, loss) in list(train.items())[1:]:
        positive(ms), positive(ratio), positive(loss)
    assert train['BN'][1] == train['BN x2 (DDP)'][1] == '1.000'
    infer = table(found, 'Inference')
    assert list(infer)[1:] == ['BN', 'EvalBN', 'EvalBN frozen', 'ConvWC+MABN',
                               'PortableSyncBN']  # GN does not fold
    for variant, cells in list(infer.items())[1:]:
        unfused, fused, r_unfused, r_fused, speedup, diff, scale, left = cells
        for cell in (unfused, fused, r_unfused, r_fused, speedup, scale):
            positive(cell)
        assert float(diff) <= 1e-5 * float(scale), (variant, diff, scale)  # exact fold
        assert left == '0'


def test_bench_export_quick(tmp_path):
    out = tmp_path / 'report.md'
    proc = run_tool(['-m', 'benchmarks.bench_export', '--quick', '--out', str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout
    found = tables(text)
    variants = ['BN', 'ConvWC+MABN', 'EvalBN', 'PortableSyncBN', 'GN']
    summary = table(found, 'Summary')
    assert list(summary) == ['variant'] + variants and summary['BN'] == ['1.000']
    rows = table(found, '1x3x64x64, 1 thread')
    assert list(rows)[1:] == variants
    for variant in variants:
        nodes, *times, error = rows[variant]
        assert nodes == ('20' if variant == 'GN' else '0')  # GN: one per layer, unfolded
        assert all(positive(cell) for cell in times)
        assert float(error) <= 1e-4


if __name__ == '__main__':
    pytest.main([__file__, '-q'])
