"""Inference: CPU sparse kernels with a measured dense fallback, the GPU 2:4 path, speed measurements."""

from .sparse_model import accelerate, enable_sparse_kernels

__all__ = ["accelerate", "enable_sparse_kernels"]
