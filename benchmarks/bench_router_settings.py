"""Which k-means settings should routers use? Perplexity and build time of Sparse Expansion per setting.

The Sparse Expansion authors run k-means with 100 restarts; this project defaults to 1. On the embedded
model (SmolLM2-135M) and corpus, with one calibration set and one test set shared by every run, each
setting builds a Sparse Expansion model (70% FFN sparsity, 16 experts, PCA reduction 32) from a fresh
copy of the dense model and measures its perplexity, the build seconds and the seconds spent fitting
routers. Settings: k-means++ with 1 / 4 / 16 restarts (300 Lloyd iterations at most), 1 restart with
10 and 50 iterations, 1 restart seeded with random tokens. The default setting is also run with other
seeds (`--noise-seeds`, applied to the first setting run): the spread of those perplexities is the noise
a setting has to beat. A stopped study goes on with `--resume` (each row's `run` indexes `commands`).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_router_settings.py --out docs/bench_router_settings.json

On a machine shared with other jobs, PASSIVE keeps torch's OpenMP threads from spinning at barriers
while another process holds the cores (on 2 shared cores that made everything about 5x slower); each
row records the load average before and after its build so contention shows in the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

from common import write_results

# name -> ExpansionConfig fields (besides experts and seed)
SETTINGS = {
    "restarts=1": {"kmeans_restarts": 1},
    "restarts=4": {"kmeans_restarts": 4},
    "restarts=16": {"kmeans_restarts": 16},
    "restarts=1, iterations=10": {"kmeans_restarts": 1, "kmeans_iterations": 10},
    "restarts=1, iterations=50": {"kmeans_restarts": 1, "kmeans_iterations": 50},
    "restarts=1, init=random": {"kmeans_restarts": 1, "kmeans_init": "random"},
}


def cpu_description() -> tuple[str, bool]:
    """The CPU's model name and whether it has AVX-512 (avx512f), from /proc/cpuinfo where there is one."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), "avx512f" in flags


def main() -> None:
    from sparse_expansion.expansion import ExpansionConfig
    from sparse_expansion.pruning import PruneOptions, SparsitySpec
    from sparse_expansion.workflow import RunSettings, evaluate, expand_session_model, open_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--settings", default=",".join(f"{i}" for i in range(len(SETTINGS))),
                        help="indices into the settings list, in order: " +
                             "; ".join(f"{i}: {name}" for i, name in enumerate(SETTINGS)))
    parser.add_argument("--noise-seeds", default="1,2",
                        help="extra seeds for the first setting, to measure run-to-run noise ('' for none)")
    parser.add_argument("--out", default="docs/bench_router_settings.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out (same measurement settings); run only the others")
    args = parser.parse_args()
    measured = ("calib_samples", "seqlen", "eval_samples", "experts", "sparsity")

    names = list(SETTINGS)
    chosen = [names[int(i)] for i in args.settings.split(",") if i]
    jobs = [(name, 0) for name in chosen] + [(chosen[0], int(s)) for s in args.noise_seeds.split(",") if s]
    command = "python " + " ".join(sys.argv)
    rows, commands, previous = [], [command], None
    if args.resume and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as handle:
            previous = json.load(handle)
        if any(previous["settings"][key] != getattr(args, key) for key in measured):
            sys.exit(f"{args.out} was measured with other settings; resume with the same {', '.join(measured)}")
        commands = previous.get("commands", [previous["command"]]) + [command]
        rows = [row for row in previous["results"] if (row["setting"], row["seed"]) in jobs]
        for row in rows:
            row.setdefault("run", 0)
    done = {(row["setting"], row["seed"]) for row in rows}
    cpu, avx512f = cpu_description()
    session = open_session(RunSettings(calib_samples=args.calib_samples, seqlen=args.seqlen,
                                       eval_samples=args.eval_samples, quiet=True))
    session.calibration()
    dense = {"ppl": previous["dense_ppl"], "eval_tokens": previous["eval_tokens"]} if previous else \
        evaluate(session, session.model)
    print(f"dense: ppl {dense['ppl']:.3f} on {dense['eval_tokens']} tokens", flush=True)
    spec = SparsitySpec(args.sparsity)
    extra = {"commands": commands, "cpu": cpu, "avx512f": avx512f,
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "settings": vars(args),
             "dense_ppl": dense["ppl"], "eval_tokens": dense["eval_tokens"],
             "calib_tokens": int(session.calibration().numel())}
    for name, seed in jobs:
        if (name, seed) in done:
            continue
        config = ExpansionConfig(experts=args.experts, seed=seed, **SETTINGS[name])
        model = copy.deepcopy(session.model)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        report = expand_session_model(session, model, spec, PruneOptions(), config)
        build_seconds = time.perf_counter() - start
        result = evaluate(session, model)
        del model
        rows.append({"setting": name, "kmeans_restarts": config.kmeans_restarts,
                     "kmeans_iterations": config.kmeans_iterations, "kmeans_init": config.kmeans_init,
                     "seed": seed, "ppl": result["ppl"], "mean_nll": result["mean_nll"],
                     "seconds": build_seconds, "router_seconds": report.router_seconds,
                     "fallback_experts": report.fallbacks(), "overall_sparsity": report.overall_sparsity(),
                     "load_average_1min": [load_before, os.getloadavg()[0]], "run": len(commands) - 1})
        print(f"{name} (seed {seed}): ppl {result['ppl']:.3f}, build {build_seconds:.1f} s, "
              f"routers {report.router_seconds:.1f} s", flush=True)
        # Rewritten (atomically) after every run, so a stopped study keeps what it measured.
        rows.sort(key=lambda row: jobs.index((row["setting"], row["seed"])))
        write_results(args.out, rows, **extra, complete=len(rows) == len(jobs))


if __name__ == "__main__":
    main()
