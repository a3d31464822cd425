"""Dense against sparse matrix-vector and matrix-matrix products on random weights (CPU).

Candidates: dense torch (`F.linear`), torch CSR with int32 indices, and scipy CSR. Each is timed with
`torch.utils.benchmark` (median of repeated blocks); the speedup is dense time over the fastest sparse
candidate's time, for one token and for a batch of tokens.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from ..errors import UsageError


def random_sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    return weight.masked_fill(torch.rand(rows, cols, generator=generator) < sparsity, 0)


def _median_ms(fn, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def kernel_benchmark(rows: int, cols: int, sparsity: float, batch: int = 128, min_run_time: float = 0.5,
                     seed: int = 0) -> dict:
    if rows < 1 or cols < 1 or batch < 1:
        raise UsageError("--rows, --cols and --batch must be positive")
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")
    import scipy.sparse

    weight = random_sparse_weight(rows, cols, sparsity, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.to_sparse_csr()
        torch_csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                            csr.values(), size=weight.shape, check_invariants=False)
    scipy_csr = scipy.sparse.csr_matrix(weight.numpy())
    result = {"rows": rows, "cols": cols, "sparsity": sparsity, "batch": batch,
              "nnz": int(csr.values().numel()), "threads": torch.get_num_threads()}
    for label, tokens in (("single", 1), ("batched", batch)):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1))
        xt = x.t().contiguous()
        xn = xt.numpy()
        expected = F.linear(x, weight)
        for name, out in (("torch_csr", (torch_csr @ xt).t()), ("scipy_csr", torch.from_numpy(scipy_csr @ xn).t())):
            if not torch.allclose(out, expected, rtol=1e-4, atol=1e-3):
                raise RuntimeError(f"{name} disagrees with the dense product")
        timings = {
            "dense_ms": _median_ms(lambda: F.linear(x, weight), min_run_time),
            "torch_csr_ms": _median_ms(lambda: torch_csr @ xt, min_run_time),
            "scipy_csr_ms": _median_ms(lambda: scipy_csr @ xn, min_run_time),
        }
        best = min(("torch_csr_ms", "scipy_csr_ms"), key=timings.get)
        timings["best_sparse"] = best.removesuffix("_ms")
        timings["speedup"] = timings["dense_ms"] / timings[best]
        result[label] = timings
    result["speedup"] = result["single"]["speedup"]
    # What one matrix-vector product must read: dense fp32 weights, or CSR values + int32 indices.
    result["dense_bytes"] = rows * cols * 4
    result["csr_bytes"] = result["nnz"] * 8 + (rows + 1) * 4
    return result
