"""Issue 18's build changes judged over calibration seeds, on the embedded model and corpus: each is built at the
settings of study (a) of benchmarks/study_verdicts.py (5 seeds, 64 windows of 256 tokens each, 32 test windows,
one torch thread) and paired, seed by seed, with (a)'s Sparse Expansion x16 runs (the reference build).

    python benchmarks/study_builds.py run f        # one study (f, g, h) or a comma list, resumable
    python benchmarks/study_builds.py status
    python benchmarks/study_builds.py derive       # docs/study/builds/builds.json and builds.md

  (f) --factorization fast (one Cholesky and a triangular inverse) at 50% and 70%: accepted when the paired 95% CI
      of the perplexity ratio contains 1 and its half-width is below 3% (issue 18, item 2).
  (g) routers fitted on a sample: --router-tokens 2048 and 4096 of the 16,384 calibration tokens, 70%.
  (h) cluster statistics accumulated in bfloat16 (--statistic-dtype bfloat16), 70%.

The build seconds of each run (compare's `seconds`, one thread) are paired the same way: a time ratio measured on
the machine that ran both (check `environment` when a study was resumed elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

from study_verdicts import OUT as VERDICTS
from study_verdicts import SEEDS, _by_seed, _compare, _environments, _pair, run_commands, study_main

OUT = Path(__file__).resolve().parent.parent / "docs" / "study" / "builds"
EXPANSION = ["--methods", "sparse-expansion", "--experts", "16"]
STUDIES = {
    "f": [("f_fast_factorization", (0.5, 0.7), ["--factorization", "fast"])],
    "g": [("g_router_tokens_2048", (0.7,), ["--router-tokens", "2048"]),
          ("g_router_tokens_4096", (0.7,), ["--router-tokens", "4096"])],
    "h": [("h_statistics_bf16", (0.7,), ["--statistic-dtype", "bfloat16"])],
}
TITLES = {"f": "(f) fast factorization against the reference", "g": "(g) routers fitted on a sample of tokens",
          "h": "(h) cluster statistics in bfloat16"}
# Item 2's acceptance: not distinguishable, and the interval narrower than +-3%.
HALF_WIDTH = 0.03


def steps(study: str) -> list[list[str]]:
    if study not in STUDIES:
        raise SystemExit(f"unknown study {study!r}: choose from {', '.join(STUDIES)}")
    found = []
    for name, sparsities, extra in STUDIES[study]:
        found += _compare(name, *EXPANSION, "--sparsity", ",".join(map(str, sparsities)), *extra, out=OUT)
    return found


def _rows(path: Path) -> dict | None:
    """A finished study's JSON, else the rows its state directory holds so far (marked provisional)."""
    if path.exists():
        return json.loads(path.read_text())
    rows = Path(str(path) + ".partial") / "rows.json"
    if rows.exists():
        found = json.loads(rows.read_text())["rows"]
        digests = {r["test_windows_sha256"] for r in found}
        # rows from before compare recorded each row's environment fall back to the first recorded one
        environment = next((r["environment"] for r in found if "environment" in r), None)
        return {"results": found, "provisional": True, "test_windows_sha256": next(iter(digests), None),
                "environment": environment}
    return None


def derive() -> dict:
    reference = _rows(VERDICTS / "a_equal_sparsity.json")
    if reference is None:
        raise SystemExit("study (a) of benchmarks/study_verdicts.py has no runs yet: it is the reference build")
    found, payloads = {}, [reference]
    for study, entries in STUDIES.items():
        found[study] = []
        for name, sparsities, _ in entries:
            payload = _rows(OUT / f"{name}.json")
            if payload is None:
                continue
            payloads.append(payload)
            if payload["test_windows_sha256"] != reference["test_windows_sha256"]:
                raise SystemExit(f"{name} was evaluated on other test windows than study (a)")
            for s in sparsities:
                runs, ref = _by_seed(payload, "sparse-expansion", s, 16), _by_seed(reference, "sparse-expansion", s, 16)
                if not set(runs) & set(ref):
                    continue
                entry = _pair(f"{name} / reference build, x16 at {s:.0%}", runs, ref, sparsity=s,
                              provisional=bool(payload.get("provisional") or reference.get("provisional")))
                entry["build_seconds"] = _pair("build seconds", runs, ref, key="seconds")
                if study == "f":
                    entry["accepted"] = entry["verdict"].startswith("not distinguishable") and (
                        entry["ci_high"] - entry["ci_low"]) / 2 < HALF_WIDTH
                found[study].append(entry)
    environments = _environments(*payloads)
    lines = ["# Build changes over calibration seeds (benchmarks/study_builds.py derive)", "",
             "Each ratio pairs a changed build with the reference build (study (a)'s Sparse Expansion x16) seed by "
             "seed, on the same calibration and test windows; 95% Student-t intervals.", "",
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
            lines.append(f"| {e['comparison']}{note} | {e['n']} | {e['mean']:.4f} [{e['ci_low']:.4f}, "
                         f"{e['ci_high']:.4f}] | {e['verdict']}{accepted} | {t['mean']:.3f} [{t['ci_low']:.3f}, "
                         f"{t['ci_high']:.3f}] |")
        lines.append("")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "builds.json").write_text(json.dumps({"environments": environments, **found}, indent=2) + "\n")
    (OUT / "builds.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return found


def status() -> None:
    for study, entries in STUDIES.items():
        for name, sparsities, _ in entries:
            payload = _rows(OUT / f"{name}.json")
            count = 0 if payload is None else sum(1 for r in payload["results"] if not r.get("repeated"))
            print(f"({study}) {name}: {count} of {SEEDS * len(sparsities)} runs"
                  + ("" if payload is None or payload.get("provisional") else " (finished)"))


def main() -> None:
    study_main(__doc__, "f, g, h or a comma list of them",
               lambda study: run_commands([c for name in study.split(",") for c in steps(name)]), status, derive)


if __name__ == "__main__":
    main()
