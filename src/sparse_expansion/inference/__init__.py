"""Inference: switch a model's layers to their measured fast paths (CPU sparse kernels, GPU 2:4)."""

from .accelerate import KERNEL_MODES, accelerate, force_sparse

__all__ = ["KERNEL_MODES", "accelerate", "force_sparse"]
