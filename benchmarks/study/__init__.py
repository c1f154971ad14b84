"""The small-batch study (``benchmarks/small_batch_study.py``): data, model, runs, report."""
