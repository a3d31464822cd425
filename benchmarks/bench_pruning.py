"""Pruning benchmark on the embedded model and corpus: perplexity, time to prune, peak memory.

Every configuration runs in its own child process so that its peak resident memory (ru_maxrss) is its
own; all children use the same calibration and test windows (same seed, same corpus split).

    python benchmarks/bench_pruning.py --out docs/bench_pruning.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from common import write_results

CONFIGS = [
    ("dense", None),
    ("magnitude", "0.5"), ("wanda", "0.5"), ("sparsegpt", "0.5"),
    ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
]


def run_one(method: str, sparsity: str | None, args) -> dict:
    """Child process: load, prune (timed), evaluate; print one JSON line."""
    import torch

    from sparse_expansion.pruning import PruneOptions, SparsitySpec
    from sparse_expansion.workflow import RunSettings, evaluate, open_session, prune_session_model

    torch.manual_seed(0)
    settings = RunSettings(calib_samples=args.calib_samples, seqlen=args.seqlen, eval_samples=args.eval_samples,
                           seed=0, scope=args.scope, quiet=True)
    session = open_session(settings)
    row = {"method": method, "sparsity": sparsity or "0", "scope": args.scope}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method != "dense":
        spec = SparsitySpec.create(nm=sparsity) if ":" in sparsity else SparsitySpec.create(sparsity=float(sparsity))
        if method != "magnitude":
            session.calibration()  # tokenizing the corpus is not part of pruning time
        start = time.perf_counter()
        report = prune_session_model(session, session.model, method, spec, PruneOptions())
        row["prune_seconds"] = time.perf_counter() - start
        row["measured_sparsity"] = report.overall_sparsity()
    else:
        row["prune_seconds"] = 0.0
        row["measured_sparsity"] = 0.0
    row["peak_rss_mb_after_prune"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["rss_mb_after_load"] = rss_before / 1024
    row.update(evaluate(session, session.model))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--scope", default="ffn")
    parser.add_argument("--out", default="docs/bench_pruning.json")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SPARSITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, sparsity = args.child
        print(json.dumps(run_one(method, None if sparsity == "-" else sparsity, args)))
        return
    rows = []
    for method, sparsity in CONFIGS:
        cmd = [sys.executable, __file__, "--child", method, sparsity or "-", "--calib-samples",
               str(args.calib_samples), "--seqlen", str(args.seqlen), "--eval-samples", str(args.eval_samples),
               "--scope", args.scope]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{method:10s} {sparsity or '-':5s} ppl {row['ppl']:9.3f}  prune {row['prune_seconds']:6.1f} s  "
              f"peak {row['peak_rss_mb']:7.0f} MB", flush=True)
    write_results(args.out, rows, settings={
        "calib_samples": args.calib_samples, "seqlen": args.seqlen, "eval_samples": args.eval_samples,
        "scope": args.scope, "seed": 0, "model": "SmolLM2-135M-Instruct (embedded)",
        "data": "embedded Wikipedia summaries"})


if __name__ == "__main__":
    main()
