"""Compiled kernels of the layers (built by setup.py)."""
