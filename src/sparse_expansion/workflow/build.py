"""The one build path of prune and expand, for the CLI and the Python API alike: validate, open (or resume) the
run's state directory, build block by block into it (streamed.py), write the output directory and its manifest
(rank 0 under torch.distributed), and optionally evaluate what was written.

    result = run(RunSettings(...), BuildJob(PruneSettings(sparsity=0.5), PruneOptions()), OutputSettings(out="o"))

A data-free method (magnitude) takes seconds and is written whole; `format="dense"` keeps the model whole to
write a plain Hugging Face checkpoint at the end. Every other build streams: each block is saved and freed
after its turn (unless the caller's own in-memory model is being changed, `loaded=`: then the blocks stay).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..errors import UsageError
from ..evaluation import spread
from ..expansion import ExpansionConfig, ExpansionReport
from ..io import check_output_path
from ..io.block_store import BlockStore, default_state_dir
from ..io.model_dir import update_manifest
from ..models import load_model
from ..models.loading import LoadedModel
from ..models.model_dir import save_model_dir
from ..pruning import PruneOptions, PruneReport, get_method
from ..pruning.methods import PruneSettings
from ..settings import SettingError
from . import streamed
from .jobs import evaluate, expand_session_model, prune_session_model
from .report import manifest, windows_digest
from .session import RunSettings, Session, open_session, session_for
from .settings import OutputSettings, SeedSettings

# Settings that say where and how a run reports, not what it computes: a resumed run may change them.
VOLATILE = frozenset({"out", "resume", "overwrite", "quiet", "eval", "json", "report", "offload_dir"})


def fingerprint(*settings) -> dict:
    """What a resumed run must share with the interrupted one: every field of these settings objects but the
    VOLATILE ones, as JSON values, by settings class."""
    found = {}
    for obj in settings:
        fields = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if field.name not in VOLATILE and field.init:
                fields[field.name] = list(value) if isinstance(value, tuple) else value
        found[type(obj).__name__] = fields
    return found


@dataclass(frozen=True)
class BuildJob:
    """What to build: `target.method` at `target`'s sparsity, or Sparse Expansion with `expansion`."""

    target: PruneSettings
    options: PruneOptions = dataclasses.field(default_factory=PruneOptions)
    expansion: ExpansionConfig | None = None

    def __post_init__(self):
        if self.expansion is not None:
            self.expansion.check_bits(self.options.bits)
        else:
            get_method(self.target.method, self.options.bits)

    @property
    def command(self) -> str:
        return "prune" if self.expansion is None else "expand"

    @property
    def uses_data(self) -> bool:
        return self.expansion is not None or get_method(self.target.method).statistic is not None

    def new_report(self, scope: str):
        if self.expansion is None:
            return PruneReport(method=self.target.method, spec=self.target.spec(), scope=scope)
        return ExpansionReport(spec=self.target.spec(), config=self.expansion)

    def apply(self, session: Session, model, hooks=None, report=None):
        if self.expansion is None:
            return prune_session_model(session, model, self.target.method, self.target.spec(), self.options, hooks,
                                       report)
        return expand_session_model(session, model, self.target.spec(), self.options, self.expansion, hooks,
                                    report=report)


@dataclass
class BuildResult:
    session: Session
    report: PruneReport | ExpansionReport
    manifest: dict


def _announce(text: str, quiet: bool) -> None:
    if not quiet and distributed.is_main():
        print(text, file=sys.stderr)


def _whole(session: Session, job: BuildJob, output: OutputSettings) -> tuple[object, dict]:
    """Build in memory, then write the output directory (data-free methods; a dense checkpoint)."""
    report = job.apply(session, session.model)
    data = manifest(session, job.command, report, job.options)
    distributed.on_main(save_model_dir, session.model, session.tokenizer, output.out, data,
                        weight_format=output.format, overwrite=output.overwrite)
    return report, data


def _streamed(session: Session, job: BuildJob, output: OutputSettings, store: BlockStore,
              keep_model: bool) -> tuple[object, dict]:
    """Build block by block into `store`, then make it the output directory."""
    report = streamed.build_streamed(session, store, lambda model, hooks, rep: job.apply(session, model, hooks, rep),
                                     job.new_report(session.settings.scope), output.format, keep_model=keep_model)
    extra = {"costs": streamed.streamed_costs(session, store)} if job.expansion is not None else {}
    data = manifest(session, job.command, report, job.options, extra)
    if output.format == "dense":
        distributed.on_main(save_model_dir, session.model, session.tokenizer, output.out, data,
                            weight_format=output.format, overwrite=output.overwrite)
        distributed.on_main(store.discard)
    else:
        streamed.finish_streamed(session, store, output.out, data)
    return report, data


def _open(settings: RunSettings, loaded: LoadedModel | None, stream: bool, calibration) -> Session:
    session = open_session(settings, stream=stream) if loaded is None else session_for(loaded, settings)
    if calibration is not None:
        session.calib = torch.as_tensor(calibration, dtype=torch.long)
    return session


def run(settings: RunSettings, job: BuildJob, output: OutputSettings, loaded: LoadedModel | None = None,
        calibration: torch.Tensor | None = None) -> BuildResult:
    """Build `job` into `output.out` (resumable from `output.resume`; with `output.eval`, measure the written
    model's perplexity into its manifest). `loaded`: a model already in memory (changed in place) instead of
    loading `settings.model`; `calibration`: windows of token ids of one's own instead of the corpus's."""
    if output.out is None:
        raise UsageError("a build needs an output directory (out)")
    check_output_path(output.out, output.overwrite)
    if not job.uses_data:  # data-free (magnitude): seconds for any model, nothing to stream or resume
        if output.resume:
            raise UsageError(f"{job.target.method} uses no calibration data and is not resumable; run it again")
        session = _open(settings, loaded, False, calibration)
        report, data = _whole(session, job, output)
    else:
        dense = job.expansion is None and output.format == "dense"  # a plain HF checkpoint, written whole
        state = output.resume or default_state_dir(output.out)
        parts = [settings, job.target, job.options, output] + ([job.expansion] if job.expansion else [])
        store = BlockStore(state, fingerprint(*parts), bool(output.resume))
        try:
            session = _open(settings, loaded, not dense, calibration)
            if store.done:
                _announce(f"resuming after block {store.done - 1} of {store.path}", settings.quiet)
            report, data = _streamed(session, job, output, store, keep_model=dense or loaded is not None)
        except BaseException:
            if distributed.is_main() and store.path.exists():
                if store.done == 0:
                    store.discard()  # nothing worth resuming
                else:
                    print(f"sparse-expansion: state kept for --resume {store.path}", file=sys.stderr)
            raise
    if output.eval:
        built = load_model(output.out, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code,
                           quiet=True, compact=settings.device == "cpu").model
        data["perplexity"] = evaluate(session, built)
        distributed.on_main(update_manifest, output.out, {"perplexity": data["perplexity"]})
    return BuildResult(session, report, data)


def run_over_seeds(settings: RunSettings, job: BuildJob, output: OutputSettings, seeds: SeedSettings,
                   loaded: LoadedModel | None = None) -> BuildResult:
    """`run` at `settings.seed` into `output.out`, then the same build at each further seed (seed + 1, ...: other
    calibration draws, the routers' k-means seeded alike) into a temporary directory beside it, evaluated on the
    same test windows and deleted. The written model's manifest gets `perplexity_over_seeds`: every run's
    perplexity and the digests of its windows, their mean, std and 95% interval (evaluation/spread.py)."""
    if seeds.seeds == 1:
        return run(settings, job, output, loaded)
    if not output.eval:
        raise SettingError("seeds", "{seeds} above 1 measures how far perplexity moves between calibration draws: "
                                    "it needs {eval}")
    if not job.uses_data:
        raise SettingError("seeds", f"{job.target.method} reads no calibration data, so every seed gives the same "
                                    "model: drop {seeds}")
    pristine = None if loaded is None else dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    first = run(settings, job, output, loaded)
    runs = [_seed_run(first, settings.seed)]
    target = Path(output.out)
    for seed in seeds.of(settings.seed)[1:]:
        scratch = target.parent / f".{target.name}.seed-{seed}"
        other = dataclasses.replace(job, expansion=None if job.expansion is None else
                                    dataclasses.replace(job.expansion, seed=seed))
        fresh = None if pristine is None else dataclasses.replace(pristine, model=copy.deepcopy(pristine.model))
        try:
            result = run(dataclasses.replace(settings, seed=seed), other,
                         OutputSettings(out=str(scratch), overwrite=True, format=output.format, eval=True), fresh)
        finally:
            distributed.on_main(shutil.rmtree, scratch, ignore_errors=True)
        runs.append(_seed_run(result, seed))
    ppl = [r["ppl"] for r in runs]
    first.manifest["perplexity_over_seeds"] = {"seeds": [r["seed"] for r in runs], "runs": runs,
                                               "ppl": spread.summarize(ppl), "confidence": spread.CONFIDENCE}
    distributed.on_main(update_manifest, output.out, {"perplexity_over_seeds":
                                                      first.manifest["perplexity_over_seeds"]})
    return first


def _seed_run(result: BuildResult, seed: int) -> dict:
    session = result.session
    return {"seed": seed, "ppl": result.manifest["perplexity"]["ppl"],
            "calib_windows_sha256": windows_digest(session.calibration()),
            "test_windows_sha256": windows_digest(session.evaluation())}
