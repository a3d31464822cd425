"""Compare techniques on the same calibration and test windows.

The techniques come from the registries: `dense`, every pruning method (pruning/methods.py) and Sparse
Expansion (whose experts are pruned by a method of the same registry). Each says whether it reads
calibration data, supports joint quantization and which linears it touches, so a new pruning method
appears here, in the CLI and in the manifest without edits to this file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..errors import UsageError
from ..evaluation import spread
from ..expansion import ExpansionConfig, ExpansionReport
from ..io import atomic_write_text, check_output_path
from ..io.block_store import BlockStore, default_state_dir
from ..io.state_dir import StateDir
from ..layers.protocol import unique_tensor_bytes
from ..models import discover, ffn_costs
from ..pruning import METHODS, PruneOptions, PruneReport, SparsitySpec, get_method
from ..pruning.methods import PruneSettings
from ..settings import SettingError
from .build import fingerprint
from .jobs import (
    calibration_warning,
    evaluate,
    expand_session_model,
    prune_session_model,
    too_big_to_hold,
)
from .report import compare_figure, environment, markdown_report, windows_digest
from .session import RunSettings, Session, open_session
from .settings import CompareSettings, EvalSettings, OutputSettings, SeedSettings
from .streamed import build_streamed, evaluate_from_store, meta_copy, scratch_store, source_onload, streamed_costs

EXPANSION = "sparse-expansion"


@dataclass(frozen=True)
class Technique:
    name: str
    uses_data: bool  # needs calibration windows
    supports_bits: bool
    scope: str | None  # the linears it touches when fixed ("ffn"), else None: the session's --scope
    per_experts: bool = False  # one run per expert count
    # (session, model, spec, options, experts, expansion config[, engine hooks, report]) -> report with
    # .seconds and .overall_sparsity()
    apply: Callable | None = None
    # (session, spec, experts, expansion config) -> an empty report of the kind `apply` fills
    new_report: Callable | None = None


def _prune(name: str) -> Callable:
    def apply(session, model, spec, options, experts, config, hooks=None, report=None):
        return prune_session_model(session, model, name, spec, options, hooks, report)
    return apply


def _prune_report(name: str) -> Callable:
    return lambda session, spec, experts, config: PruneReport(method=name, spec=spec, scope=session.settings.scope)


def _expand(session, model, spec, options, experts, config, hooks=None, report=None):
    config = dataclasses.replace(config, experts=experts)
    return expand_session_model(session, model, spec, options, config, hooks, report=report)


def _expand_report(session, spec, experts, config):
    return ExpansionReport(spec=spec, config=dataclasses.replace(config, experts=experts))


class CompareState(StateDir):
    """compare's state directory: the finished rows (`rows.json`, rewritten atomically after each job) and the
    blocks of the job in progress (`job-NNN/`, io/block_store.py). `--resume DIR` reuses the rows and
    continues the job in progress after its last saved block. Rank 0 checks (or creates) it first."""

    ROWS = "rows.json"

    def __init__(self, path: str | Path, fingerprint: dict, resume: bool):
        super().__init__(path, fingerprint, resume, file=self.ROWS, what="compare", initial={"rows": []})

    @property
    def rows(self) -> list[dict]:
        return self.state["rows"]

    def job_store(self, index: int, description: dict) -> BlockStore:
        return BlockStore(self.path / f"job-{index:03d}", description, resume=None)

    def add_row(self, index: int, row: dict) -> None:
        self.rows.append(row)
        self.save()
        if distributed.is_main():
            shutil.rmtree(self.path / f"job-{index:03d}", ignore_errors=True)
        distributed.barrier()

    def has_progress(self) -> bool:
        """Rows or saved blocks that a resumed run would reuse."""
        return bool(self.rows) or any(self.path.glob("job-*"))


def techniques() -> dict[str, Technique]:
    found = {"dense": Technique("dense", uses_data=False, supports_bits=False, scope=None)}
    for name, method in METHODS.items():
        found[name] = Technique(name, uses_data=method.statistic is not None, supports_bits=method.supports_bits,
                                scope=None, apply=_prune(name), new_report=_prune_report(name))
    found[EXPANSION] = Technique(EXPANSION, uses_data=True, supports_bits=True, scope="ffn", per_experts=True,
                                 apply=_expand, new_report=_expand_report)
    return found


def technique(name: str) -> Technique:
    known = techniques()
    if name not in known:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(known)}")
    return known[name]


def _jobs(chosen: list[Technique], specs: list[SparsitySpec], experts: list[int], seeds: list[int]) -> list[tuple]:
    """(seed, technique, spec, experts) for every run; a technique that reads no data runs at the first seed only
    (its figure does not depend on the draw; `_seeded_rows` repeats it for the pairing)."""
    jobs = []
    for seed in seeds:
        for t in chosen:
            if not t.uses_data and seed != seeds[0]:
                continue
            if t.apply is None:
                jobs.append((seed, t, None, None))
                continue
            for spec in specs:
                for k in (experts if t.per_experts else [None]):
                    jobs.append((seed, t, spec, k))
    return jobs


def _row(session: Session, t: Technique, spec, k, options: PruneOptions, model, report, store=None) -> dict:
    """The run's figures; with a `store`, the model was built into it block by block (its blocks are on disk and
    are evaluated from there, one at a time)."""
    s = session.settings
    calib_tokens = int(session.calib.numel()) if session.calib is not None and t.uses_data else 0
    row = {"method": t.name, "sparsity": spec.sparsity if spec else 0.0,
           "nm": f"{spec.n}:{spec.m}" if spec and spec.is_nm else None, "experts": k,
           "bits": options.bits if t.supports_bits else None, "scope": t.scope or s.scope, "seqlen": s.seqlen,
           "seed": s.seed, "calib_tokens": calib_tokens, "seconds": report.seconds if report else 0.0,
           "measured_sparsity": report.overall_sparsity() if report else 0.0,
           "calibration_warning": calibration_warning(session, t.scope or s.scope) if t.uses_data else None,
           "calib_windows_sha256": windows_digest(session.calib) if t.uses_data else None,
           "test_windows_sha256": windows_digest(session.evaluation()),
           "environment": environment(session)}  # per run: a resumed compare may run on another machine
    if store is None:
        row.update(ffn_costs(model, discover(model)))
        row.update(evaluate(session, model, desc=f"ppl {t.name}"))
        return row
    row.update(streamed_costs(session, store))
    row.update(evaluate_from_store(session, model, store, f"ppl {t.name} (streamed)"))
    return row


def built_bytes(session: Session, t: Technique, experts: int | None) -> int:
    """What a job's model would take whole in memory: the dense model's tensors, and for Sparse Expansion k - 1
    more copies of its FFN linears."""
    model = session.model
    total = unique_tensor_bytes([*model.parameters(), *model.buffers()])
    if t.per_experts and experts:
        size = next(p.element_size() for p in model.parameters())
        ffn = sum(lin.in_features * lin.out_features for lin in session.layout.select("ffn"))
        total += (experts - 1) * ffn * len(session.layout.blocks) * size
    return total


def streams(session: Session, t: Technique, experts: int | None, streamed: bool | None) -> bool:
    """Whether a job is built into its store and evaluated block by block: when asked (`streamed`), or (None) when
    its model would take more than WHOLE_MODEL_SHARE of the device's free memory (the rule `eval` follows)."""
    if t.apply is None or not t.uses_data or streamed is False:
        return False
    if streamed:
        return True
    return too_big_to_hold(built_bytes(session, t, experts), session.settings.device)


def compare(session: Session, methods: list[str], specs: list[SparsitySpec], options: PruneOptions,
            experts: list[int] | None = None, expansion: ExpansionConfig | None = None,
            state: CompareState | None = None, seeds: list[int] | None = None,
            streamed: bool | None = False) -> list[dict]:
    """Each method at each sparsity (and each expert count) on the same test windows, once per calibration seed
    (default: the session's seed), the runs of one seed on the same calibration windows. With a `state`, every
    finished row and every block of the job in progress is saved, and a resumed run continues where the
    interrupted one stopped. `streamed` (None: when the built model would not fit, `streams`): each built model
    stays on disk, in its job's store (the state's, else a temporary one), and is evaluated one block at a time."""
    expansion = expansion or ExpansionConfig()
    experts = experts or [expansion.experts]
    seeds = seeds or [session.settings.seed]
    chosen = [technique(name) for name in methods]
    for t in chosen:
        if t.per_experts:
            for k in experts:
                dataclasses.replace(expansion, experts=k)  # checked on construction
        elif options.bits is not None and t.apply is not None and not t.supports_bits:
            get_method(t.name, options.bits)  # the registry's one-line error
    session.evaluation()  # fail early on data problems, before any pruning
    rows = []
    for index, (seed, t, spec, k) in enumerate(_jobs(chosen, specs, experts, seeds)):
        if state is not None and index < len(state.rows):
            rows.append(state.rows[index])  # finished before the interruption
            continue
        session.use_seed(seed)
        config = dataclasses.replace(expansion, seed=seed)
        model, report, store = session.model, None, None
        stream = streams(session, t, k, streamed)
        with contextlib.ExitStack() as scratch:
            if t.apply is not None:
                if (state is not None and t.uses_data) or stream:  # every block saved (a resumed job continues)
                    description = {"job": index, "method": t.name, "spec": spec.label, "experts": k, "seed": seed}
                    store = (state.job_store(index, description) if state is not None
                             else scratch.enter_context(scratch_store(session, description)))
                    # streamed: a copy without block tensors, each dense block put in at its turn, freed once saved
                    model = meta_copy(session.model, session.layout) if stream else copy.deepcopy(session.model)
                    report = build_streamed(session, store, lambda m, hooks, rep: t.apply(
                        session, m, spec, options, k, config, hooks, rep),
                        t.new_report(session, spec, k, config), "dense", keep_model=not stream, model=model,
                        onload=source_onload(session) if stream else None)
                else:
                    model = copy.deepcopy(session.model)
                    report = t.apply(session, model, spec, options, k, config)
            rows.append(_row(session, t, spec, k, options, model, report, store if stream else None))
        if state is not None:
            state.add_row(index, rows[-1])
        del model
    return _seeded_rows(rows, seeds)


def _seeded_rows(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Every run, a seed-independent one (dense, magnitude) repeated at each seed with `"repeated": True`."""
    found = list(rows)
    for row in rows:
        if row["calib_tokens"] == 0 and row["seed"] == seeds[0]:
            found += [{**row, "seed": seed, "repeated": True} for seed in seeds[1:]]
    return found


def report_path(compare_settings: CompareSettings, output: OutputSettings) -> str | None:
    """The Markdown report: as given, else next to the JSON."""
    if compare_settings.report:
        return compare_settings.report
    return os.path.splitext(output.json)[0] + ".md" if output.json else None


@dataclass
class CompareResult:
    session: Session
    rows: list[dict]  # every run
    summary: dict  # summarize_rows: spread over the seeds, paired ratios to the reference
    figure: str | None = None  # the PNG next to the JSON


def run_compare(settings: RunSettings, compare_settings: CompareSettings, target: PruneSettings,
                options: PruneOptions, expansion: ExpansionConfig, output: OutputSettings,
                command_line: str = "", evaluation: EvalSettings | None = None) -> CompareResult:
    """compare as a job: check the outputs, keep a resumable state directory when there is a JSON or a `resume`,
    run every job at every seed, write the JSON, the Markdown report and the figure (rank 0), drop the state."""
    specs = ([SparsitySpec.create(nm=target.nm)] if target.nm else
             [SparsitySpec.create(sparsity=s) for s in compare_settings.sparsities])
    methods = list(compare_settings.methods)
    reference = compare_settings.reference
    if reference is not None and reference not in methods:
        raise SettingError("reference", f"{{reference}} {reference} is not among {{methods}} ({', '.join(methods)})")
    reference = reference or default_reference(methods)
    markdown = report_path(compare_settings, output)
    for path in (output.json, markdown):
        if path:
            check_output_path(path, overwrite=True)
    state = None
    if output.resume or output.json:
        fp = fingerprint(settings, compare_settings, target, options, expansion)
        state = CompareState(output.resume or default_state_dir(output.json), fp, bool(output.resume))
    seeds = SeedSettings(compare_settings.seeds).of(settings.seed)
    try:
        session = open_session(settings)
        rows = compare(session, methods, specs, options, experts=list(compare_settings.experts),
                       expansion=expansion, state=state, seeds=seeds,
                       streamed=True if evaluation is not None and evaluation.streamed else None)
    except BaseException:
        if state is not None and not state.has_progress():
            state.discard()  # nothing worth resuming
        elif state is not None:
            print(f"sparse-expansion: state kept for --resume {state.path}", file=sys.stderr)
        raise
    session.settings = settings  # the first seed's, as given
    result = CompareResult(session, rows, summarize_rows(rows, reference))
    if output.json:
        payload = {"settings": settings.describe(), "seeds": seeds, "model": session.loaded.source,
                   "environment": environment(session), "data": session.data_summary(),
                   "test_windows_sha256": windows_digest(session.evaluation()), "summary": result.summary,
                   "results": rows}
        distributed.on_main(atomic_write_text, output.json, json.dumps(payload, indent=2) + "\n")
        result.figure = os.path.splitext(output.json)[0] + ".png"
        distributed.on_main(compare_figure, result.summary, result.figure, session.loaded.source.split(" (")[0])
    if markdown:
        distributed.on_main(atomic_write_text, markdown, markdown_report(session, result.summary, rows, command_line))
    if state is not None:
        state.discard()
    return result


def _key(row: dict) -> tuple:
    return row["method"], row["sparsity"], row["nm"], row["experts"], row["bits"]


def default_reference(methods: list[str]) -> str | None:
    """SparseGPT when compared, else dense when compared, else none (no ratios)."""
    return next((m for m in ("sparsegpt", "dense") if m in methods), None)


def _reference_runs(groups: dict, reference: str, key: tuple) -> dict | None:
    """The reference's runs that `key`'s runs pair with: dense, or the reference method at the same sparsity."""
    for other, runs in groups.items():
        if other[0] == reference and (reference == "dense" or (other[1], other[2], other[4]) == (key[1], key[2],
                                                                                                    key[4])):
            return runs
    return None


def summarize_rows(rows: list[dict], reference: str | None) -> dict:
    """Per method (and sparsity, experts, bits): the perplexity's mean, std and 95% CI over the seeds, and the
    per-seed ratio to `reference` with its CI and verdict (evaluation/spread.py)."""
    groups: dict[tuple, dict[int, dict]] = {}
    for row in rows:
        groups.setdefault(_key(row), {})[row["seed"]] = row
    found = []
    for key, runs in groups.items():
        seeds = sorted(runs)
        first = runs[seeds[0]]
        entry = {"method": key[0], "sparsity": key[1], "nm": key[2], "experts": key[3], "bits": key[4],
                 "seeds": seeds, "ppl": spread.summarize([runs[s]["ppl"] for s in seeds]),
                 "ffn_flops_per_token": first["ffn_flops_per_token"],
                 "calibration_warning": first.get("calibration_warning")}
        ref = _reference_runs(groups, reference, key)
        if ref is not None and ref is not runs:
            paired = [s for s in seeds if s in ref]
            entry["vs_reference"] = {"reference": reference, "seeds": paired, **spread.paired_ratio(
                [runs[s]["ppl"] for s in paired], [ref[s]["ppl"] for s in paired])}
        found.append(entry)
    return {"reference": reference, "confidence": spread.CONFIDENCE, "groups": found}
