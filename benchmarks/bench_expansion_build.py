"""Build time of Sparse Expansion (k experts) against the single SparseGPT model, same data.

For each calibration size, in one process and back to back on deep copies of the same dense model:
SparseGPT over the FFN linears, then Sparse Expansion with k experts at the same sparsity. Both walk
the blocks with the same engine on the same calibration windows; the ratio is the acceptance figure.

    python benchmarks/bench_expansion_build.py --out docs/bench_expansion_build.json
"""

from __future__ import annotations

import argparse
import copy
import time

from common import write_results


def main() -> None:
    from sparse_expansion.expansion import ExpansionConfig
    from sparse_expansion.pruning import PruneOptions, SparsitySpec
    from sparse_expansion.workflow import RunSettings, expand_session_model, open_session, prune_session_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", default="32x256,128x256", help="calibration sizes, windows x seqlen")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--out", default="docs/bench_expansion_build.json")
    args = parser.parse_args()
    rows = []
    for size in args.calib.split(","):
        windows, seqlen = (int(v) for v in size.split("x"))
        session = open_session(RunSettings(calib_samples=windows, seqlen=seqlen, quiet=True))
        session.calibration()
        spec = SparsitySpec(args.sparsity)
        model = copy.deepcopy(session.model)
        start = time.perf_counter()
        prune_session_model(session, model, "sparsegpt", spec, PruneOptions())
        sparsegpt_seconds = time.perf_counter() - start
        del model
        model = copy.deepcopy(session.model)
        start = time.perf_counter()
        report = expand_session_model(session, model, spec, PruneOptions(), ExpansionConfig(experts=args.experts))
        expansion_seconds = time.perf_counter() - start
        del model
        row = {"calib_windows": windows, "seqlen": seqlen, "calib_tokens": windows * seqlen,
               "experts": args.experts, "sparsity": args.sparsity, "sparsegpt_seconds": sparsegpt_seconds,
               "expansion_seconds": expansion_seconds, "router_seconds": report.router_seconds,
               "ratio": expansion_seconds / sparsegpt_seconds}
        rows.append(row)
        print(f"{windows} x {seqlen}: SparseGPT {sparsegpt_seconds:.1f} s, Sparse Expansion x{args.experts} "
              f"{expansion_seconds:.1f} s (routers {report.router_seconds:.1f} s): {row['ratio']:.2f}x", flush=True)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
