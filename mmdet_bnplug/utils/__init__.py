"""Small helpers shared by the layers, transforms and analysis."""
