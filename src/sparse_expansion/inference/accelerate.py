"""Switch a loaded model's layers to their faster forms: each layer kind decides (layers/protocol.py).

On the CPU, pruned fp32 linear layers and the experts of expanded layers get CSR copies for the native
kernels; on CUDA, 2:4 fp16/bf16 linear layers get semi-structured copies. Every accelerated path is used
only for the shapes and token counts where it measured faster than dense (layers/switch.py).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from ..kernels import native
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

    Every linear layer's kind decides (`LayerKind.accelerate`) and says which accelerated copies the layer
    then holds (`LayerKind.fast_paths`). Report: `switched` (path -> kind of the layer's new form, for every
    layer holding an accelerated copy), `kinds` (how many of those per kind), `layers` (linear layers
    replaced by a faster form), `experts` (expert matrices with a CSR copy), `dense_layers` (linear layers
    left without an accelerated copy), `switch` (per measured shape: the token counts where the fast path
    won, and both times).
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r}")
    report = {"mode": mode, "available": False, "layers": 0, "experts": 0, "dense_layers": 0, "switched": {},
              "kinds": {}, "switch": {}}
    if mode == "off":
        return report
    on_cuda = next(model.parameters()).device.type == "cuda"
    cpu_kernels = not on_cuda and native.available()
    if not on_cuda and not cpu_kernels:
        report["reason"] = native.unavailable_reason()
        return report
    report["available"] = True
    context = AccelerateContext(mode=mode, switches=cache or SwitchCache(), cpu_kernels=cpu_kernels)
    layout = discover(model)
    kinds = Counter()
    for index, block in enumerate(layout.blocks):
        for name, module in list(block.named_modules()):
            kind = kind_of(module)
            if not name or kind is None or not kind.linear:
                continue
            new = kind.accelerate(module, context)
            if new is not module:
                block.set_submodule(name, new)
            new_kind = kind_of(new)
            fast = new_kind.fast_paths(new)
            if fast:
                report["switched"][f"{layout.blocks_path}.{index}.{name}"] = new_kind.name
                kinds[new_kind.name] += 1
            if kind.routed:
                report["experts"] += len(fast)
            elif new is not module:
                report["layers"] += 1
            elif not fast:
                report["dense_layers"] += 1
        release_memory()
    report["kinds"] = dict(kinds)
    report["switch"] = context.switches.summary()
    log.info("accelerate: %d linear layers and %d expert matrices switched (%s)", report["layers"],
             report["experts"], ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())) or "none")
    return report


def force_sparse(model: nn.Module) -> None:
    """Make every layer with an accelerated copy use it at every batch size."""
    for module in model.modules():
        kind = kind_of(module)
        for path in kind.fast_paths(module) if kind is not None else []:
            path.switch = ALWAYS
