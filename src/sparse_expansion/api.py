"""The Python API on any in-memory Hugging Face causal LM and tokenizer, as llm-compressor's `oneshot`:

    import sparse_expansion as se
    report = se.prune(model, tokenizer, method="sparsegpt", sparsity=0.5)
    report = se.expand(model, tokenizer, experts=16, sparsity=0.7)
    print(se.evaluate(model, tokenizer)["ppl"])
    se.save(model, tokenizer, "out/")            # then se.load("out/")

Models are changed in place. Calibration windows come from `data` (the embedded corpus by default, a
local text file or directory, wikitext2/c4 online), or pass `calibration=` a (windows x seqlen) tensor of
token ids of your own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .expansion import ExpansionConfig, ExpansionReport
from .io.model_dir import save_model_dir
from .models.loading import LoadedModel
from .pruning import PruneOptions, PruneReport, SparsitySpec
from .workflow import RunSettings, Session, expand_session_model, prune_session_model, session_for
from .workflow import evaluate as _evaluate


def _session(model, tokenizer, calibration, **settings) -> Session:
    session = session_for(LoadedModel(model=model, tokenizer=tokenizer, source="in-memory model", path=None),
                          RunSettings(quiet=not settings.pop("progress", True), **settings))
    if calibration is not None:
        session.calib = torch.as_tensor(calibration, dtype=torch.long)
    return session


def prune(model, tokenizer=None, method: str = "sparsegpt", sparsity: float | None = 0.5, nm: str | None = None, *,
          calibration: torch.Tensor | None = None, data: str | None = None, calib_samples: int = 128,
          seqlen: int = 2048, seed: int = 0, scope: str = "ffn", bits: int | None = None, device: str = "cpu",
          batch_size: int = 8, bos: str = "auto", progress: bool = True) -> PruneReport:
    """Prune `model` in place with a method of the registry (magnitude, wanda, sparsegpt)."""
    spec = SparsitySpec.create(sparsity=None if nm else sparsity, nm=nm)
    session = _session(model, tokenizer, calibration, data=data, calib_samples=calib_samples, seqlen=seqlen,
                       seed=seed, scope=scope, device=device, batch_size=batch_size, bos=bos, progress=progress)
    return prune_session_model(session, model, method, spec, PruneOptions(bits=bits))


def expand(model, tokenizer=None, experts: int = 16, sparsity: float | None = 0.5, nm: str | None = None, *,
           calibration: torch.Tensor | None = None, data: str | None = None, calib_samples: int = 128,
           seqlen: int = 2048, seed: int = 0, bits: int | None = None, device: str = "cpu", batch_size: int = 8,
           bos: str = "auto", progress: bool = True, **expansion) -> ExpansionReport:
    """Turn every FFN linear of `model` into `experts` sparse experts, in place. `expansion` takes the
    fields of `ExpansionConfig` (pca_reduction, kmeans_restarts, method, min_cluster_tokens, ...)."""
    spec = SparsitySpec.create(sparsity=None if nm else sparsity, nm=nm)
    session = _session(model, tokenizer, calibration, data=data, calib_samples=calib_samples, seqlen=seqlen,
                       seed=seed, device=device, batch_size=batch_size, bos=bos, progress=progress)
    config = ExpansionConfig(experts=experts, seed=seed, **expansion)
    return expand_session_model(session, model, spec, PruneOptions(bits=bits), config)


def evaluate(model, tokenizer, *, data: str | None = None, seqlen: int = 2048, eval_samples: int | None = None,
             device: str = "cpu", bos: str = "auto", progress: bool = True) -> dict:
    """Perplexity on the test split of `data` (SparseGPT/Wanda protocol), with the token counts."""
    session = _session(model, tokenizer, None, data=data, seqlen=seqlen, eval_samples=eval_samples, device=device,
                       bos=bos, progress=progress)
    return _evaluate(session, model)


def save(model, tokenizer, out: str | Path, manifest: dict | None = None, format: str = "auto",
         overwrite: bool = False) -> Path:
    """Write a model directory (io/model_dir.py) that `sparse_expansion.load` reads back."""
    return save_model_dir(model, tokenizer, out, manifest, weight_format=format, overwrite=overwrite)


def load(path=None, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> LoadedModel:
    """Load a dense, pruned or expanded model directory (the embedded default when `path` is None).

    Returns a `LoadedModel` with `.model` (eval mode, on `device`) and `.tokenizer`.
    """
    from .models.loading import load_model

    return load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=True)
