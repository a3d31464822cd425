"""The Python API on any Hugging Face causal LM and tokenizer, in memory or on disk, as llm-compressor's `oneshot`:

    import sparse_expansion as se
    report = se.prune(model, tokenizer, method="sparsegpt", sparsity=0.5)         # in place
    report = se.expand(model, tokenizer, experts=16, sparsity=0.7, out="expanded/")  # in place, and written
    report = se.expand("path/or/hub-id", experts=16, sparsity=0.7, out="expanded/", resume=True)  # streamed
    print(se.evaluate(model, tokenizer)["ppl"])
    se.save(model, tokenizer, "out/")            # then se.load("out/")

Keyword settings are the fields of the settings dataclasses, with their defaults and checks (an invalid value is a
`ValueError` naming the parameter): RunSettings (data, calib_samples, seqlen, seed, device, batch_size, ...),
PruneSettings (method, sparsity, nm), PruneOptions (bits, blocksize, percdamp), SeedSettings (seeds: with out and
evaluate=True, the build repeated over calibration draws seed, seed + 1, ..., the spread of perplexity in
out/manifest.json's `perplexity_over_seeds`) and, for expand, ExpansionConfig (experts, pca_reduction, kmeans_*,
min_cluster_tokens, method of the experts, selective, ...).
With `out`, the build takes the CLI's one path (workflow/build.py): written block by block into OUT.partial,
resumable (`resume=True`, or the state directory's path), rank 0 writing under torchrun, the same bytes as
`sparse-expansion prune/expand` with the same settings. Calibration windows come from `data` (the embedded corpus
by default), or pass `calibration=` a (windows x seqlen) tensor of token ids of your own.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .expansion import ExpansionConfig, ExpansionReport
from .io.block_store import default_state_dir
from .models.loading import LoadedModel, load_model
from .models.model_dir import save_model_dir
from .pruning import PruneOptions, PruneReport
from .pruning.methods import PruneSettings
from .settings import defaults, split
from .workflow import RunSettings, session_for
from .workflow import evaluate as _evaluate
from .workflow.build import BuildJob, run, run_over_seeds
from .workflow.settings import OutputSettings, SeedSettings


def _loaded(model, tokenizer, run_settings: dict) -> LoadedModel | None:
    """An in-memory model as the session's model; None when `model` is a path (or None: the embedded one)."""
    if model is None or isinstance(model, (str, Path)):
        run_settings["model"] = None if model is None else str(model)
        return None
    return LoadedModel(model=model, tokenizer=tokenizer, source="in-memory model", path=None)


def _build(loaded: LoadedModel | None, job: BuildJob, settings: RunSettings, out, resume, overwrite, format,
           evaluate, calibration, seeds: SeedSettings) -> PruneReport | ExpansionReport:
    if seeds.seeds > 1 and (out is None or calibration is not None):
        raise ValueError("seeds: runs over several calibration draws are built into out=DIR (with evaluate=True), "
                         "from the corpus's windows, not calibration=")
    if out is None:
        if loaded is None:
            raise ValueError("out: a model given by path is built into an output directory; pass out=DIR")
        session = session_for(loaded, settings)
        if calibration is not None:
            session.calib = torch.as_tensor(calibration, dtype=torch.long)
        return job.apply(session, loaded.model)
    if resume is True:
        resume = default_state_dir(out)
    output = OutputSettings(out=str(out), overwrite=overwrite, format=format, eval=evaluate,
                            resume=str(resume) if resume else None)
    if seeds.seeds > 1:  # the spread of perplexity: out/manifest.json["perplexity_over_seeds"]
        return run_over_seeds(settings, job, output, seeds, loaded).report
    return run(settings, job, output, loaded, calibration=calibration).report


def prune(model=None, tokenizer=None, *, out=None, resume=OutputSettings.resume, overwrite=OutputSettings.overwrite,
          format=OutputSettings.format, evaluate=OutputSettings.eval,
          calibration: torch.Tensor | None = None, **settings) -> PruneReport:
    """Prune `model` (in memory: in place; a path or None: the model there or the embedded one, into `out`)."""
    run_kw, target_kw, options_kw, seeds_kw = split(settings, RunSettings, PruneSettings, PruneOptions, SeedSettings)
    loaded = _loaded(model, tokenizer, run_kw)
    job = BuildJob(PruneSettings(**target_kw), PruneOptions(**options_kw))
    return _build(loaded, job, RunSettings(**run_kw), out, resume, overwrite, format, evaluate, calibration,
                  SeedSettings(**seeds_kw))


def expand(model=None, tokenizer=None, *, out=None, resume=OutputSettings.resume, overwrite=OutputSettings.overwrite,
           format=OutputSettings.format, evaluate=OutputSettings.eval,
           calibration: torch.Tensor | None = None, **settings) -> ExpansionReport:
    """Turn every FFN linear of `model` into `experts` sparse experts (in memory: in place; a path or None: into
    `out`). `method` names how each expert is pruned (ExpansionConfig.method)."""
    target_kw = {k: settings.pop(k) for k in ("sparsity", "nm") if k in settings}
    run_kw, options_kw, expansion_kw, seeds_kw = split(settings, RunSettings, PruneOptions, ExpansionConfig,
                                                       SeedSettings)
    loaded = _loaded(model, tokenizer, run_kw)
    run_settings = RunSettings(**run_kw)
    expansion = ExpansionConfig(**{"seed": run_settings.seed, **expansion_kw})
    job = BuildJob(PruneSettings(**target_kw), PruneOptions(**options_kw), expansion)
    return _build(loaded, job, run_settings, out, resume, overwrite, format, evaluate, calibration,
                  SeedSettings(**seeds_kw))


def evaluate(model, tokenizer, **settings) -> dict:
    """Perplexity on the test split of `data` (SparseGPT/Wanda protocol), with the token counts."""
    (run_kw,) = split(settings, RunSettings)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source="in-memory model", path=None)
    return _evaluate(session_for(loaded, RunSettings(**run_kw)), model)


def save(model, tokenizer, out: str | Path, manifest: dict | None = None, format: str = OutputSettings.format,
         overwrite: bool = OutputSettings.overwrite) -> Path:
    """Write a model directory (models/model_dir.py) that `sparse_expansion.load` reads back."""
    return save_model_dir(model, tokenizer, out, manifest, weight_format=format, overwrite=overwrite)


def load(path=None, dtype: str = RunSettings.dtype, device: str = RunSettings.device,
         trust_remote_code: bool = RunSettings.trust_remote_code) -> LoadedModel:
    """Load a dense, pruned or expanded model directory (the embedded default when `path` is None).

    Returns a `LoadedModel` with `.model` (eval mode, on `device`) and `.tokenizer`.
    """
    return load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=True)


def _signature(function, *classes) -> inspect.Signature:
    """`function`'s own parameters, then every settings field as a keyword with its default (for help())."""
    own = [p for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD]
    seen = {p.name for p in own}
    for cls in classes:
        for name, default in defaults(cls).items():
            if name not in seen:
                own.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
                seen.add(name)
    return inspect.Signature(own)


prune.__signature__ = _signature(prune, RunSettings, PruneSettings, PruneOptions, SeedSettings)
# expand: `method` is the experts' (ExpansionConfig's), `seed` the run's (it seeds the routers too)
expand.__signature__ = _signature(expand, RunSettings, ExpansionConfig, PruneSettings, PruneOptions, SeedSettings)
evaluate.__signature__ = _signature(evaluate, RunSettings)
