"""Helpers for tests, benchmarks and demos: the synthetic dataset, the gloo launcher,
the float64 MABN reference."""
