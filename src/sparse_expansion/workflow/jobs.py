"""The jobs a command runs on a session: prune, expand, evaluate (perplexity)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..analysis.wasserstein import wasserstein_to_gaussian
from ..calibration import BlockHooks
from ..evaluation import perplexity
from ..expansion import ExpansionConfig, ExpansionReport, RowScores, expand_model
from ..models import discover
from ..pruning import PruneOptions, PruneReport, SparsitySpec, get_method, prune_model
from .session import Session

SCORE_CHUNK_ELEMENTS = 1 << 24  # neuron outputs scored at a time (tokens x neurons): bounds the memory


def prune_session_model(session: Session, model, method_name: str, spec: SparsitySpec,
                        options: PruneOptions, hooks: BlockHooks | None = None,
                        report: PruneReport | None = None) -> PruneReport:
    method = get_method(method_name, options.bits)
    s = session.settings
    windows = session.calibration() if method.statistic is not None else None
    return prune_model(model, discover(model), windows, method, spec, scope=s.scope, options=options,
                       device=s.device, batch_size=s.batch_size, progress=not s.quiet,
                       hooks=hooks, offload_dir=s.offload_dir, report=report)


def expand_session_model(session: Session, model, spec: SparsitySpec, options: PruneOptions,
                         config: ExpansionConfig, hooks: BlockHooks | None = None,
                         row_scores: RowScores | None = None, report: ExpansionReport | None = None
                         ) -> ExpansionReport:
    """Expand the model on the session's calibration data. A selective expansion ranks rows by `row_scores`,
    by default the Wasserstein distance of each neuron's calibration outputs to a Gaussian."""
    s = session.settings
    if config.selective is not None and row_scores is None:
        row_scores = wasserstein_row_scores
    return expand_model(model, discover(model), session.calibration(), spec, config, options=options,
                        device=s.device, batch_size=s.batch_size, progress=not s.quiet,
                        hooks=hooks, offload_dir=s.offload_dir, row_scores=row_scores, report=report)


def wasserstein_row_scores(path: str, weight: torch.Tensor, inputs: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """Each output neuron's Wasserstein distance to a Gaussian over its calibration outputs y = W x + b
    (a constant neuron, NaN there, scores -inf), a chunk of neurons at a time (each is scored on its own)."""
    x = inputs.float()
    step = max(1, SCORE_CHUNK_ELEMENTS // x.shape[0])
    scores = []
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        outputs = F.linear(x, weight[rows].float(), None if bias is None else bias[rows].float())
        scores.append(wasserstein_to_gaussian(outputs))
    scores = torch.cat(scores)
    return torch.where(torch.isnan(scores), float("-inf"), scores)


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
