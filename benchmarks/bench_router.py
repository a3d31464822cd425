"""Router fitting: torch versus scikit-learn PCA + k-means, on the sizes Sparse Expansion meets.

Token counts are calibration windows x seqlen (8k = 32 x 256 ... 131k = 128 x 1024); widths are
SmolLM2-135M's FFN input (576) and intermediate (1536); PCA reduction 32, 16 experts. Inputs are
real FFN inputs of the embedded model's block 10 (so the cluster structure is realistic), tiled when
more tokens are asked for than recorded. Both backends are run back to back in this process, median of
`--repeats` runs each, and the inertia (k-means objective in PCA space) is reported so speed is not
bought with worse clusters.

    python benchmarks/bench_router.py --out docs/bench_router.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import write_results


def real_inputs(max_tokens: int, seqlen: int = 256):
    """FFN input and intermediate activations of block 10 of the embedded model."""
    from sparse_expansion.calibration import BlockHooks, SequentialCalibration, Step, TokenRecorder, Watch
    from sparse_expansion.workflow import RunSettings, open_session

    session = open_session(RunSettings(calib_samples=max_tokens // seqlen, seqlen=seqlen, quiet=True))
    block_index = 10

    class Record(Step):
        modifies = False  # observe-only: one pass per block

        def observe(self, index, block):
            if index != block_index:
                return {}
            return {"in": Watch("mlp.gate_proj", TokenRecorder()), "out": Watch("mlp.down_proj", TokenRecorder())}

    recorded = {}
    hooks = BlockHooks(stop_after=block_index,  # walk only up to the block we need
                       after_block=lambda index, block, hidden, stats: recorded.update(stats))
    engine = SequentialCalibration(session.model, session.layout, progress=False, hooks=hooks)
    engine.run(session.calibration(), Record())
    return recorded["in"].all(), recorded["out"].all()


def inertia(router, x):
    z = router.project(x)
    return torch.cdist(z, router.centroids).min(1).values.pow(2).sum().item()


def main() -> None:
    from sparse_expansion.expansion.fitting import fit_router

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,32768,131072")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--reduction", type=int, default=32)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/bench_router.json")
    args = parser.parse_args()
    sizes = [int(t) for t in args.tokens.split(",")]
    x_in, x_out = real_inputs(min(max(sizes), 32768))
    rows = []
    for tokens in sizes:
        for name, source in (("ffn_input", x_in), ("intermediate", x_out)):
            reps = -(-tokens // source.shape[0])
            x = source.repeat(reps, 1)[:tokens] if reps > 1 else source[:tokens]
            row = {"tokens": tokens, "width": x.shape[1], "input": name}
            for backend in ("torch", "sklearn"):
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    router = fit_router(x, args.experts, args.reduction, args.restarts, seed=0, backend=backend)
                    times.append(time.perf_counter() - start)
                row[f"{backend}_seconds"] = statistics.median(times)
                row[f"{backend}_inertia"] = inertia(router, x)
            row["sklearn_over_torch"] = row["sklearn_seconds"] / row["torch_seconds"]
            rows.append(row)
            print(f"{tokens:7d} x {x.shape[1]:5d}: torch {row['torch_seconds']:.3f} s "
                  f"(inertia {row['torch_inertia']:.4g}), sklearn {row['sklearn_seconds']:.3f} s "
                  f"(inertia {row['sklearn_inertia']:.4g})", flush=True)
    write_results(args.out, rows, settings=vars(args))


if __name__ == "__main__":
    main()
