"""Switch a loaded model's pruned linear layers to the CPU sparse kernels (see sparse_linear.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch
from torch import nn

from ..models.discovery import discover, is_linear
from . import native
from .sparse_linear import MIN_SPARSITY, CSRWeight, SparseLinear, SwitchCache

log = logging.getLogger(__name__)

# auto: each layer takes the faster path as measured; always: the sparse kernel at every size (for checks);
# off: dense products only.
KERNEL_MODES = ("auto", "always", "off")
ALWAYS_SPARSE = [(2 ** 62, True)]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise).

    Converting thousands of expert matrices churns through many multi-MB temporaries; measured on a
    16-expert SmolLM2 model, glibc's heap then held 3 to 6 GB of freed memory.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _candidate(weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.float32 and weight.device.type == "cpu"
            and 1 - torch.count_nonzero(weight).item() / weight.numel() >= MIN_SPARSITY)


@torch.no_grad()
def enable_sparse_kernels(model: nn.Module, mode: str = "auto", cache: SwitchCache | None = None) -> dict:
    """Give every pruned fp32 CPU linear layer of the decoder blocks a measured sparse path.

    Returns a report: layers and expert matrices switched, those left dense, and the measured switch
    points per (rows, cols, density) group.
    """
    report = {"mode": mode, "available": False, "layers": 0, "experts": 0, "dense_layers": 0, "switch": {}}
    if mode == "off":
        return report
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r}")
    if not native.available():
        report["reason"] = native.unavailable_reason()
        return report
    report["available"] = True
    cache = cache or SwitchCache()

    def prepare(weight: torch.Tensor) -> CSRWeight:
        csr = CSRWeight(weight)
        if mode == "always":
            csr.switch = ALWAYS_SPARSE
        else:
            cache.apply(csr, weight)
        return csr

    layout = discover(model)
    for block in layout.blocks:
        for name, module in list(block.named_modules()):
            if not name or not is_linear(module):
                continue
            if getattr(module, "is_expert_linear", False):
                kernels = []
                for expert in module.weight:
                    csr = None
                    if _candidate(expert):
                        csr = prepare(expert)
                    kernels.append(csr)
                module.expert_kernels = kernels
                report["experts"] += sum(k is not None for k in kernels)
            elif type(module) is nn.Linear and _candidate(module.weight):
                csr = prepare(module.weight)
                block.set_submodule(name, SparseLinear(module, csr))
                report["layers"] += 1
            else:
                report["dense_layers"] += 1
        release_free_memory()
    for (rows, cols, density, _threads), rows_measured in cache.measured.items():
        report["switch"][f"{rows}x{cols}@{1 - density:.2f}"] = {
            "sparse_at_tokens": [t for t, faster, _, _ in rows_measured if faster],
            "dense_ms": [round(d * 1e3, 4) for _, _, d, _ in rows_measured],
            "sparse_ms": [round(s * 1e3, 4) for _, _, _, s in rows_measured],
        }
    log.info("sparse kernels: %d linear layers and %d expert matrices switched", report["layers"], report["experts"])
    return report


def force_sparse(model: nn.Module) -> None:
    """Make every layer with a CSR copy use the sparse kernel at every batch size."""
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.csr.switch = ALWAYS_SPARSE
        for kernel in getattr(module, "expert_kernels", None) or []:
            if kernel is not None:
                kernel.switch = ALWAYS_SPARSE


def accelerate(model: nn.Module, mode: str = "auto") -> dict:
    """The sparse path that fits the model's device: CSR kernels on the CPU, 2:4 semi-structured on CUDA."""
    if mode != "off" and next(model.parameters()).device.type == "cuda":
        from .semi_structured import enable_semi_structured

        report = enable_semi_structured(model)
        return {"mode": mode, "available": report["supported"], "layers": report["converted"], "experts": 0,
                "switch": {}, "semi_structured": report}
    return enable_sparse_kernels(model, mode)
