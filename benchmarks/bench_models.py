"""Prefill and decode speed, disk size and memory of pruned and expanded models (`sparse-expansion bench --model`).

Builds, if missing, from the embedded SmolLM2-135M and corpus (32 calibration windows of 256 tokens):
SparseGPT at 70% FFN sparsity and Sparse Expansion with 16 experts at 70%; also writes a dense
checkpoint for the size comparison. Then each model is measured against the dense model in the same
process, with the sparse kernels (`--kernels auto`) and, for reference, without (`--kernels off`).

    python benchmarks/bench_models.py --work runs/bench_models --out docs/bench_models.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import write_results

CALIBRATION = ["--calib-samples", "32", "--seqlen", "256", "--quiet"]
BUILDS = {
    "dense": ["prune", "--method", "magnitude", "--sparsity", "0", "--format", "dense"],
    "sparsegpt70": ["prune", "--method", "sparsegpt", "--sparsity", "0.7", *CALIBRATION],
    "expansion16_70": ["expand", "--experts", "16", "--sparsity", "0.7", *CALIBRATION],
}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench_models", help="where the model directories are built")
    parser.add_argument("--models", default="sparsegpt70,expansion16_70")
    parser.add_argument("--kernels", default="auto,off")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/bench_models.json")
    args = parser.parse_args()
    work = Path(args.work)
    cli = [sys.executable, "-m", "sparse_expansion.cli"]
    for name, command in BUILDS.items():
        if not (work / name).is_dir():
            subprocess.run([*cli, *command, "--out", str(work / name)], check=True)
    dense_bytes = directory_bytes(work / "dense")
    rows = []
    for name in args.models.split(","):
        for kernels in args.kernels.split(","):
            # One process per measurement, so that its peak memory is its own.
            out = work / f"bench-{name}-{kernels}.json"
            subprocess.run([*cli, "bench", "--model", str(work / name), "--kernels", kernels, "--repeats",
                            str(args.repeats), "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            result = json.loads(out.read_text())
            result.update(name=name, disk_share_of_dense=directory_bytes(work / name) / dense_bytes,
                          dense_checkpoint_bytes=dense_bytes)
            rows.append(result)
            print(f"{name} kernels={kernels}: prefill {result['prefill_speedup']:.2f}x, decode "
                  f"{result['decode_speedup']:.2f}x, disk {result['disk_share_of_dense']:.1%} of dense, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
