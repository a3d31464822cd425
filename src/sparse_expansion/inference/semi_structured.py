"""GPU path: 2:4 semi-structured sparse weights through PyTorch's built-in support.

A linear layer pruned with `--nm 2:4` has two zeros in every group of four consecutive input weights.
On an NVIDIA GPU with sparse tensor cores (compute capability 8.0 or newer) and fp16/bf16 weights,
`torch.sparse.to_sparse_semi_structured` stores such a weight compressed (values + 2-bit metadata) and
`F.linear` runs it through cuSPARSELt/CUTLASS. Layers that do not meet every condition stay dense.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.discovery import discover

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def is_two_four(weight: torch.Tensor) -> bool:
    """At least two zeros in every group of four consecutive weights along the input dimension."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
    return bool((zeros >= 2).all())


def semi_structured_supported(device: torch.device | str | None = None) -> bool:
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and hasattr(torch.sparse, "to_sparse_semi_structured")


def _shape_supported(weight: torch.Tensor) -> bool:
    # cuSPARSELt / CUTLASS minimum tile sizes for fp16/bf16 (PyTorch raises on smaller shapes).
    rows, cols = weight.shape
    return rows % 64 == 0 and cols % 64 == 0 and rows >= 64 and cols >= 64


@torch.no_grad()
def enable_semi_structured(model: nn.Module) -> dict:
    """Convert every 2:4 linear of the decoder blocks on a capable GPU; returns a report of what changed."""
    report = {"converted": 0, "skipped": 0, "supported": False}
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda" or not semi_structured_supported(next(iter(devices))):
        return report
    report["supported"] = True
    for block in discover(model).blocks:
        for module in block.modules():
            if type(module) is not nn.Linear:
                continue
            weight = module.weight
            if weight.dtype in SEMI_STRUCTURED_DTYPES and _shape_supported(weight) and is_two_four(weight):
                module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(weight), requires_grad=False)
                report["converted"] += 1
            else:
                report["skipped"] += 1
    return report


def semi_structured_benchmark(rows: int, cols: int, batch: int = 128, dtype: torch.dtype = torch.float16,
                              min_run_time: float = 0.5) -> dict:
    """Dense against 2:4 semi-structured `F.linear` on the GPU, median of CUDA-synchronised runs."""
    import torch.nn.functional as F
    from torch.utils import benchmark

    if not semi_structured_supported():
        raise RuntimeError("2:4 semi-structured sparsity needs a CUDA GPU with compute capability >= 8.0")
    mask = torch.tensor([0, 0, 1, 1], dtype=torch.bool, device="cuda").tile(rows, cols // 4)
    weight = (torch.randn(rows, cols, device="cuda", dtype=dtype) * mask).contiguous()
    sparse = torch.sparse.to_sparse_semi_structured(weight)
    result = {"rows": rows, "cols": cols, "batch": batch, "dtype": str(dtype).split(".")[-1],
              "device": torch.cuda.get_device_name()}
    for label, tokens in (("single", 1), ("batched", batch)):
        # cuSPARSELt wants at least 8 (fp16) rows of activations: one token is padded to that.
        x = torch.randn(max(tokens, 8), cols, device="cuda", dtype=dtype)
        torch.testing.assert_close(F.linear(x, sparse), F.linear(x, weight), rtol=1e-2, atol=1e-2)
        timings = {}
        for name, w in (("dense", weight), ("semi_structured", sparse)):
            timer = benchmark.Timer(stmt="F.linear(x, w)", globals={"F": F, "x": x, "w": w})
            timings[f"{name}_ms"] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
        timings["speedup"] = timings["dense_ms"] / timings["semi_structured_ms"]
        result[label] = timings
    return result
