"""The jobs a command runs on a session: prune, expand, evaluate (perplexity)."""

from __future__ import annotations

import time

import torch

from ..evaluation import perplexity
from ..expansion import ExpansionConfig, ExpansionReport, expand_model
from ..models import discover
from ..pruning import PruneOptions, PruneReport, SparsitySpec, get_method, prune_model
from .session import Session


def prune_session_model(session: Session, model, method_name: str, spec: SparsitySpec,
                        options: PruneOptions, engine_options: dict | None = None) -> PruneReport:
    method = get_method(method_name, options.bits)
    s = session.settings
    windows = session.calibration() if method.statistic is not None else None
    return prune_model(model, discover(model), windows, method, spec, scope=s.scope, options=options,
                       device=s.device, batch_size=s.batch_size, progress=not s.quiet, engine_options=engine_options)


def expand_session_model(session: Session, model, spec: SparsitySpec, options: PruneOptions,
                         config: ExpansionConfig, engine_options: dict | None = None) -> ExpansionReport:
    s = session.settings
    config.validate()
    return expand_model(model, discover(model), session.calibration(), spec, config, options=options,
                        device=s.device, batch_size=s.batch_size, progress=not s.quiet, engine_options=engine_options)


def evaluate(session: Session, model, desc: str = "perplexity") -> dict:
    """Perplexity on the session's test windows; the result says how many tokens were scored."""
    s = session.settings
    windows = session.evaluation()
    device = torch.device(s.device)
    model.to(device)
    start = time.perf_counter()
    result = perplexity(model, windows, device=device, progress=not s.quiet, desc=desc, bos=session.bos_token_id)
    model.to("cpu")
    return {"ppl": result.ppl, "mean_nll": result.mean_nll, "eval_windows": result.windows,
            "eval_tokens": result.eval_tokens, "text_tokens": result.text_tokens,
            "predicted_tokens": result.predicted_tokens, "bos": s.bos, "bos_token_id": session.bos_token_id,
            "eval_seconds": time.perf_counter() - start}
