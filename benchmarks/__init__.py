"""Benchmarks and studies; run from the repository root, e.g.
``python benchmarks/bench_norms.py`` (see docs/benchmarks.md)."""
