"""The detection study's plots, from made-up records (no training): one colour per row
or variant, the same in every plot, and every plot written."""
import benchmarks.det_small_batch_study as study


def _curve(n=4, stale=True):
    curve = dict(iter=list(range(1, n + 1)), loss=[1.0] * n, grad_norm=[2.0, None, 3.0, 4.0])
    if stale:
        curve['stale_bwd'] = [1.0] * (n - 1)
    return curve


def _record(row, seed, m):
    spec = study.ROWS[row]
    return dict(row=row, seed=seed, recipe='adamw', ref_iters=600, bbox_mAP=m,
                bbox_mAP_50=m, norm=spec['norm'], where=spec['where'],
                images_per_gpu=spec['images_per_gpu'], processes=spec['processes'],
                iters=4, images_seen=4 * spec['images_per_gpu'] * spec['processes'],
                train_seconds=1.0, max_grad_norm=4.0, curve=_curve())


def test_one_distinct_colour_per_row_whatever_rows_are_plotted():
    every = study.colours(study.ROWS, study.ROWS)
    assert len(set(every.values())) == len(study.ROWS)
    assert study.colours(['gn2', 'bn8'], study.ROWS) == {'gn2': every['gn2'],
                                                          'bn8': every['bn8']}
    unknown = study.colours(['bn8', 'a_new_row'], study.ROWS)
    assert unknown['a_new_row'] != unknown['bn8']
    variants = study.colours(study.DIAG_ROWS, study.DIAG_ROWS)
    assert len(set(variants.values())) == len(study.DIAG_ROWS)


def test_the_plots_are_written(tmp_path):
    args = study.parse_args(['--img-dir', str(tmp_path), '--out-md', str(tmp_path / 'r.md'),
                             '--diag-json', str(tmp_path / 'diag.json')])
    records = [_record('bn8', 0, 0.44), _record('bn8', 1, 0.46), _record('bn2', 0, 0.37),
               _record('evalbn2', 0, 0.5), _record('gn2', 0, 0.6)]
    study.write_report(args, records)
    diag = [dict(_record('mabn2', s, 0.0), variant=v, label=v,
                 curve=_curve(stale=v != 'batch_stats'), final_loss=1.0)
            for v in ('full', 'batch_stats') for s in (0, 1)]
    study.write_diag_report(args, diag)
    for name in ('map', 'curves', 'diagnosis'):
        assert (tmp_path / f'det_small_batch_study_{name}.png').stat().st_size > 0
    assert '| evalbn2 |' in (tmp_path / 'r.md').read_text()
