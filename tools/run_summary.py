"""The one line a training or evaluation run ends with: metrics, iterations, wall time."""
import time

from mmengine.hooks import Hook

HEADLINE = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP')


class RunSummaryHook(Hook):
    """Keeps the metrics of the last validation of a training run."""

    priority = 'LOWEST'

    def __init__(self):
        self.metrics = {}
        self.start = time.monotonic()

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics or {})


def summary_line(what, metrics, seconds, iters=None, score_thr=None) -> str:
    """``what: coco/bbox_mAP=0.771, coco/bbox_mAP_50=0.987; 1500 iterations, 5.2 min``,
    or why there is no metric (an untrained detector has no box above ``score_thr``)."""
    shown = [f'{k}={metrics[k]:.3f}' for k in HEADLINE if k in metrics]
    if not shown:
        shown = [f'{k}={v}' for k, v in metrics.items() if isinstance(v, (int, float))][:3]
    if not shown:
        why = 'no metric: no detection passed the test score threshold'
        if score_thr is not None:
            why += (f' (model.test_cfg.score_thr={score_thr}); a detector trained for a '
                    'few iterations scores about its prior, add --cfg-options '
                    'model.test_cfg.score_thr=0 for a smoke run')
        shown = [why]
    length = f'{iters} iterations, ' if iters is not None else ''
    return f'{what}: {", ".join(shown)}; {length}{seconds / 60:.1f} min'
