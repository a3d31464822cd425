"""Where a Sparse Expansion build's time goes: SparseGPT, then x16 under cProfile, on the first N blocks of the
embedded model (a quick stand-in for benchmarks/bench_expansion_build.py, whose per-block costs it shares).

    python benchmarks/profile_build.py --blocks 6 --out docs/study/builds/profile_x16_6blocks.txt
    PYTHONPATH=/path/to/an/older/checkout/src python benchmarks/profile_build.py ...   # the same for older code
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import time

import torch


def main() -> None:
    from sparse_expansion.expansion import ExpansionConfig
    from sparse_expansion.models.discovery import discover
    from sparse_expansion.pruning import PruneOptions, SparsitySpec
    from sparse_expansion.workflow import RunSettings, expand_session_model, open_session, prune_session_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--calib", default="128x256", help="windows x seqlen")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--rows", type=int, default=30, help="profile lines to print")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    windows, seqlen = (int(v) for v in args.calib.split("x"))
    session = open_session(RunSettings(calib_samples=windows, seqlen=seqlen, quiet=True))
    session.calibration()
    model = session.model
    blocks = session.layout.blocks_path.split(".")
    parent = model.get_submodule(".".join(blocks[:-1])) if len(blocks) > 1 else model
    setattr(parent, blocks[-1], getattr(parent, blocks[-1])[:args.blocks])
    model.config.num_hidden_layers = args.blocks
    session.layout = discover(model)
    spec = SparsitySpec(args.sparsity)
    start = time.perf_counter()
    prune_session_model(session, copy.deepcopy(model), "sparsegpt", spec, PruneOptions())
    sparsegpt = time.perf_counter() - start
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    report = expand_session_model(session, copy.deepcopy(model), spec, PruneOptions(),
                                  ExpansionConfig(experts=args.experts))
    profile.disable()
    expansion = time.perf_counter() - start
    text = io.StringIO()
    threads = torch.get_num_threads()
    text.write(f"embedded model, first {args.blocks} blocks, {args.calib}, {args.sparsity:.0%}, {threads} "
               f"threads: SparseGPT {sparsegpt:.1f} s, Sparse Expansion x{args.experts} {expansion:.1f} s (routers "
               f"{report.router_seconds:.1f} s): {expansion / sparsegpt:.2f}x\n\n")
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.rows)
    print(text.getvalue())
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text.getvalue())


if __name__ == "__main__":
    main()
