"""The jobs behind the CLI, usable from Python: prepare data, prune, evaluate, compare, save."""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .data import Corpus, calibration_windows, evaluation_windows, load_corpus
from .errors import UsageError
from .evaluation import perplexity
from .expansion import ExpansionConfig, ExpansionReport, expand_model, ffn_costs
from .io import atomic_output_dir, save_compressed
from .io.compressed import COMPRESSED_WEIGHTS_FILE, resolve_weight_format
from .models import ModelLayout, discover, load_model
from .models.loading import LoadedModel, context_length, resolve_device, save_config_files
from .pruning import PruneOptions, PruneReport, SparsitySpec, get_method, prune_model


@dataclass
class RunSettings:
    """Options shared by every command that reads data."""

    model: str | None = None
    data: str | None = None
    calib_samples: int = 128
    seqlen: int = 2048
    eval_samples: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    scope: str = "ffn"
    batch_size: int = 8
    quiet: bool = False
    trust_remote_code: bool = False

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("model", "data", "calib_samples", "seqlen", "eval_samples", "seed",
                                              "device", "dtype", "scope")}


@dataclass
class Session:
    """A loaded model with its layout and the data windows, shared by the steps of one command."""

    settings: RunSettings
    loaded: LoadedModel
    layout: ModelLayout
    corpus: Corpus | None = None
    _calib: torch.Tensor | None = field(default=None, repr=False)
    _eval: torch.Tensor | None = field(default=None, repr=False)

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def _corpus(self) -> Corpus:
        if self.corpus is None:
            self.corpus = load_corpus(self.settings.data)
        return self.corpus

    def calibration(self) -> torch.Tensor:
        if self._calib is None:
            s = self.settings
            self._calib = calibration_windows(self._corpus(), self.tokenizer, s.calib_samples, s.seqlen, s.seed)
        return self._calib

    def evaluation(self) -> torch.Tensor:
        if self._eval is None:
            s = self.settings
            self._eval = evaluation_windows(self._corpus(), self.tokenizer, s.seqlen, s.eval_samples)
        return self._eval


def open_session(settings: RunSettings) -> Session:
    """Validate cheap options, load the model (on the CPU; blocks visit the device one at a time)."""
    if settings.seqlen < 2:
        raise UsageError("--seqlen must be at least 2")
    if settings.calib_samples < 1:
        raise UsageError("--calib-samples must be at least 1")
    if settings.eval_samples is not None and settings.eval_samples < 1:
        raise UsageError("--eval-samples must be at least 1")
    resolve_device(settings.device)
    loaded = load_model(settings.model, dtype=settings.dtype, device="cpu",
                        trust_remote_code=settings.trust_remote_code, quiet=settings.quiet)
    limit = context_length(loaded.model)
    if limit is not None and settings.seqlen > limit:
        raise UsageError(f"--seqlen {settings.seqlen} is longer than the model's context of {limit} tokens")
    layout = discover(loaded.model)
    return Session(settings=settings, loaded=loaded, layout=layout)


def prune_session_model(session: Session, model, method_name: str, spec: SparsitySpec,
                        options: PruneOptions) -> PruneReport:
    method = get_method(method_name, options.bits)
    s = session.settings
    windows = session.calibration() if method.statistic is not None else None
    return prune_model(model, discover(model), windows, method, spec, scope=s.scope, options=options,
                       device=s.device, batch_size=s.batch_size, progress=not s.quiet)


def expand_session_model(session: Session, model, spec: SparsitySpec, options: PruneOptions,
                         config: ExpansionConfig) -> ExpansionReport:
    s = session.settings
    config.validate()
    return expand_model(model, discover(model), session.calibration(), spec, config, options=options,
                        device=s.device, batch_size=s.batch_size, progress=not s.quiet)


def evaluate(session: Session, model, desc: str = "perplexity") -> dict:
    s = session.settings
    windows = session.evaluation()
    device = torch.device(s.device)
    model.to(device)
    start = time.perf_counter()
    result = perplexity(model, windows, device=device, progress=not s.quiet, desc=desc)
    model.to("cpu")
    return {"ppl": result.ppl, "mean_nll": result.mean_nll, "eval_windows": result.windows,
            "eval_tokens": result.eval_tokens, "predicted_tokens": result.predicted_tokens,
            "eval_seconds": time.perf_counter() - start}


def manifest(session: Session, command: str, report: PruneReport | ExpansionReport | None,
             options: PruneOptions | None, extra: dict | None = None) -> dict:
    s = session.settings
    data = {
        "tool": "sparse-expansion",
        "version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_source": session.loaded.source,
        "architecture": type(session.model).__name__,
        "blocks_path": session.layout.blocks_path,
        "settings": s.describe(),
        "data": session.corpus.summary() if session.corpus else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if report is not None:
        expansion = isinstance(report, ExpansionReport)
        calib = session._calib
        data.update({
            "method": "sparse-expansion" if expansion else report.method,
            "sparsity": report.spec.sparsity,
            "nm": f"{report.spec.n}:{report.spec.m}" if report.spec.is_nm else None,
            "bits": options.bits if options else None,
            "blocksize": options.blocksize if options else None,
            "percdamp": options.percdamp if options else None,
            "calib_tokens": int(calib.numel()) if calib is not None else 0,
            "seconds": report.seconds,
            "overall_sparsity": report.overall_sparsity(),
        })
        if expansion:
            config = report.config
            data.update({
                "experts": config.experts,
                "pca_reduction": config.pca_reduction,
                "kmeans_restarts": config.kmeans_restarts,
                "router_backend": config.backend,
                "min_cluster_tokens": config.min_cluster_tokens,
                "router_seconds": report.router_seconds,
                "fallback_experts": report.fallbacks(),
                "routers": report.routers,
            })
        data["layers"] = report.layers
    if extra:
        data.update(extra)
    return data


def save_model_dir(session: Session, model, out: str | Path, manifest_data: dict, overwrite: bool = False,
                   weight_format: str = "auto") -> Path:
    """Write a model directory atomically: config, tokenizer, weights, manifest.json.

    Weights: `dense` is a plain Hugging Face checkpoint (`model.safetensors`, readable by any tool);
    `compressed` stores sparse tensors as bitmask or CSR (`model.compressed.safetensors`, see
    docs/FORMATS.md); `auto` compresses whenever that is smaller.
    """
    state = model.state_dict()
    weight_format = resolve_weight_format(state, weight_format)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if weight_format == "dense":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_config_files(model, tmp)
            index = save_compressed(state, tmp / COMPRESSED_WEIGHTS_FILE)
            manifest_data = dict(manifest_data, weights={
                "format": "compressed", "bytes": sum(e.get("bytes", 0) for e in index.values()),
                "dense_bytes": sum(e.get("dense_bytes", 0) for e in index.values())})
        session.tokenizer.save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest_data, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def compare(session: Session, methods: list[str], specs: list[SparsitySpec], options: PruneOptions,
            experts: list[int] | None = None, expansion: ExpansionConfig | None = None) -> list[dict]:
    """Each method at each sparsity (and each expert count) on the same calibration and test windows."""
    expansion = expansion or ExpansionConfig()
    experts = experts or [expansion.experts]
    for name in methods:
        if name == "sparse-expansion":
            for k in experts:
                dataclasses.replace(expansion, experts=k).validate()
        elif name != "dense":
            get_method(name, options.bits)
    s = session.settings
    session.evaluation()  # fail early on data problems, before any pruning
    if any(m not in ("dense", "magnitude") for m in methods):
        session.calibration()
    calib_tokens = int(session._calib.numel()) if session._calib is not None else 0
    jobs = []
    for name in methods:
        if name == "dense":
            jobs.append((name, None, None))
        else:
            for spec in specs:
                for k in (experts if name == "sparse-expansion" else [None]):
                    jobs.append((name, spec, k))
    rows = []
    for name, spec, k in jobs:
        model = session.model if name == "dense" else copy.deepcopy(session.model)
        seconds, measured = 0.0, 0.0
        if name == "sparse-expansion":
            report = expand_session_model(session, model, spec, options, dataclasses.replace(expansion, experts=k))
            seconds, measured = report.seconds, report.overall_sparsity()
        elif spec is not None:
            report = prune_session_model(session, model, name, spec, options)
            seconds, measured = report.seconds, report.overall_sparsity()
        row = {
            "method": name,
            "sparsity": spec.sparsity if spec else 0.0,
            "nm": f"{spec.n}:{spec.m}" if spec and spec.is_nm else None,
            "experts": k,
            "bits": options.bits if name in ("sparsegpt", "sparse-expansion") else None,
            "scope": "ffn" if name == "sparse-expansion" else s.scope,
            "seqlen": s.seqlen,
            "seed": s.seed,
            "calib_tokens": calib_tokens if name not in ("dense", "magnitude") else 0,
            "seconds": seconds,
            "measured_sparsity": measured,
        }
        row.update(ffn_costs(model, discover(model)))
        row.update(evaluate(session, model, desc=f"ppl {name}"))
        rows.append(row)
        if model is not session.model:
            del model
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["method", "sparsity", "experts", "ppl", "FFN MFLOP/token", "eval_tokens", "calib_tokens", "build s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        sparsity = r["nm"] or f"{r['sparsity']:.2f}"
        if r.get("bits"):
            sparsity += f" + {r['bits']}-bit"
        lines.append(f"| {r['method']} | {sparsity} | {r.get('experts') or '-'} | {r['ppl']:.3f} | "
                     f"{r['ffn_flops_per_token'] / 1e6:.1f} | {r['eval_tokens']} | {r['calib_tokens']} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def markdown_report(session: Session, rows: list[dict], command_line: str) -> str:
    s = session.settings
    corpus = session.corpus.summary() if session.corpus else {}
    return "\n".join([
        "# sparse-expansion compare",
        "",
        f"- command: `{command_line}`",
        f"- model: {session.loaded.source} ({type(session.model).__name__})",
        f"- data: {corpus.get('description', '')}",
        f"- scope: {s.scope}; seqlen {s.seqlen}; calibration windows {s.calib_samples}; seed {s.seed}; "
        f"device {s.device}; dtype {s.dtype}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}",
        "",
        format_table(rows),
        "",
    ])
