"""Benchmarks and studies; run from the repository root, e.g.
``python -m benchmarks.bench_norms`` (see docs/benchmarks.md)."""
