"""Compare techniques on the same calibration and test windows.

The techniques come from the registries: `dense`, every pruning method (pruning/methods.py) and Sparse
Expansion (whose experts are pruned by a method of the same registry). Each says whether it reads
calibration data, supports joint quantization and which linears it touches, so a new pruning method
appears here, in the CLI and in the manifest without edits to this file.
"""

from __future__ import annotations

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
from ..expansion import ExpansionConfig, ExpansionReport
from ..io import atomic_write_text, check_output_path
from ..io.block_store import BlockStore, default_state_dir
from ..io.state_dir import StateDir
from ..models import discover, ffn_costs
from ..pruning import METHODS, PruneOptions, PruneReport, SparsitySpec, get_method
from ..pruning.methods import PruneSettings
from .build import fingerprint
from .jobs import evaluate, expand_session_model, prune_session_model
from .report import markdown_report
from .session import RunSettings, Session, open_session
from .settings import CompareSettings, OutputSettings
from .streamed import build_streamed

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


def compare(session: Session, methods: list[str], specs: list[SparsitySpec], options: PruneOptions,
            experts: list[int] | None = None, expansion: ExpansionConfig | None = None,
            state: CompareState | None = None) -> list[dict]:
    """Each method at each sparsity (and each expert count) on the same calibration and test windows. With a
    `state`, every finished row and every block of the job in progress is saved, and a resumed run continues
    where the interrupted one stopped."""
    expansion = expansion or ExpansionConfig()
    experts = experts or [expansion.experts]
    chosen = [technique(name) for name in methods]
    for t in chosen:
        if t.per_experts:
            for k in experts:
                dataclasses.replace(expansion, experts=k)  # checked on construction
        elif options.bits is not None and t.apply is not None and not t.supports_bits:
            get_method(t.name, options.bits)  # the registry's one-line error
    s = session.settings
    session.evaluation()  # fail early on data problems, before any pruning
    if any(t.uses_data for t in chosen):
        session.calibration()
    calib_tokens = int(session.calib.numel()) if session.calib is not None else 0
    jobs = []
    for t in chosen:
        if t.apply is None:
            jobs.append((t, None, None))
        else:
            for spec in specs:
                for k in (experts if t.per_experts else [None]):
                    jobs.append((t, spec, k))
    rows = []
    for index, (t, spec, k) in enumerate(jobs):
        if state is not None and index < len(state.rows):
            rows.append(state.rows[index])  # finished before the interruption
            continue
        model = session.model if t.apply is None else copy.deepcopy(session.model)
        seconds, measured = 0.0, 0.0
        if t.apply is not None:
            if state is not None and t.uses_data:  # every block saved, a resumed job continues after the last
                store = state.job_store(index, {"job": index, "method": t.name, "spec": spec.label, "experts": k})
                report = build_streamed(session, store, lambda m, hooks, rep: t.apply(
                    session, m, spec, options, k, expansion, hooks, rep),
                    t.new_report(session, spec, k, expansion), "dense", keep_model=True, model=model)
            else:
                report = t.apply(session, model, spec, options, k, expansion)
            seconds, measured = report.seconds, report.overall_sparsity()
        row = {
            "method": t.name,
            "sparsity": spec.sparsity if spec else 0.0,
            "nm": f"{spec.n}:{spec.m}" if spec and spec.is_nm else None,
            "experts": k,
            "bits": options.bits if t.supports_bits else None,
            "scope": t.scope or s.scope,
            "seqlen": s.seqlen,
            "seed": s.seed,
            "calib_tokens": calib_tokens if t.uses_data else 0,
            "seconds": seconds,
            "measured_sparsity": measured,
        }
        row.update(ffn_costs(model, discover(model)))
        row.update(evaluate(session, model, desc=f"ppl {t.name}"))
        rows.append(row)
        if state is not None:
            state.add_row(index, row)
        if model is not session.model:
            del model
    return rows


def report_path(compare_settings: CompareSettings, output: OutputSettings) -> str | None:
    """The Markdown report: as given, else next to the JSON."""
    if compare_settings.report:
        return compare_settings.report
    return os.path.splitext(output.json)[0] + ".md" if output.json else None


def run_compare(settings: RunSettings, compare_settings: CompareSettings, target: PruneSettings,
                options: PruneOptions, expansion: ExpansionConfig, output: OutputSettings,
                command_line: str = "") -> tuple[Session, list[dict]]:
    """compare as a job: check the outputs, keep a resumable state directory when there is a JSON or a `resume`,
    run every job, write the JSON and the Markdown report (rank 0), and drop the state."""
    specs = ([SparsitySpec.create(nm=target.nm)] if target.nm else
             [SparsitySpec.create(sparsity=s) for s in compare_settings.sparsities])
    markdown = report_path(compare_settings, output)
    for path in (output.json, markdown):
        if path:
            check_output_path(path, overwrite=True)
    state = None
    if output.resume or output.json:
        fp = fingerprint(settings, compare_settings, target, options, expansion)
        state = CompareState(output.resume or default_state_dir(output.json), fp, bool(output.resume))
    try:
        session = open_session(settings)
        rows = compare(session, list(compare_settings.methods), specs, options, experts=list(compare_settings.experts),
                       expansion=expansion, state=state)
    except BaseException:
        if state is not None and not state.has_progress():
            state.discard()  # nothing worth resuming
        elif state is not None:
            print(f"sparse-expansion: state kept for --resume {state.path}", file=sys.stderr)
        raise
    if output.json:
        payload = {"settings": session.settings.describe(), "model": session.loaded.source,
                   "data": session.data_summary(), "results": rows}
        distributed.on_main(atomic_write_text, output.json, json.dumps(payload, indent=2) + "\n")
    if markdown:
        distributed.on_main(atomic_write_text, markdown, markdown_report(session, rows, command_line))
    if state is not None:
        state.discard()
    return session, rows
