"""Switch a loaded model's layers to their faster forms: each layer kind decides (layers/protocol.py).

On the CPU, pruned fp32 linear layers and the experts of expanded layers get CSR copies for the native
kernels; on CUDA, 2:4 fp16/bf16 linear layers get semi-structured copies. Every accelerated path is used
only for the shapes and token counts where it measured faster than dense (layers/switch.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..kernels import native
from ..layers import SparseLinear
from ..layers.expert_linear import RoutedExperts
from ..layers.protocol import AccelerateContext, kind_of
from ..layers.switch import ALWAYS, SwitchCache
from ..models.discovery import discover
from ..runtime import release_memory

log = logging.getLogger(__name__)

# auto: each layer takes the faster path as measured; always: the accelerated path at every size (for
# checks); off: dense products only.
KERNEL_MODES = ("auto", "always", "off")


@torch.no_grad()
def accelerate(model: nn.Module, mode: str = "auto", cache: SwitchCache | None = None) -> dict:
    """Give every layer of the decoder blocks its measured fast path; returns what was switched.

    Report: `layers` (linear layers converted), `experts` (expert matrices with a CSR copy),
    `dense_layers` (linear layers left as they are), `switch` (per measured shape: the token counts where
    the fast path won, and both times).
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r}")
    report = {"mode": mode, "available": False, "layers": 0, "experts": 0, "dense_layers": 0, "switch": {}}
    if mode == "off":
        return report
    on_cuda = next(model.parameters()).device.type == "cuda"
    cpu_kernels = not on_cuda and native.available()
    if not on_cuda and not cpu_kernels:
        report["reason"] = native.unavailable_reason()
        return report
    report["available"] = True
    context = AccelerateContext(mode=mode, switches=cache or SwitchCache(), cpu_kernels=cpu_kernels)
    for block in discover(model).blocks:
        for name, module in list(block.named_modules()):
            kind = kind_of(module)
            if not name or kind is None or not kind.linear:
                continue
            new = kind.accelerate(module, context)
            if isinstance(module, RoutedExperts):
                kernels = [getattr(module, "shared_kernel", None), *(module.expert_kernels or [])]
                report["experts"] += sum(k is not None for k in kernels)
            elif new is not module:
                block.set_submodule(name, new)
                report["layers"] += 1
            else:
                report["dense_layers"] += 1
        release_memory()
    report["switch"] = context.switches.summary()
    log.info("accelerate: %d linear layers and %d expert matrices switched", report["layers"], report["experts"])
    return report


def force_sparse(model: nn.Module) -> None:
    """Make every layer with an accelerated copy use it at every batch size."""
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.csr.switch = ALWAYS
        elif hasattr(module, "fast_at_one_token"):
            module.switch = ALWAYS
        for kernel in [getattr(module, "shared_kernel", None), *(getattr(module, "expert_kernels", None) or [])]:
            if kernel is not None:
                kernel.switch = ALWAYS
