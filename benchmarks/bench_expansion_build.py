"""Build time of Sparse Expansion (k experts) against the single SparseGPT model, same data.

For each calibration size, in one process and back to back on deep copies of the same dense model:
SparseGPT over the FFN linears, then Sparse Expansion with k experts at the same sparsity. Both walk
the blocks with the same engine on the same calibration windows; the ratio is the acceptance figure.

    # the embedded model on the CPU (docs/bench_expansion_build.json)
    python benchmarks/bench_expansion_build.py --out docs/bench_expansion_build.json
    # a Llama-7B-shaped random model (hidden 4096, FFN 11008, 32 heads; --blocks of them) on a GPU, with
    # the embedded model's tokenizer (or --tokenizer DIR) and random token ids as calibration data
    python benchmarks/bench_expansion_build.py --shape llama-7b --blocks 4 --device cuda --dtype float16 \\
        --calib 128x2048 --data random --out docs/bench_expansion_build_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import llama7b_shaped, write_results


def main() -> None:
    from sparse_expansion.expansion import ExpansionConfig
    from sparse_expansion.models.loading import LoadedModel, default_model_dir
    from sparse_expansion.pruning import PruneOptions, SparsitySpec
    from sparse_expansion.workflow import (
        RunSettings,
        expand_session_model,
        open_session,
        prune_session_model,
        session_for,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("embedded", "llama-7b"), default="embedded")
    parser.add_argument("--blocks", type=int, default=4, help="decoder blocks of the llama-7b shape")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded model's)")
    parser.add_argument("--calib", default="128x256", help="calibration sizes, windows x seqlen, comma-separated")
    parser.add_argument("--data", default=None, help="embedded (default), a text path, or random (token ids)")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--kmeans-restarts", type=int, default=1)
    parser.add_argument("--factorization", default=None, help="SparseGPT's factorization for both builds (default: "
                                                               "each build's own, PruneOptions.factorization)")
    parser.add_argument("--router-tokens", type=int, default=None, help="fit routers on a sample of N tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="docs/bench_expansion_build.json")
    parser.add_argument("--save", default=None, help="write the (last size's) expanded model to this directory, e.g. "
                                                     "for streamed evaluation (benchmarks/gpu_suite.sh)")
    args = parser.parse_args()
    rows = []
    for size in args.calib.split(","):
        windows, seqlen = (int(v) for v in size.split("x"))
        data = None if args.data == "random" else args.data
        settings = RunSettings(calib_samples=windows, seqlen=seqlen, data=data, device=args.device,
                               dtype=args.dtype, quiet=True)
        if args.shape == "embedded":
            session = open_session(settings)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_dir(quiet=True))
            model = llama7b_shaped(tokenizer, args.blocks, getattr(torch, args.dtype), args.device)
            session = session_for(LoadedModel(model, tokenizer, "llama-7b-shaped random", None), settings)
        if args.data == "random":
            generator = torch.Generator().manual_seed(0)
            session.calib = torch.randint(0, len(session.tokenizer), (windows, seqlen), generator=generator)
        start = time.perf_counter()
        session.calibration()
        tokenize_seconds = time.perf_counter() - start
        spec = SparsitySpec(args.sparsity)
        model = copy.deepcopy(session.model)
        start = time.perf_counter()
        options = PruneOptions(factorization=args.factorization)
        prune_session_model(session, model, "sparsegpt", spec, options)
        sparsegpt_seconds = time.perf_counter() - start
        del model
        model = copy.deepcopy(session.model)
        config = ExpansionConfig(experts=args.experts, kmeans_restarts=args.kmeans_restarts,
                                 router_tokens=args.router_tokens)
        start = time.perf_counter()
        report = expand_session_model(session, model, spec, options, config)
        expansion_seconds = time.perf_counter() - start
        if args.save:
            from sparse_expansion.models.model_dir import save_model_dir

            save_model_dir(model.to("cpu"), session.tokenizer, args.save, {"method": "sparse-expansion",
                                                                          "experts": args.experts,
                                                                          "sparsity": args.sparsity},
                           overwrite=True)
        del model
        row = {"shape": args.shape, "blocks": len(session.layout.blocks), "device": args.device, "dtype": args.dtype,
               "calib_windows": windows, "seqlen": seqlen, "calib_tokens": windows * seqlen,
               "experts": args.experts, "sparsity": args.sparsity, "kmeans_restarts": args.kmeans_restarts,
               "factorization": {"sparsegpt": options.factorization or "reference",
                                 "sparse_expansion": options.for_experts().factorization},
               "router_tokens": args.router_tokens,
               "tokenize_seconds": tokenize_seconds, "sparsegpt_seconds": sparsegpt_seconds,
               "expansion_seconds": expansion_seconds, "router_seconds": report.router_seconds,
               "ratio": expansion_seconds / sparsegpt_seconds}
        rows.append(row)
        print(f"{args.shape} {windows} x {seqlen} on {args.device}: SparseGPT {sparsegpt_seconds:.1f} s, Sparse "
              f"Expansion x{args.experts} {expansion_seconds:.1f} s (routers {report.router_seconds:.1f} s): "
              f"{row['ratio']:.2f}x", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    write_results(args.out, rows, gpu=device)


if __name__ == "__main__":
    main()
