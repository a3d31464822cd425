"""The `activations` job: PPL-p% activation sparsity of a model (dense, pruned or expanded) by CETT."""

from __future__ import annotations

import torch

from ..activation.thresholds import (
    collect_intermediate,
    global_threshold_rule,
    install_thresholds,
    layer_thresholds,
    masked,
    neuron_thresholds,
    nonzero_rule,
    search_cett,
    thresholded,
    top_k_rule,
)
from ..evaluation import spread
from ..settings import SettingError
from .jobs import check_plain_blocks, evaluate
from .session import Session

CETT_SWEEP = (0.05, 0.1, 0.2, 0.3, 0.5)
RATIO_SWEEP = (0.7, 0.5, 0.3, 0.2, 0.1)  # top-k (k = ratio x d_f per layer) and FAT-epsilon (global quantiles)


def run_activations(session: Session, increase: float = 0.01, max_tokens: int = 4096,
                    iterations: int = 14, install: bool = False, baselines: bool = False) -> dict:
    """Thresholds from the calibration windows' intermediate activations; the CETT searched so that perplexity on
    the test windows rises by `increase`; the result measured with those thresholds applied. With `install`, the
    model's down projections become `ThresholdedLinear` layers with the chosen thresholds (for saving).
    `increase` and `max_tokens` come checked from ActivationSettings (workflow/settings.py)."""
    s = session.settings
    check_plain_blocks(session, "activations")
    _check_install(session, install)
    activations = collect_intermediate(session.model, session.layout, session.calibration(), max_tokens, s.seed,
                                       s.device, s.batch_size, progress=not s.quiet, streamed=session.loaded.streamed)
    dense = evaluate(session, session.model, desc="dense")
    cache: dict[float, tuple[dict, dict, float]] = {}

    def measure(cett: float) -> tuple[float, float]:
        thresholds = layer_thresholds(activations, cett)
        with thresholded(session.model, neuron_thresholds(activations, thresholds)) as counter:
            result = evaluate(session, session.model, desc=f"CETT {cett:.4f}")
        cache[cett] = (thresholds, counter.ratios(), result["ppl"])
        return result["ppl"], counter.ratio()

    best, steps = search_cett(measure, dense["ppl"], increase, iterations)
    thresholds, ratios, ppl = cache[best.cett]
    sample = _magnitude_sample(activations) if baselines else None  # FAT-epsilon's quantiles, drawn once
    curves = sweep_baselines(session, activations, sample) if baselines else None
    at_cett = at_ratio(session, activations, best.activation_ratio, sample) if baselines else None
    if install:
        install_thresholds(session.model, neuron_thresholds(activations, thresholds), ratios)
    return {"curves": curves, "at_cett_ratio": at_cett, "model": session.loaded.source,
            "settings": session.settings.describe(), "data": session.data_summary(),
            "streamed": session.loaded.streamed is not None, "ppl_increase": increase, "dense_ppl": dense["ppl"],
            "sparse_ppl": ppl, "ppl_ratio": ppl / dense["ppl"],
            "activation_ratio": best.activation_ratio, "sparsity": 1 - best.activation_ratio, "cett": best.cett,
            "eval_tokens": dense["eval_tokens"], "threshold_tokens_per_layer": max_tokens,
            "layers": [{"layer": path, "threshold": thresholds[path], "activation_ratio": ratios.get(path)}
                       for path in thresholds],
            "search": [vars(step) for step in steps]}


def _check_install(session: Session, install: bool) -> None:
    if install and session.loaded.streamed is not None:
        raise SettingError("out", "a model with thresholds is saved from a model held whole: write {out} without "
                                  "streaming (block by block, the study's figures go to {json})")


def at_ratio(session: Session, activations, ratio: float, sample: torch.Tensor) -> dict[str, dict]:
    """Top-k per layer (k = ratio x d_f) and one global threshold (FAT-epsilon, the quantile of the calibration |x|
    `sample` that keeps `ratio`) at the activation ratio CETT chose: their perplexity on the same test windows, for a
    comparison at equal activation ratio (the ratios they reach on the test windows are recorded beside it)."""
    paths = list(activations.inputs)
    width = activations.inputs[paths[0]].shape[1]
    epsilon = float(torch.quantile(sample, 1 - ratio))
    found = {}
    for name, rule, extra in (("top-k", top_k_rule(max(1, round(ratio * width))), {"k_ratio": ratio}),
                              ("FAT-epsilon", global_threshold_rule(epsilon), {"epsilon": epsilon})):
        with masked(session.model, {p: rule for p in paths}) as counter:
            result = evaluate(session, session.model, desc=name)
        found[name] = {"ppl": result["ppl"], "activation_ratio": counter.ratio(), **extra}
    return found


def _magnitude_sample(activations, limit: int = 1 << 22) -> torch.Tensor:
    """|x| of every layer's calibration activations, a fixed random sample of at most `limit` of them."""
    magnitudes = torch.cat([x.abs().flatten() for x in activations.inputs.values()])
    return magnitudes[torch.randperm(magnitudes.numel(), generator=torch.Generator().manual_seed(0))[:limit]]


def sweep_baselines(session: Session, activations, sample: torch.Tensor) -> dict[str, list[dict]]:
    """Perplexity against activation ratio on the same test windows for CETT (several targets), a constant
    top-k per layer, one global threshold (FAT-epsilon, at quantiles of all layers' |x|) and exact zeros."""
    model = session.model

    def point(rules: dict, **extra) -> dict:
        with masked(model, rules) as counter:
            result = evaluate(session, model, desc="baseline")
        return {"ppl": result["ppl"], "activation_ratio": counter.ratio(), **extra}

    paths = list(activations.inputs)
    curves = {"CETT": [], "top-k": [], "FAT-epsilon": []}
    for target in CETT_SWEEP:
        per_neuron = neuron_thresholds(activations, layer_thresholds(activations, target))
        with thresholded(model, per_neuron) as counter:
            result = evaluate(session, model, desc=f"CETT {target}")
        curves["CETT"].append({"ppl": result["ppl"], "activation_ratio": counter.ratio(), "cett": target})
    for ratio in RATIO_SWEEP:
        width = activations.inputs[paths[0]].shape[1]
        curves["top-k"].append(point({p: top_k_rule(max(1, round(ratio * width))) for p in paths}, k_ratio=ratio))
        epsilon = float(torch.quantile(sample, 1 - ratio))
        curves["FAT-epsilon"].append(point({p: global_threshold_rule(epsilon) for p in paths}, epsilon=epsilon))
    curves["exact zeros"] = [point({p: nonzero_rule for p in paths})]
    return curves


def run_activations_over_seeds(session: Session, seeds: list[int], increase: float = 0.01, max_tokens: int = 4096,
                               install: bool = False, baselines: bool = False) -> dict:
    """`run_activations` once per calibration seed (the thresholds and the CETT searched anew on each draw; the test
    windows the same). The result is the first seed's (its thresholds are the ones installed) with `over_seeds`:
    the spread of activation ratio, perplexity ratio and CETT, and with `baselines` top-k's and FAT-epsilon's
    perplexity at CETT's activation ratio paired by seed against CETT's (ratio < 1: the baseline is better)."""
    _check_install(session, install)  # before the other seeds' runs (the first seed's, which installs, runs last)
    runs = {}
    for seed in seeds[1:] + seeds[:1]:  # the first seed last: installing its thresholds changes the model
        session.use_seed(seed)
        runs[seed] = run_activations(session, increase, max_tokens, install=install and seed == seeds[0],
                                     baselines=baselines)
    session.use_seed(seeds[0])
    result = runs[seeds[0]]
    if len(seeds) == 1:
        return result
    ordered = [runs[s] for s in seeds]
    over = {"seeds": seeds, "confidence": spread.CONFIDENCE,
            **{key: spread.summarize([r[key] for r in ordered])
               for key in ("activation_ratio", "sparsity", "sparse_ppl", "ppl_ratio", "cett")},
            "runs": [{"seed": s, **{k: runs[s][k] for k in ("activation_ratio", "sparse_ppl", "ppl_ratio", "cett",
                                                            "at_cett_ratio")}} for s in seeds]}
    if baselines:
        cett = [r["sparse_ppl"] for r in ordered]
        over["at_cett_ratio"] = {
            name: {"ppl": spread.summarize([r["at_cett_ratio"][name]["ppl"] for r in ordered]),
                   "activation_ratio": spread.summarize([r["at_cett_ratio"][name]["activation_ratio"]
                                                         for r in ordered]),
                   "vs_cett": spread.paired_ratio([r["at_cett_ratio"][name]["ppl"] for r in ordered], cett)}
            for name in ordered[0]["at_cett_ratio"]}
    return {**result, "over_seeds": over}
