"""Narrow fixes for version quirks of the stack (torch >= 2.6 with mmengine 0.10.7)."""
