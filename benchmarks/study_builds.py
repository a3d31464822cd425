"""Issue 18's build changes judged over calibration seeds, on the embedded model and corpus: each is built at the
settings of study (a) of benchmarks/study_verdicts.py (5 seeds, 64 windows of 256 tokens each, 32 test windows,
one torch thread) and paired, seed by seed, with a reference build: Sparse Expansion x16 with the reference
factorization, routers fitted on every token and fp32 statistics (the defaults when the studies began; since (f) was
accepted the experts' default factorization is the fast one, so every entry but (f) names the reference one).

    python benchmarks/study_builds.py run r07,f07   # studies or single entries (below), a comma list, resumable
    python benchmarks/study_builds.py run f07@5-7   # seeds 5-7 added to an entry (their own JSON; derive adds them)
    python benchmarks/study_builds.py status
    python benchmarks/study_builds.py derive        # docs/study/builds/builds.json and builds.md

  (r) the reference build re-run at 50% and 70% (r05, r07) on the machine that runs the others, so that no pair
      mixes two CPUs' rounding; paired with study (a)'s own runs it measures what moving machine alone does.
      Where r has no run for a seed, the pair falls back to study (a) and says so.
  (f) --factorization fast (one Cholesky and a triangular inverse), f05 and f07: accepted when the paired 95% CI
      of the perplexity ratio contains 1 and its half-width is below 3% (issue 18, item 2). f07 was not at five
      seeds (half-width 3.6%); seeds 5-7 were then added to it and to r07 (f07@5-7, r07@5-7), eight decided.
  (g) routers fitted on a sample: --router-tokens 2048 and 4096 of the 16,384 calibration tokens, 70% (g2048, g4096).
  (h) cluster statistics accumulated in bfloat16 (--statistic-dtype bfloat16), 70% (h07).
  (n) the experts' fast arithmetic as of 2026-12-07, today's default (no flag): one Cholesky and a triangular
      inverse per Hessian, one Hessian or a share of the experts per thread, the later columns updated once per
      block; n05 (5 seeds) and n07 (8 seeds, n07 and n07@5-7, the number fixed before any ran): accepted by (f)'s
      rule. Paired with the reference run in the same rounding environment: study (a)'s seeds 0-4 (an AVX-512
      EPYC with the same flags), and (p) for seeds 5-7. (A first run of (n), with each cluster's Hessian formed
      as one symmetric product as well, is kept as n_fast_arithmetic_syrk_*: that part was no faster, and dropped.)
  (p) the reference build re-run at 70% for seeds 5-7 (p07@5-7) on the machine of (n).

The build seconds of each run (compare's `seconds`, one thread) are paired the same way; a time ratio is reported
only for pairs measured in one rounding environment (one machine).
"""

from __future__ import annotations

import json
from pathlib import Path

from study_verdicts import OUT as VERDICTS
from study_verdicts import REFERENCE, SEEDS, _by_seed, _compare, _environments, _pair, run_commands, study_main

OUT = Path(__file__).resolve().parent.parent / "docs" / "study" / "builds"
EXPANSION = ["--methods", "sparse-expansion", "--experts", "16"]
# The reference build is the one these studies started from: the reference factorization (REFERENCE, the experts'
# default until study (f) was accepted, now named), every calibration token for the routers, fp32 statistics.
STUDIES = {
    "r": {"r05": (0.5, REFERENCE), "r07": (0.7, REFERENCE)},
    "f": {"f05": (0.5, ["--factorization", "fast"]), "f07": (0.7, ["--factorization", "fast"])},
    "g": {"g2048": (0.7, [*REFERENCE, "--router-tokens", "2048"]),
          "g4096": (0.7, [*REFERENCE, "--router-tokens", "4096"])},
    "h": {"h07": (0.7, [*REFERENCE, "--statistic-dtype", "bfloat16"])},
    "n": {"n05": (0.5, []), "n07": (0.7, [])},
    "p": {"p07": (0.7, REFERENCE)},
}
# Studies judged by item 2's rule, and the reference studies their runs are paired with.
JUDGED = ("f", "n")
REFERENCES = ("p", "r")
NAMES = {"r05": "r_reference_50", "r07": "r_reference_70", "f05": "f_fast_factorization_50",
         "f07": "f_fast_factorization_70", "g2048": "g_router_tokens_2048", "g4096": "g_router_tokens_4096",
         "h07": "h_statistics_bf16", "n05": "n_fast_arithmetic_50", "n07": "n_fast_arithmetic_70",
         "p07": "p_reference_here_70"}
TITLES = {"r": "(r) the reference build on this machine against study (a)'s",
          "f": "(f) fast factorization against the reference", "g": "(g) routers fitted on a sample of tokens",
          "h": "(h) cluster statistics in bfloat16",
          "n": "(n) the experts' fast arithmetic of 2026-12-07 (today's default) against the reference",
          "p": "(p) the reference build on the machine of (n), seeds 5-7"}
# Item 2's acceptance: not distinguishable, and the interval narrower than +-3%.
HALF_WIDTH = 0.03


def _entries(selection: str) -> list[tuple[str, int, int]]:
    """(entry, first seed, seeds) named by a study letter (all of its entries), an entry's own name (seeds 0-4), or
    ENTRY@FIRST-LAST (more seeds of one entry, in a JSON of their own that derive adds to the entry's)."""
    selection, _, more = selection.partition("@")
    if more:
        first, _, last = more.partition("-")
        if not (first.isdigit() and last.isdigit() and SEEDS <= int(first) <= int(last)):
            raise SystemExit(f"{selection}@{more}: give the added seeds as FIRST-LAST, from {SEEDS} on")
        if selection in STUDIES:
            raise SystemExit(f"{selection}@{more}: seeds are added to one entry, not to a whole study")
    seeds = (0, SEEDS) if not more else (int(first), int(last) - int(first) + 1)
    if selection in STUDIES:
        return [(entry, *seeds) for entry in STUDIES[selection]]
    if any(selection in entries for entries in STUDIES.values()):
        return [(selection, *seeds)]
    known = ", ".join(f"{study} ({', '.join(entries)})" for study, entries in STUDIES.items())
    raise SystemExit(f"unknown study {selection!r}: choose from {known}")


def _file(entry: str, first: int, seeds: int) -> str:
    return NAMES[entry] if first == 0 else f"{NAMES[entry]}.seeds-{first}-{first + seeds - 1}"


def steps(selection: str) -> list[list[str]]:
    found = []
    for entry, first, seeds in _entries(selection):
        sparsity, extra = next(e[entry] for e in STUDIES.values() if entry in e)
        found += _compare(_file(entry, first, seeds), *EXPANSION, "--sparsity", str(sparsity), *extra, out=OUT,
                          first=first, seeds=seeds)
    return found


def _entry_rows(entry: str) -> dict | None:
    """An entry's runs: its five seeds' JSON (or state) and the seeds added to it (ENTRY@FIRST-LAST), as one."""
    parts = [_rows(OUT / f"{NAMES[entry]}.json")]
    added = sorted({p.name.removesuffix(".partial") for p in OUT.glob(f"{NAMES[entry]}.seeds-*.json*")})
    parts += [_rows(OUT / name) for name in added]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len({p["test_windows_sha256"] for p in parts} - {None}) > 1:
        raise SystemExit(f"{NAMES[entry]}: its added seeds were evaluated on other test windows")
    results = [row for p in parts for row in p["results"]]
    seeds = [row["seed"] for row in results if not row.get("repeated")]
    if len(seeds) != len(set(seeds)):
        raise SystemExit(f"{NAMES[entry]}: a seed was run twice (overlapping ENTRY@FIRST-LAST files)")
    return {**parts[0], "results": results, "provisional": any(p.get("provisional") for p in parts)}


def _rows(path: Path) -> dict | None:
    """A finished study's JSON, else the rows its state directory holds so far (marked provisional); every row
    carries its rounding environment (rows from before compare recorded one per row take the study's)."""
    if path.exists():
        payload = json.loads(path.read_text())
    elif (rows := Path(str(path) + ".partial") / "rows.json").exists():
        found = json.loads(rows.read_text())["rows"]
        digests = {r["test_windows_sha256"] for r in found}
        # rows from before compare recorded each row's environment fall back to the first recorded one
        environment = next((r["environment"] for r in found if "environment" in r), None)
        payload = {"results": found, "provisional": True, "test_windows_sha256": next(iter(digests), None),
                   "environment": environment}
    else:
        return None
    payload["results"] = [{**row, "environment": row.get("environment") or payload["environment"]}
                          for row in payload["results"]]
    return payload


def _runs(payload: dict | None, sparsity: float) -> dict:
    """A study's x16 runs at a sparsity, by seed."""
    return {} if payload is None else _by_seed(payload, "sparse-expansion", sparsity, 16)


def _rounding(environment: dict) -> dict:
    """A rounding environment: a run's environment less the OpenMP wait policy (which moves time, not numbers)."""
    return {key: value for key, value in environment.items() if key != "omp_wait_policy"}


def _reference_runs(sparsity: float, here: dict, a: dict) -> tuple[dict, str]:
    """Reference runs at a sparsity, seed by seed: the one made in the same rounding environment as the run it pairs
    with, from studies (p), (r) and (a) in that order; where none was, study (r)'s, else study (a)'s."""
    pools = {study: _runs(_entry_rows(entry), sparsity) for study in REFERENCES
             for entry, (s, _) in STUDIES[study].items() if abs(s - sparsity) < 1e-9}
    pools["a"] = _runs(a, sparsity)
    runs, sources = {}, []
    for seed, run in here.items():
        found = [(study, pool[seed]) for study, pool in pools.items() if seed in pool]
        same = [(study, ref) for study, ref in found if _rounding(ref["environment"]) == _rounding(run["environment"])]
        fallback = [(study, ref) for study, ref in found if study in ("r", "a")]
        if same or fallback:
            study, runs[seed] = (same or fallback)[0]
            sources.append(study)
    return runs, ", ".join(dict.fromkeys(sources)) or "none"


def _interval(summary: dict, digits: int) -> str:
    """`mean [low, high]`, the mean alone for one seed."""
    if summary["ci_low"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"


def derive() -> dict:
    a = _rows(VERDICTS / "a_equal_sparsity.json")
    if a is None:
        raise SystemExit("study (a) of benchmarks/study_verdicts.py has no runs yet: it is the fallback reference")
    found, payloads = {}, [a]
    for study, entries in STUDIES.items():
        found[study] = []
        for entry, (sparsity, _) in entries.items():
            payload = _entry_rows(entry)
            if payload is None or not payload["results"]:  # not started, or a state with no finished run yet
                continue
            payloads.append(payload)
            if payload["test_windows_sha256"] != a["test_windows_sha256"]:
                raise SystemExit(f"{NAMES[entry]} was evaluated on other test windows than study (a)")
            runs = _runs(payload, sparsity)
            if study == "r":
                ref, source = _runs(a, sparsity), "a"
                label = f"{NAMES[entry]} / study (a), x16 at {sparsity:.0%}"
            else:
                ref, source = _reference_runs(sparsity, runs, a)
                label = f"{NAMES[entry]} / reference build ({source}), x16 at {sparsity:.0%}"
            if not set(runs) & set(ref):
                continue
            pairs = set(runs) & set(ref)
            # One rounding environment: the numbers pair; the same conditions as well (the wait policy too): the
            # build times pair.
            one_machine = all(_rounding(runs[seed]["environment"]) == _rounding(ref[seed]["environment"])
                              for seed in pairs)
            same_conditions = one_machine and all(runs[seed]["environment"] == ref[seed]["environment"]
                                                  for seed in pairs)
            e = _pair(label, runs, ref, sparsity=sparsity, reference_study=source, one_machine=one_machine,
                      provisional=bool(payload.get("provisional")))
            e["build_seconds"] = _pair("build seconds", runs, ref, key="seconds") if same_conditions else None
            if study in JUDGED:
                e["accepted"] = bool(one_machine and e["ci_low"] is not None and e["n"] >= SEEDS
                                     and e["verdict"].startswith("not distinguishable")
                                     and (e["ci_high"] - e["ci_low"]) / 2 < HALF_WIDTH)
            found[study].append(e)
    environments = []
    for environment in map(_rounding, _environments(*payloads)):  # the wait policy left out
        if environment not in environments:
            environments.append(environment)
    lines = ["# Build changes over calibration seeds (benchmarks/study_builds.py derive)", "",
             "Each ratio pairs a changed build with the reference build (Sparse Expansion x16, reference "
             "factorization, all router tokens, fp32 statistics) seed by seed, on the same calibration and test "
             "windows; 95% Student-t intervals. Each seed's reference is the run made in the same rounding "
             "environment as the change's (from studies (p), (r) and (a), in that order; the OpenMP wait policy moves "
             "time, not numbers, and is left out), else study (r)'s; the source is named after each comparison. A "
             "build time ratio is given only where both sides ran in one environment under the same wait policy.",
             "",
             f"Rounding environments: {len(environments)} ("
             + "; ".join(f"{e['cpu']} {e['aten_cpu_capability']}, {e['threads']} threads" for e in environments)
             + ").", ""]
    for study, entries in found.items():
        lines += [f"## {TITLES[study]}", ""]
        if not entries:
            lines += ["(not run yet)", ""]
            continue
        lines += ["| comparison | seeds | ppl ratio [95% CI] | verdict | build time ratio [95% CI] |",
                  "|---|---|---|---|---|"]
        for e in entries:
            t = e["build_seconds"]
            note = " (provisional)" if e["provisional"] else ""
            accepted = "" if "accepted" not in e else (", accepted" if e["accepted"] else ", not accepted")
            time = _interval(t, 3) if t else "other run conditions" if e["one_machine"] else "two machines"
            lines.append(f"| {e['comparison']}{note} | {e['n']} | {_interval(e, 4)} | {e['verdict']}{accepted} | "
                         f"{time} |")
        lines.append("")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "builds.json").write_text(json.dumps({"environments": environments, **found}, indent=2) + "\n")
    (OUT / "builds.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return found


def status() -> None:
    for study, entries in STUDIES.items():
        for entry in entries:
            payload = _entry_rows(entry)
            count = 0 if payload is None else sum(1 for r in payload["results"] if not r.get("repeated"))
            print(f"({study}) {entry} {NAMES[entry]}: {count} runs (the study plans {SEEDS}, ENTRY@F-L adds more)"
                  + ("" if payload is None or payload.get("provisional") else " (finished)"))


def main() -> None:
    study_main(__doc__, "r, f, g, h, n, p, an entry (r05, r07, f05, f07, g2048, g4096, h07, n05, n07, p07), "
                        "ENTRY@FIRST-LAST (seeds added to an entry, from 5 on) or a comma list of them",
               lambda study: run_commands([c for name in study.split(",") for c in steps(name)]), status, derive)


if __name__ == "__main__":
    main()
