"""Support for ``benchmarks/det_small_batch_study.py`` (the detection small-batch study)."""
