"""The documented verdicts re-derived over calibration seeds (issue 17, item 4), on the embedded model and corpus.

    python benchmarks/study_verdicts.py run a        # one study (a..e), resumable: run it again after a stop
    python benchmarks/study_verdicts.py run all      # every study, one after the other
    python benchmarks/study_verdicts.py run d@3,d@4  # only these seeds of a per-seed study (c, d)
    python benchmarks/study_verdicts.py status       # finished runs of each study
    python benchmarks/study_verdicts.py derive       # docs/study/verdicts/verdicts.json and verdicts.md

Every run draws its calibration windows with seed 0..4 (64 windows of 256 tokens each, 16,384 tokens), the test
windows are the same for all, one torch thread per process (two studies can run side by side on two cores with the
same rounding as alone). The studies:

  (a) Sparse Expansion (k = 4 and 16) against SparseGPT at equal per-expert sparsity, 50/70/90%: one compare.
  (b) at equal FFN FLOPs per token (routers counted as computed): SparseGPT at the sparsity whose FLOPs equal Sparse
      Expansion's, paired by seed with (a)'s Sparse Expansion runs.
  (c) CETT against top-k and FAT-epsilon at CETT's activation ratio at PPL+1% (`activations --baselines`).
  (d) the Wasserstein-neuron ablation against its controls at 90% and 99% (`neurons --ablate`).
  (e) selective expansion at p = 10% (70%, k = 16) against full expansion and SparseGPT from (a).

compare keeps its own state (`--resume`); activations and neurons run one seed per command (`--seed S`, which
gives what seed S of `--seeds N` gives, tests/test_seeds.py), so a stop loses at most the seed in progress.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "study" / "verdicts"
SEEDS = 5
CALIB = ["--calib-samples", "64", "--seqlen", "256", "--threads", "1", "--quiet"]
EVAL = ["--eval-samples", "32"]
# The factorization these studies were run with (the experts' default until issue 18's study (f) made it the fast
# one: benchmarks/study_builds.py); named so that a re-run gives the recorded numbers.
REFERENCE = ["--factorization", "reference"]
SPARSITIES = (0.5, 0.7, 0.9)
EXPERTS = (4, 16)
# The embedded model's FFN (SmolLM2-135M: d_model 576, d_ffn 1536): a block's three FFN linears cost
# 2 * 3 * 576 * 1536 FLOPs per token dense; its two routers 2 * k * (576 + 1536) (models/costs.py; `derive` checks
# the measured FLOPs of both sides instead of trusting this).
DENSE_BLOCK = 2 * 3 * 576 * 1536
ROUTER_BLOCK = 2 * (576 + 1536)


def iso_sparsity(sparsity: float, experts: int) -> float:
    """SparseGPT's sparsity with at least Sparse Expansion's FFN FLOPs (rounded down at 4 decimals)."""
    return math.floor((sparsity - experts * ROUTER_BLOCK / DENSE_BLOCK) * 1e4) / 1e4


def _cli() -> list[str]:
    return [str(Path(sys.executable).with_name("sparse-expansion"))]


def _compare(name: str, *args: str, out: Path = OUT, first: int = 0, seeds: int = SEEDS) -> list[list[str]]:
    """compare over seeds first .. first + seeds - 1 into out/name.json (resumed from its state where one is)."""
    json_path = out / f"{name}.json"
    if json_path.exists():
        return []
    state = Path(str(json_path) + ".partial")
    resume = ["--resume", str(state)] if state.exists() else []
    return [[*_cli(), "compare", *args, *CALIB, *EVAL, "--seed", str(first), "--seeds", str(seeds),
             "--json", str(json_path), *resume]]


def steps(study: str) -> list[list[str]]:
    """The commands of a study that are still to run; `c@S` / `d@S`: only seed S's (so that two processes can share
    a study's seeds on two cores)."""
    study, _, only = study.partition("@")
    if only and study not in ("c", "d"):
        raise SystemExit(f"{study}@{only}: only the per-seed studies c and d take a seed")
    if study == "a":
        return _compare("a_equal_sparsity", "--methods", "sparsegpt,sparse-expansion", *REFERENCE,
                        "--sparsity", ",".join(map(str, SPARSITIES)), "--experts", ",".join(map(str, EXPERTS)))
    if study == "b":
        iso = [iso_sparsity(s, k) for k in EXPERTS for s in SPARSITIES]
        return _compare("b_iso_flops_sparsegpt", "--methods", "sparsegpt", "--sparsity", ",".join(map(str, iso)))
    if study == "e":
        return _compare("e_selective10", "--methods", "sparse-expansion", *REFERENCE, "--selective", "10",
                        "--sparsity", "0.7", "--experts", "16")
    found = []
    for seed in ([int(only)] if only else range(SEEDS)):
        if study == "c":
            path = OUT / "c_activations" / f"seed-{seed}.json"
            if not path.exists():
                found.append([*_cli(), "activations", "--baselines", "--ppl-increase", "0.01", *CALIB,
                              "--max-tokens", "16384",  # every calibration token of the draw, not 4,096
                              "--eval-samples", "16", "--seed", str(seed), "--json", str(path)])
        elif study == "d":
            path = OUT / "d_neurons" / f"seed-{seed}"
            if not path.exists():
                found.append([*_cli(), "neurons", "--ablate", "--ablate-sparsity", "0.9,0.99", "--no-plots", *CALIB,
                              *EVAL, "--seed", str(seed), "--out", str(path)])
        else:
            raise SystemExit(f"unknown study {study!r}: choose from a, b, c, d, e, all")
    return found


def run_commands(commands: list[list[str]]) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for command in commands:
        if "--resume" not in command and Path(command[-1]).exists():
            continue  # another process finished it meanwhile (c@S, d@S)
        Path(command[-1]).parent.mkdir(parents=True, exist_ok=True)
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, env=env)


def run(studies: list[str]) -> None:
    for study in studies:  # each study's commands listed at its turn: it may read what the earlier ones wrote
        run_commands(steps(study))


# -- derive ------------------------------------------------------------------------------------------------

def _load(name: str) -> dict | None:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else None


def _by_seed(payload: dict, method: str, sparsity: float, experts=None) -> dict[int, dict]:
    return {r["seed"]: r for r in payload["results"]
            if r["method"] == method and abs(r["sparsity"] - sparsity) < 1e-9 and r.get("experts") == experts}


def _pair(name: str, runs: dict[int, dict], reference: dict[int, dict], key: str = "ppl", **extra) -> dict:
    from sparse_expansion.evaluation import spread

    seeds = sorted(set(runs) & set(reference))
    values, ref = [runs[s][key] for s in seeds], [reference[s][key] for s in seeds]
    return {"comparison": name, "seeds": seeds, "ppl": spread.summarize(values), "reference_ppl":
            spread.summarize(ref), **spread.paired_ratio(values, ref), **extra}


def _windows(*payloads: dict) -> None:
    """Paired runs must share the test windows (and, seed by seed, the calibration windows)."""
    digests = {p["test_windows_sha256"] for p in payloads if p}
    if len(digests) > 1:
        raise SystemExit("the studies' compare runs were evaluated on different test windows")


def _environments(*payloads: dict) -> list[dict]:
    """The distinct rounding environments the compare runs ran in (resumed studies may span machines)."""
    found = []
    for payload in payloads:
        for row in (payload or {}).get("results", []):
            env = row.get("environment") or payload["environment"]
            if env not in found:
                found.append(env)
    return found


def derive_a(a: dict) -> list[dict]:
    found = []
    for s in SPARSITIES:
        reference = _by_seed(a, "sparsegpt", s)
        for k in EXPERTS:
            found.append(_pair(f"Sparse Expansion x{k} / SparseGPT at {s:.0%}", _by_seed(a, "sparse-expansion", s, k),
                               reference, sparsity=s, experts=k))
    return found


def derive_b(a: dict, b: dict) -> list[dict]:
    found = []
    for k in EXPERTS:
        for s in SPARSITIES:
            iso = iso_sparsity(s, k)
            expansion, reference = _by_seed(a, "sparse-expansion", s, k), _by_seed(b, "sparsegpt", iso)
            if not expansion or not reference:
                continue
            se_flops = next(iter(expansion.values()))["ffn_flops_per_token"]
            sgpt_flops = next(iter(reference.values()))["ffn_flops_per_token"]
            found.append(_pair(f"Sparse Expansion x{k} at {s:.0%} / SparseGPT at {iso:.2%} (equal FFN FLOPs)",
                               expansion, reference, sparsity=s, experts=k, reference_sparsity=iso,
                               ffn_flops_per_token=se_flops, reference_ffn_flops_per_token=sgpt_flops))
    return found


def derive_c(runs: list[dict]) -> list[dict]:
    from sparse_expansion.evaluation import spread

    cett = {i: {"ppl": r["sparse_ppl"]} for i, r in enumerate(runs)}
    found = []
    for name in ("top-k", "FAT-epsilon"):
        other = {i: {"ppl": r["at_cett_ratio"][name]["ppl"]} for i, r in enumerate(runs)}
        found.append(_pair(f"{name} / CETT at CETT's activation ratio (PPL+1%)", other, cett,
                           activation_ratio=spread.summarize([r["activation_ratio"] for r in runs]),
                           baseline_activation_ratio=spread.summarize([r["at_cett_ratio"][name]["activation_ratio"]
                                                                       for r in runs])))
    return found


def derive_d(runs: list[list[dict]]) -> list[dict]:
    found = []
    by_seed = [{(r["variant"], r["criterion"], r["sparsity"]): {"ppl": r["ppl"]} for r in rows} for rows in runs]
    for variant, sparsity in (("sparsegpt-rows", 0.9), ("sparsegpt-rows", 0.99), ("zero-negative", None)):
        reference = {i: rows[(variant, "wasserstein", sparsity)] for i, rows in enumerate(by_seed)}
        controls = [k[1] for k in by_seed[0] if k[0] == variant and k[2] == sparsity and k[1] != "wasserstein"]
        if not controls:
            raise SystemExit(f"the ablation has no {variant} rows at sparsity {sparsity}")
        for criterion in controls:  # the neurons job's own names: mean, variance, weight-norm, random
            key = (variant, criterion, sparsity)
            label = "negative pre-activations zeroed" if sparsity is None else f"{sparsity:.0%} of the rows"
            found.append(_pair(f"{criterion} / wasserstein, {label}", {i: rows[key] for i, rows in enumerate(by_seed)},
                               reference, variant=variant, criterion=criterion, sparsity=sparsity))
    return found


def derive_e(a: dict, e: dict) -> list[dict]:
    selective = _by_seed(e, "sparse-expansion", 0.7, 16)
    full, sparsegpt = _by_seed(a, "sparse-expansion", 0.7, 16), _by_seed(a, "sparsegpt", 0.7)
    found = [_pair("selective 10% / SparseGPT at 70%", selective, sparsegpt),
             _pair("selective 10% / full Sparse Expansion x16 at 70%", selective, full)]
    gains = []
    for seed in sorted(set(selective) & set(full) & set(sparsegpt)):
        s, f, g = selective[seed]["ppl"], full[seed]["ppl"], sparsegpt[seed]["ppl"]
        gains.append((g - s) / (g - f))  # the share of full expansion's gain over SparseGPT that p = 10% recovers
    from sparse_expansion.evaluation import spread

    if gains:
        found.append({"comparison": "share of full expansion's gain recovered by selective 10%",
                      "seeds": sorted(set(selective) & set(full) & set(sparsegpt)), "shares": gains,
                      **spread.summarize(gains)})
    return found


def _line(entry: dict) -> str:
    from sparse_expansion.evaluation import spread

    if "shares" in entry:
        return (f"| {entry['comparison']} | {entry['n']} | - | - | {spread.describe(entry, 3)} | - |")
    return (f"| {entry['comparison']} | {entry['n']} | {spread.describe(entry['ppl'])} | "
            f"{spread.describe(entry['reference_ppl'])} | {entry['mean']:.3f} [{entry['ci_low']:.3f}, "
            f"{entry['ci_high']:.3f}] | {entry['verdict']} |")


def derive() -> dict:
    a, b, e = _load("a_equal_sparsity.json"), _load("b_iso_flops_sparsegpt.json"), _load("e_selective10.json")
    _windows(a, b, e)
    c = [json.loads(p.read_text()) for p in sorted((OUT / "c_activations").glob("seed-*.json"))]
    d = [json.loads((p / "ablation.json").read_text())["results"]
         for p in sorted((OUT / "d_neurons").glob("seed-*")) if (p / "ablation.json").exists()]
    environments = _environments(a, b, e)
    verdicts = {"environments": environments, "a": derive_a(a) if a else None, "b": derive_b(a, b) if a and b else None,
                "c": derive_c(c) if len(c) > 1 else None, "d": derive_d(d) if len(d) > 1 else None,
                "e": derive_e(a, e) if a and e else None}
    titles = {"a": "(a) equal per-expert sparsity", "b": "(b) equal FFN FLOPs per token (routers counted)",
              "c": "(c) activation sparsity at equal activation ratio", "d": "(d) Wasserstein-neuron ablation",
              "e": "(e) selective expansion, p = 10%"}
    lines = ["# Verdicts over calibration seeds (benchmarks/study_verdicts.py derive)", "",
             "Ratios are paired by seed (method / reference; below 1: lower perplexity than the reference), with "
             "their 95% Student-t interval.", ""]
    described = "; ".join(f"{e['cpu']} {e['aten_cpu_capability']}, {e['threads']} threads" for e in environments)
    lines += [f"Rounding environments of the compare runs: {len(environments)} ({described}).", ""]
    for key, entries in verdicts.items():
        if key == "environments":
            continue
        lines += [f"## {titles[key]}", ""]
        if not entries:
            lines += ["(fewer than two seeds finished)", ""]
            continue
        lines += ["| comparison | seeds | ppl (mean ± 95%) | reference ppl | ratio [95% CI] | verdict |",
                  "|---|---|---|---|---|---|", *map(_line, entries), ""]
    (OUT / "verdicts.json").write_text(json.dumps(verdicts, indent=2) + "\n")
    (OUT / "verdicts.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return verdicts


def status() -> None:
    """How far each study has got: finished runs against planned ones (from the JSON or the state directory)."""
    planned = {"a": SEEDS * len(SPARSITIES) * (1 + len(EXPERTS)), "b": SEEDS * len(SPARSITIES) * len(EXPERTS),
               "e": SEEDS}
    for study, name in (("a", "a_equal_sparsity"), ("b", "b_iso_flops_sparsegpt"), ("e", "e_selective10")):
        done = _load(f"{name}.json")
        if done is not None:
            count = sum(1 for r in done["results"] if not r.get("repeated"))
        else:
            rows = OUT / f"{name}.json.partial" / "rows.json"
            count = len(json.loads(rows.read_text())["rows"]) if rows.exists() else 0
        print(f"({study}) {count} of {planned[study]} runs" + (" (finished)" if done is not None else ""))
    for study, pattern in (("c", "c_activations/seed-*.json"), ("d", "d_neurons/seed-*/ablation.json")):
        print(f"({study}) {len(list(OUT.glob(pattern)))} of {SEEDS} seeds")


def study_main(doc: str, studies_help: str, run_studies, show_status, derive_all) -> None:
    """The command line every study script shares: run STUDIES, status, derive."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("run").add_argument("study", help=studies_help)
    sub.add_parser("derive")
    sub.add_parser("status")
    args = parser.parse_args()
    if args.action == "run":
        run_studies(args.study)
    elif args.action == "status":
        show_status()
    else:
        derive_all()


def main() -> None:
    study_main(__doc__, "a, b, c, d, e (c@S, d@S: seed S only), a comma list of them, or all",
               lambda study: run(list("abecd") if study == "all" else study.split(",")), status, derive)


if __name__ == "__main__":
    main()
