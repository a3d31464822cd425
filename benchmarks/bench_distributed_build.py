"""Sparse Expansion built by one process against `torchrun --nproc_per_node N` (experts divided across the ranks).

Back to back on the same calibration windows: under torchrun with N ranks of `--threads` threads each (gloo on
the CPU, or nccl with `--device cuda`), then the build alone (`--threads` threads). Per rank: build seconds, the
peak resident memory of the process, the bytes of cluster statistics it held at most (ExpansionReport), and a
digest of the expanded model's tensors (the acceptance asks for the one-process weights). Each block is hashed
and freed once built, as `expand --out` writes and frees it, so the peak is one block's work, not the model.

    # the embedded model, x16, 64 x 256 (docs/study/distributed/divided_embedded.json)
    python benchmarks/bench_distributed_build.py --out docs/study/distributed/divided_embedded.json
    # the Llama-7B-shaped random model, 2 blocks, random token ids
    python benchmarks/bench_distributed_build.py --shape llama-7b --blocks 2 --calib 16x256 --data random \\
        --out docs/study/distributed/divided_llama7b.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from common import llama7b_shaped, write_results


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _digest(module, digest) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # read in place, not copied


def worker(args) -> None:
    """One build (alone or as one rank); rank 0 writes every rank's figures to args.worker_out."""
    from sparse_expansion import distributed
    from sparse_expansion.calibration import BlockHooks
    from sparse_expansion.expansion import ExpansionConfig
    from sparse_expansion.models.loading import LoadedModel, default_model_dir
    from sparse_expansion.models.streaming import free_block
    from sparse_expansion.pruning import PruneOptions, SparsitySpec
    from sparse_expansion.workflow import RunSettings, expand_session_model, open_session, session_for

    torch.set_num_threads(args.threads)
    device = distributed.init_from_env(args.device)
    windows, seqlen = (int(v) for v in args.calib.split("x"))
    data = None if args.data == "random" else args.data
    settings = RunSettings(calib_samples=windows, seqlen=seqlen, data=data, device=device, dtype=args.dtype,
                           quiet=True)
    if args.shape == "embedded":
        session = open_session(settings)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_dir(quiet=True))
        model = llama7b_shaped(tokenizer, args.blocks, getattr(torch, args.dtype))
        session = session_for(LoadedModel(model, tokenizer, "llama-7b-shaped random", None), settings)
    if args.data == "random":
        session.calib = torch.randint(0, len(session.tokenizer), (windows, seqlen),
                                      generator=torch.Generator().manual_seed(0))
    session.calibration()
    before = _rss_bytes()
    digest = hashlib.sha256()

    def after_block(index, block, hidden, statistics):
        _digest(block, digest)  # then the block leaves memory, as `expand --out` does (each rank holds one)

    hooks = BlockHooks(after_block=after_block, offload=free_block)
    distributed.barrier()
    start = time.perf_counter()
    report = expand_session_model(session, session.model, SparsitySpec(args.sparsity), PruneOptions(),
                                  ExpansionConfig(experts=args.experts), hooks=hooks)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu_peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None
    row = {"rank": distributed.rank(), "build_seconds": seconds, "rss_before_build_bytes": before,
           "peak_rss_bytes": peak, "peak_gpu_bytes": gpu_peak, "cluster_statistic_bytes": report.statistic_bytes,
           "router_seconds": report.router_seconds, "fallback_experts": report.fallbacks()}
    rows = distributed.gather_objects(row)
    if distributed.is_main():
        with open(args.worker_out, "w") as handle:
            json.dump({"world": distributed.world(), "ranks": rows, "digest": digest.hexdigest(),
                       "blocks": len(session.layout.blocks)}, handle)
    distributed.shutdown()


def _gib(ranks: list[dict], key: str) -> str:
    return ", ".join(f"{r[key] / 2**30:.3f}" for r in ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("embedded", "llama-7b"), default="embedded")
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks of the llama-7b shape")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded model's)")
    parser.add_argument("--calib", default="64x256", help="calibration windows x seqlen")
    parser.add_argument("--data", default=None, help="embedded (default), a text path, or random (token ids)")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--ranks", type=int, default=2, help="processes under torchrun")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (alone and per rank)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="docs/study/distributed/divided_embedded.json")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    forwarded = sys.argv[1:]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The ranks first: theirs is the run that may exhaust the host's memory (N processes on one host).
        for name, launcher in ((f"{args.ranks} ranks", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(args.ranks)]),
                               ("alone", [sys.executable])):
            path = os.path.join(tmp, "run.json")
            code = subprocess.run([*launcher, __file__, *forwarded, "--worker-out", path], env=env).returncode
            if code:  # keep what finished (at 7B shape, an hour of build), say what failed
                print(f"{name}: failed with exit status {code} (a negative status is the signal, -9: killed, "
                      "e.g. out of memory)", file=sys.stderr, flush=True)
                write_results(args.out, [{"run": n, **r} for n, r in runs.items()] + [{"run": name, "failed": code}],
                              settings=vars(args) | {"worker_out": None}, summary=None)
                raise SystemExit(1)
            with open(path) as handle:
                runs[name] = json.load(handle)
            ranks = runs[name]["ranks"]
            print(f"{name}: build {max(r['build_seconds'] for r in ranks):.1f} s, peak RSS per rank "
                  f"{_gib(ranks, 'peak_rss_bytes')} GiB, cluster statistics per rank "
                  f"{_gib(ranks, 'cluster_statistic_bytes')} GiB", flush=True)
    alone, divided = runs["alone"], runs[f"{args.ranks} ranks"]
    summary = {
        "same_weights": alone["digest"] == divided["digest"],
        "build_seconds_ratio": max(r["build_seconds"] for r in divided["ranks"]) / alone["ranks"][0]["build_seconds"],
        "peak_rss_ratio": max(r["peak_rss_bytes"] for r in divided["ranks"]) / alone["ranks"][0]["peak_rss_bytes"],
        "cluster_statistic_ratio": (max(r["cluster_statistic_bytes"] for r in divided["ranks"])
                                    / alone["ranks"][0]["cluster_statistic_bytes"]),
    }
    print(json.dumps(summary), flush=True)
    write_results(args.out, [{"run": name, **run} for name, run in runs.items()], settings=vars(args) | {
        "worker_out": None}, summary=summary)


if __name__ == "__main__":
    main()
