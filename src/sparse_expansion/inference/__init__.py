"""Inference-time kernels and their measurement."""
