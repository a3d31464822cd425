"""What the neuron analysis writes: per-layer JSON and CSV, and the rows of the summary."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from ..io import atomic_write_text


def _finite(value: float) -> float | None:
    return None if not math.isfinite(value) else value


def distribution(values: torch.Tensor, top_percent: float) -> dict:
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0:
        return {"count": 0}
    return {"count": v.numel(), "mean": float(v.mean()), "median": float(v.median()), "min": float(v.min()),
            "max": float(v.max()), f"p{100 - top_percent:g}": float(torch.quantile(v, 1 - top_percent / 100))}


def layer_summary(layer) -> dict:
    """The layer's JSON record, without the per-neuron arrays (those go to its CSV)."""
    selected = layer.wasserstein_neurons
    return {"layer": layer.path, "block": layer.block, "name": layer.name, "role": layer.role,
            "neurons": layer.neurons, "tokens": layer.tokens, "top_percent": layer.top_percent,
            "wd": distribution(layer.wd, layer.top_percent), "md": distribution(layer.md, layer.top_percent),
            "spearman_wd_md": _finite(layer.spearman()),
            "undefined_neurons": int((~torch.isfinite(layer.wd)).sum()),
            "wasserstein_neurons": selected.tolist(), "wasserstein_neurons_wd": layer.wd[selected].tolist(),
            "examples": {label: {"neuron": e["neuron"], "wd": e["wd"]} for label, e in layer.examples.items()}}


def layer_csv(layer) -> str:
    selected = set(layer.wasserstein_neurons.tolist())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["neuron", "wd", "mapping_difficulty", "output_mean", "output_std", "weight_norm",
                     "wasserstein_neuron"])
    columns = [t.tolist() for t in (layer.wd, layer.md, layer.mean, layer.std, layer.weight_norm)]
    for i, values in enumerate(zip(*columns)):
        writer.writerow([i, *(f"{v:.6g}" for v in values), int(i in selected)])
    return buffer.getvalue()


def layer_stem(layer) -> str:
    return f"{layer.block:03d}.{layer.name}"


def write_layer(directory: Path, layer) -> dict:
    summary = layer_summary(layer)
    stem = layer_stem(layer)
    atomic_write_text(directory / f"{stem}.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(directory / f"{stem}.csv", layer_csv(layer))
    return summary


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
