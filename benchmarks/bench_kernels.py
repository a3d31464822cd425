"""CPU sparse kernels against dense torch, on random unstructured weights (`sparse-expansion bench --kernel`).

Shapes: a Llama-7B FFN matrix (11008 x 4096, issue 4's acceptance shape) at sparsities from 0 to 95%,
and the embedded SmolLM2-135M's FFN matrices (1536 x 576 and 576 x 1536). For each: one token and a
batch of 128 tokens, dense, torch CSR, scipy CSR, our kernel and the layer (kernel or dense fallback,
as measured), next to the memory-bound limit at the machine's measured read bandwidth.

    python benchmarks/bench_kernels.py --out docs/bench_kernels.json
"""

from __future__ import annotations

import argparse

from common import write_results


def describe(result: dict) -> str:
    single, batched = result["single"], result["batched"]
    return (f"{result['rows']}x{result['cols']} {result['sparsity']:.0%}: 1 token dense {single['dense_ms']:.3f} ms, "
            f"kernel {single['kernel_ms']:.3f} ms, layer {single['speedup']:.2f}x (CSR limit "
            f"{single['csr_limit_ms']:.3f} ms); {result['batch']} tokens layer {batched['speedup']:.2f}x")


def main() -> None:
    from sparse_expansion.bench.kernel import kernel_benchmark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-sparsities", default="0,0.1,0.3,0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--smollm-sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="docs/bench_kernels.json")
    args = parser.parse_args()
    cases = [(11008, 4096, float(s)) for s in args.llama_sparsities.split(",")]
    cases += [(r, c, float(s)) for r, c in ((1536, 576), (576, 1536)) for s in args.smollm_sparsities.split(",")]
    rows = []
    for shape_rows, cols, sparsity in cases:
        rows.append(kernel_benchmark(shape_rows, cols, sparsity, batch=args.batch))
        print(describe(rows[-1]), flush=True)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
