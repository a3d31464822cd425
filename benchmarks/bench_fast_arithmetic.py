"""The parts of Sparse Expansion's fast arithmetic (issue 18), each against what it replaced, on real inputs.

Inputs: the FFN input (576 wide) and intermediate activation (1536 wide) of the embedded model's block 10 at 32,768
calibration tokens (the CPU build benchmark's 128 x 256), routed to 16 clusters by a fitted router, so that the
Hessians are the experts' own. Every pair runs back to back in this process, median of `--repeats`, at torch's
thread count (2 on the development machines) unless a row says otherwise.

    python benchmarks/bench_fast_arithmetic.py --out docs/bench_fast_arithmetic.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from bench_router import real_inputs
from common import write_results


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: first calls load libraries and touch fresh memory
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from scipy.linalg import lapack

    from sparse_expansion.calibration import Hessian
    from sparse_expansion.expansion.build import _cluster_statistics
    from sparse_expansion.expansion.fitting import fit_router
    from sparse_expansion.kernels.linalg import invert_lower_triangular_
    from sparse_expansion.pruning import SparsitySpec, sparsegpt_prune
    from sparse_expansion.pruning.masks import _kth_smallest
    from sparse_expansion.pruning.sparsegpt import FACTORIZATIONS, _factor_into, hessian_factors
    from sparse_expansion.runtime import blas_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/bench_fast_arithmetic.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    inputs = dict(zip(("ffn input", "intermediate"), real_inputs(args.tokens)))
    rows = []

    def row(part: str, shape: str, before: str, before_s: float, after: str, after_s: float, **extra) -> None:
        rows.append({"part": part, "shape": shape, "before": before, "before_seconds": before_s, "after": after,
                     "after_seconds": after_s, "speedup": before_s / after_s, **extra})
        print(f"{part} {shape}: {before} {before_s * 1e3:.1f} ms, {after} {after_s * 1e3:.1f} ms "
              f"({before_s / after_s:.2f}x)", flush=True)

    clusters = {}  # width -> the 16 cluster Hessians, for the column loops below
    for x in inputs.values():
        width = x.shape[1]
        router = fit_router(x, 16, 32)
        stats = _cluster_statistics(list(x.split(2048)), router, Hessian, torch.device("cpu"))
        hessians = clusters[width] = Hessian.stack(stats).matrix

        # One Cholesky on one thread and on torch's threads.
        one = hessians[0] + 0.01 * hessians[0].diagonal().mean() * torch.eye(width)
        torch.set_num_threads(1)
        single = median_seconds(lambda: torch.linalg.cholesky_ex(one), 10)
        torch.set_num_threads(threads)
        shared = median_seconds(lambda: torch.linalg.cholesky_ex(one), 10)
        row("Cholesky", f"{width} x {width}", f"{threads} threads", shared, "1 thread", single)

        # The 16 factors: one matrix after another on torch's threads, or one matrix per thread.
        out = torch.empty_like(hessians)

        def serial(name: str) -> None:
            with blas_threads(threads):
                for e in range(hessians.shape[0]):
                    _factor_into(out[e], hessians[e], 0.01, FACTORIZATIONS[name])

        row("16 factors (fast)", f"16 x {width}^2", f"one after another, {threads} threads",
            median_seconds(lambda: serial("fast"), args.repeats), "one per thread (one_thread_each)",
            median_seconds(lambda: hessian_factors(hessians, 0.01, "fast"), args.repeats),
            reference_seconds=median_seconds(lambda: serial("reference"), args.repeats))

        # The triangular inverse from two Python threads: scipy's wrapper keeps the GIL, ctypes lets it go.
        lower = torch.linalg.cholesky(one)
        copies = [lower.clone() for _ in range(8)]
        with blas_threads(1), ThreadPoolExecutor(2) as pool:
            wrapped = median_seconds(lambda: list(pool.map(lambda m: lapack.strtri(m.t().numpy(), lower=0), copies)),
                                     args.repeats)
            direct = median_seconds(lambda: list(pool.map(lambda m: invert_lower_triangular_(m.clone()), copies)),
                                    args.repeats)
        row("8 triangular inverses on 2 threads", f"{width} x {width}", "scipy.linalg.lapack.strtri", wrapped,
            "ctypes through scipy's Cython LAPACK table", direct)

        # The mask threshold of one expert batch's block (8 experts x 128 columns of every row).
        rows_per_block = (1536 if width == 576 else 576) * 128
        scores = torch.rand(8, 1, rows_per_block, generator=torch.Generator().manual_seed(0))
        k = int(0.7 * rows_per_block)
        torch.set_num_threads(1)
        row("k-th smallest score", f"8 x {rows_per_block}", "torch.kthvalue (1 thread)",
            median_seconds(lambda: scores.kthvalue(k, dim=-1, keepdim=True), 10), "numpy introselect",
            median_seconds(lambda: _kth_smallest(scores, k), 10))
        torch.set_num_threads(threads)

    # The column loop of 16 experts, with the fast factors of their own clusters: gate shape and down shape.
    for width, hessians in clusters.items():
        factors = hessian_factors(hessians, 0.01, "fast")
        weight = torch.randn(1536 if width == 576 else 576, width, generator=torch.Generator().manual_seed(1))
        stack = weight.expand(16, *weight.shape)
        spec = SparsitySpec(0.7)
        row("column loop, 16 experts", f"16 x {tuple(weight.shape)}", f"updates per 32 columns, {threads} threads",
            median_seconds(lambda: sparsegpt_prune(stack, None, spec, factors=factors), args.repeats),
            "updates per block, experts shared among threads",
            median_seconds(lambda: sparsegpt_prune(stack, None, spec, factors=factors, block_updates=True),
                           args.repeats))
    write_results(args.out, rows, tokens=args.tokens, threads=threads, numpy=np.__version__)


if __name__ == "__main__":
    main()
