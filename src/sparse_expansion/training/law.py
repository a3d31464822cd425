"""The Sparsing Law study at small scale: activation ratio (CETT-PPL-p%) against tokens seen, with the paper's
fits, for ReLU and SiLU runs, and the final activation ratio against the width-to-depth ratio.

The CETT is searched jointly on the last checkpoints of a run (mean perplexity ratio over them = 1 + p, as the
paper's Algorithm 1), then applied to every checkpoint of that run; the activation ratio of a checkpoint is the
fraction of FFN intermediate activations its thresholds keep on the validation windows.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from ..activation.thresholds import collect_intermediate, layer_thresholds, neuron_thresholds, search_cett, thresholded
from ..evaluation import perplexity
from ..models import discover
from .trainer import TrainConfig, checkpoints, load_weights

LAST_CHECKPOINTS = 5


def _load(config: TrainConfig, checkpoint: Path):
    model = config.model()
    load_weights(model, checkpoint)
    return model.eval()


def checkpoint_measure(config: TrainConfig, checkpoint: Path, calib: torch.Tensor, valid: torch.Tensor,
                       device: torch.device | str = "cpu"):
    """For one checkpoint: its dense perplexity and a function cett -> (perplexity, activation ratio)."""
    model = _load(config, checkpoint)
    layout = discover(model)
    activations = collect_intermediate(model, layout, calib, device=device, progress=False)
    model.to(device)
    dense = perplexity(model, valid, device=device, progress=False).ppl

    def measure(cett: float) -> tuple[float, float]:
        per_neuron = neuron_thresholds(activations, layer_thresholds(activations, cett))
        with thresholded(model, per_neuron) as counter:
            ppl = perplexity(model, valid, device=device, progress=False).ppl
        return ppl, counter.ratio()

    return dense, measure


def run_law_measurements(config: TrainConfig, run: Path, calib: torch.Tensor, valid: torch.Tensor,
                         increase: float = 0.01, device: torch.device | str = "cpu") -> dict:
    """The activation ratio of every checkpoint at the CETT found jointly on the last ones."""
    found = checkpoints(run)
    measures = {path: checkpoint_measure(config, path, calib, valid, device) for path in found}
    last = found[-LAST_CHECKPOINTS:]

    def joint(cett: float) -> tuple[float, float]:
        ratios, actives = [], []
        for path in last:
            dense, measure = measures[path]
            ppl, active = measure(cett)
            ratios.append(ppl / dense)
            actives.append(active)
        return float(np.mean(ratios)), float(np.mean(actives))

    best, steps = search_cett(joint, 1.0, increase)
    rows = []
    for path in found:
        state = json.loads((path / "state.json").read_text())
        dense, measure = measures[path]
        ppl, active = measure(best.cett)
        rows.append({"checkpoint": path.name, "step": state["step"], "tokens": state["tokens"], "dense_ppl": dense,
                     "sparse_ppl": ppl, "activation_ratio": active})
    return {"cett": best.cett, "joint_ppl_ratio": best.ppl, "search": [vars(s) for s in steps], "checkpoints": rows}


def relu_law(d, c, alpha, b, a0):
    return np.exp(-c * np.power(d, alpha) + b) + a0


def silu_law(d, c, alpha, a0):
    return -c * np.power(d, -alpha) + a0


def fit_law(activation: str, tokens: list[float], ratios: list[float]) -> dict:
    """The paper's law for this activation fitted with scipy (D in millions of tokens); warm-up points (the
    first checkpoint) are left out, as the paper does."""
    from scipy.optimize import curve_fit

    d = np.asarray(tokens[1:], dtype=float) / 1e6
    a = np.asarray(ratios[1:], dtype=float)
    if d.size < 4:
        return {"error": f"{d.size} points after warm-up; a fit needs at least 4"}
    # Bounds keep the fit physical: a limit A0 in [0, 1], c >= 0, 0 < alpha <= 5.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if activation == "relu":
                start = (1.0, 0.5, math.log(max(a[0] - a[-1], 1e-3)), min(max(a[-1] * 0.9, 0.0), 1.0))
                params, _ = curve_fit(relu_law, d, a, p0=start, bounds=([0, 1e-3, -50, 0], [np.inf, 5, 50, 1]),
                                      maxfev=20000)
                names = ("c", "alpha", "b", "A0")
                predicted = relu_law(d, *params)
            else:
                params, _ = curve_fit(silu_law, d, a, p0=(0.1, 0.5, min(max(a[-1], 0.0), 1.0)),
                                      bounds=([0, 1e-3, 0], [np.inf, 5, 1]), maxfev=20000)
                names = ("c", "alpha", "A0")
                predicted = silu_law(d, *params)
    except (RuntimeError, ValueError) as exc:
        return {"error": str(exc).splitlines()[0]}
    residual = float(np.sqrt(np.mean((predicted - a) ** 2)))
    return {"law": "exp(-c*D^alpha + b) + A0" if activation == "relu" else "-c*D^(-alpha) + A0",
            "tokens_unit": "millions", **{n: float(v) for n, v in zip(names, params)}, "rmse": residual,
            "trend": "falling" if a[-1] < a[0] else "rising"}
