"""Selective expansion on the embedded model: perplexity against stored FFN bytes and FFN FLOPs per token.

In one process, on the same calibration and test windows: SparseGPT, full Sparse Expansion with k experts,
and selective expansion of the top p% rows of every FFN linear by Wasserstein distance (and, as a control,
the same number of rows chosen at random), all at the same sparsity.

    python benchmarks/bench_selective.py --out docs/study/selective.json
    python benchmarks/plot_selective.py docs/study/selective.json --out docs/study

"Stored FFN bytes" is what the compressed model format writes for the FFN linears and the routers: each
tensor in the smallest of its encodings (dense, bitmask or CSR; io/compressed.py).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import write_results


def ffn_stored_bytes(model, layout) -> int:
    from sparse_expansion.io.compressed import encoded_sizes
    from sparse_expansion.layers import ROUTERS_ATTR

    total = 0
    for block in layout.blocks:
        modules = [block.get_submodule(lin.name) for lin in layout.select("ffn")]
        routers = getattr(block, ROUTERS_ATTR, None)
        if routers is not None:
            modules.append(routers)
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                total += min(encoded_sizes(tensor.detach()).values())
    return total


def random_scores(seed: int):
    def scores(path, weight, inputs, bias):
        generator = torch.Generator().manual_seed(seed + sum(map(ord, path)))
        return torch.rand(weight.shape[0], generator=generator)
    return scores


def main() -> None:
    from sparse_expansion.expansion import ExpansionConfig
    from sparse_expansion.models import discover
    from sparse_expansion.pruning import PruneOptions, SparsitySpec
    from sparse_expansion.workflow import (
        RunSettings,
        evaluate,
        expand_session_model,
        ffn_costs,
        open_session,
        prune_session_model,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--percents", default="1,3,10,30", help="selective: percent of rows expanded")
    parser.add_argument("--random-control", default="10", help="percents also run with randomly chosen rows")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", default="docs/study/selective.json")
    args = parser.parse_args()

    session = open_session(RunSettings(calib_samples=args.calib_samples, seqlen=args.seqlen,
                                       eval_samples=args.eval_samples, quiet=True))
    session.calibration()
    spec, options = SparsitySpec.create(sparsity=args.sparsity), PruneOptions()
    rows = []

    def record(label, method, model, seconds, percent=None, selection=None):
        layout = discover(model)
        costs = ffn_costs(model, layout)
        result = evaluate(session, model)
        row = {"label": label, "method": method, "sparsity": args.sparsity, "experts": args.experts,
               "selective_percent": percent, "selection": selection, "ppl": result["ppl"],
               "eval_tokens": result["eval_tokens"], "ffn_flops_per_token": costs["ffn_flops_per_token"],
               "ffn_stored_bytes": ffn_stored_bytes(model, layout), "build_seconds": seconds}
        rows.append(row)
        print(f"{label}: ppl {row['ppl']:.3f}, FFN {row['ffn_flops_per_token'] / 1e6:.1f} MFLOP/token, "
              f"stored FFN {row['ffn_stored_bytes'] / 2**20:.1f} MiB, build {seconds:.0f} s", flush=True)

    dense = evaluate(session, session.model)
    print(f"dense: ppl {dense['ppl']:.3f}", flush=True)

    model = copy.deepcopy(session.model)
    start = time.perf_counter()
    prune_session_model(session, model, "sparsegpt", spec, options)
    record("SparseGPT", "sparsegpt", model, time.perf_counter() - start)
    del model

    runs = [(None, "wasserstein")] + [(float(p), "wasserstein") for p in args.percents.split(",") if p] + \
        [(float(p), "random") for p in args.random_control.split(",") if p]
    for percent, selection in runs:
        model = copy.deepcopy(session.model)
        config = ExpansionConfig(experts=args.experts, selective=None if percent is None else percent / 100)
        scores = random_scores(0) if selection == "random" else None
        start = time.perf_counter()
        expand_session_model(session, model, spec, options, config, row_scores=scores)
        label = (f"Sparse Expansion x{args.experts}" if percent is None
                 else f"selective {percent:g}% ({selection}) x{args.experts}")
        record(label, "sparse-expansion", model, time.perf_counter() - start, percent,
               None if percent is None else selection)
        del model
    write_results(args.out, rows, dense_ppl=dense["ppl"], calib_tokens=int(session.calib.numel()),
                  settings=session.settings.describe())


if __name__ == "__main__":
    main()
