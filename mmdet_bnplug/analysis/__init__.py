"""Inspection of a model's norm layers (behind tools/inspect_norms.py and the check hook)."""
