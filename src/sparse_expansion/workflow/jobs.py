"""The jobs a command runs on a session: prune, expand, evaluate (perplexity)."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from .. import distributed
from ..analysis.wasserstein import wasserstein_to_gaussian
from ..calibration import BlockHooks
from ..evaluation import perplexity
from ..evaluation.streamed import streamed_perplexity
from ..expansion import ExpansionConfig, ExpansionReport, RowScores, expand_model
from ..models import discover
from ..models.loading import weight_bytes_on_load
from ..pruning import PruneOptions, PruneReport, SparsitySpec, get_method, prune_model
from ..runtime import free_bytes, resolve_device
from ..settings import SettingError
from .session import Session, open_session, open_streamed_session
from .settings import WHOLE_MODEL_SHARE

SCORE_CHUNK_ELEMENTS = 1 << 24  # neuron outputs scored at a time (tokens x neurons): bounds the memory


def calibration_warning(session: Session, scope: str) -> dict | None:
    """When the calibration tokens are fewer than the inputs of the widest layer in `scope`, that layer's Hessian
    (inputs x inputs, a sum of one rank-1 term per token) is rank-deficient and only the dampening decides the
    directions no token spans: the layer, its inputs and the tokens; else None."""
    tokens = int(session.calibration().numel())
    widest = max(session.layout.select(scope), key=lambda lin: lin.in_features, default=None)
    if widest is None or tokens >= widest.in_features:
        return None
    return {"layer": f"{session.layout.blocks_path}.*.{widest.name}", "inputs": widest.in_features,
            "calib_tokens": tokens}


def warn_calibration(session: Session, scope: str) -> dict | None:
    """Print the calibration-size warning once per session and calibration draw (rank 0); returns it."""
    warning = calibration_warning(session, scope)
    key = (scope, session.settings.seed)
    if warning is not None and key not in session.warned:
        session.warned.add(key)
        if distributed.is_main():
            print(f"sparse-expansion: warning: {warning['calib_tokens']:,} calibration tokens are fewer than the "
                  f"{warning['inputs']:,} inputs of {warning['layer']}: its Hessian is rank-deficient and the "
                  "dampening alone fills the rest (more calibration windows or longer ones fix it)", file=sys.stderr)
    return warning


def prune_session_model(session: Session, model, method_name: str, spec: SparsitySpec,
                        options: PruneOptions, hooks: BlockHooks | None = None,
                        report: PruneReport | None = None) -> PruneReport:
    method = get_method(method_name, options.bits)
    s = session.settings
    windows = session.calibration() if method.statistic is not None else None
    if windows is not None:
        warn_calibration(session, s.scope)
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
    warn_calibration(session, "ffn")
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


def choose_streamed(model: str | None, device: str, forced: bool) -> bool:
    """Streamed evaluation when asked for, or when the directory's weights (the manifest's dense bytes, else its
    safetensors files) exceed WHOLE_MODEL_SHARE of the free memory of `device` (psutil's available host memory,
    or torch.cuda.mem_get_info)."""
    if forced:
        return True
    needed = weight_bytes_on_load(model)
    return needed is not None and too_big_to_hold(needed, device)


def open_session_for(settings, streamed: bool, compact: bool = False) -> Session:
    """A command's session: with the model's blocks left on disk, read at their turn, when `choose_streamed` says
    so (asked for, or the weights would not fit), else the model loaded whole (`compact`: see open_session)."""
    if choose_streamed(settings.model, settings.device, streamed):
        return open_streamed_session(settings)
    return open_session(settings, compact=compact)


def check_plain_blocks(session: Session, what: str) -> None:
    """A study that hooks the model's modules streams only blocks made of the model's own layers: an expanded or
    thresholded directory rebuilds its layers at each block's turn, which would drop the hooks."""
    streamed = session.loaded.streamed
    if streamed is not None and streamed.custom_blocks:
        raise SettingError("streamed", f"{what} block by block reads dense or pruned checkpoints; "
                                       f"{session.loaded.source} holds expanded or thresholded layers: load it "
                                       "whole (without {streamed})")


def too_big_to_hold(needed: int, device: str) -> bool:
    """The rule for evaluating block by block: a whole model of `needed` bytes would take more than
    WHOLE_MODEL_SHARE of the free memory of `device`."""
    return needed > WHOLE_MODEL_SHARE * free_bytes(resolve_device(device))


def evaluate_streamed(session: Session, desc: str = "perplexity (streamed)", model=None, onload=None,
                      offload=None) -> dict:
    """`evaluate` with one block in memory (evaluation/streamed.py): the session's model has its blocks on disk
    (`open_model_streamed`), or `model`'s blocks are put in place by `onload` and freed by `offload` (a model built
    into a block store: workflow/streamed.py); the test activations go to `offload_dir` files when it is set."""
    s = session.settings
    if model is None:
        model, onload, offload = session.model, session.loaded.streamed.onload, session.loaded.streamed.offload
    start = time.perf_counter()
    if torch.device(s.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    result = streamed_perplexity(model, discover(model), session.evaluation(), onload, offload, device=s.device,
                                 progress=not s.quiet, desc=desc, bos=session.bos_token_id,
                                 offload_dir=s.offload_dir)
    return {**_result(result, session), "eval_seconds": time.perf_counter() - start, "streamed": True,
            **_peak_gpu(s.device)}


def _peak_gpu(device: str) -> dict:
    """The evaluation's peak GPU memory (torch's allocator), on a CUDA device."""
    if torch.device(device).type != "cuda":
        return {}
    return {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device))}


def _result(result, session: Session) -> dict:
    return {"ppl": result.ppl, "mean_nll": result.mean_nll, "eval_windows": result.windows,
            "eval_tokens": result.eval_tokens, "text_tokens": result.text_tokens,
            "predicted_tokens": result.predicted_tokens, "bos": session.settings.bos,
            "bos_token_id": session.bos_token_id}


def evaluate(session: Session, model, desc: str = "perplexity") -> dict:
    """Perplexity on the session's test windows; the result says how many tokens were scored. The session's own
    model, when its blocks wait on disk (a streamed session), is evaluated block by block (`evaluate_streamed`),
    with whatever hooks the caller put on its modules."""
    if model is session.model and session.loaded.streamed is not None:
        return evaluate_streamed(session, f"{desc} (streamed)")
    s = session.settings
    windows = session.evaluation()
    device = torch.device(s.device)
    model.to(device)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = perplexity(model, windows, device=device, progress=not s.quiet, desc=desc, bos=session.bos_token_id)
    model.to("cpu")
    return {**_result(result, session), "eval_seconds": time.perf_counter() - start, **_peak_gpu(s.device)}
