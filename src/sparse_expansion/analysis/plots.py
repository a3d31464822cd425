"""Figures of the neuron analysis (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

_GAUSS_X = np.linspace(-5, 5, 401)
_GAUSS_Y = np.exp(-0.5 * _GAUSS_X ** 2) / math.sqrt(2 * math.pi)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _zscored(values: torch.Tensor) -> np.ndarray:
    v = values.double()
    return ((v - v.mean()) / v.std(unbiased=False)).numpy()


def layer_figure(layer, path: Path) -> None:
    """One layer: WD histogram, WD against mapping difficulty, and the z-scored outputs of the neurons with
    the highest, median and lowest WD against the standard normal."""
    wd, md = layer.wd.numpy(), layer.md.numpy()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    finite = np.isfinite(wd)
    axes[0].hist(wd[finite], bins=60, color="tab:blue")
    threshold = float(np.sort(wd[finite])[::-1][max(0, layer.wasserstein_neurons.numel() - 1)])
    axes[0].axvline(threshold, color="tab:red", ls="--", label=f"top {layer.top_percent:g}%")
    axes[0].set(title=f"{layer.path}: WD to N(0,1)", xlabel="Wasserstein distance", ylabel="neurons")
    axes[0].legend()
    both = finite & np.isfinite(md)
    axes[1].scatter(wd[both], md[both], s=3, alpha=0.5)
    axes[1].set(title=f"mapping difficulty (Spearman {layer.spearman():.2f})", xlabel="WD", ylabel="MD")
    for ax, label in zip(axes[2:], ("top", "median", "bottom")):
        example = layer.examples.get(label)
        if example is None:
            ax.axis("off")
            continue
        ax.hist(_zscored(example["outputs"]), bins=80, density=True, range=(-6, 6), color="tab:gray")
        ax.plot(_GAUSS_X, _GAUSS_Y, color="tab:red", label="N(0,1)")
        ax.set(title=f"{label} WD: neuron {example['neuron']}, WD {example['wd']:.3f}", xlabel="z-scored output")
        ax.legend()
    _save(fig, path)


def summary_figure(rows: list[dict], path: Path) -> None:
    """Across blocks, per linear name: the median and the maximum WD, and the WD/MD rank correlation."""
    names = sorted({r["name"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for name in names:
        mine = sorted((r for r in rows if r["name"] == name), key=lambda r: r["block"])
        blocks = [r["block"] for r in mine]
        axes[0].plot(blocks, [r["wd"]["median"] for r in mine], marker="o", ms=3, label=name)
        axes[1].plot(blocks, [r["wd"]["max"] for r in mine], marker="o", ms=3, label=name)
        axes[2].plot(blocks, [r["spearman_wd_md"] for r in mine], marker="o", ms=3, label=name)
    axes[0].set(title="median WD per layer", xlabel="block", ylabel="WD")
    axes[1].set(title="largest WD per layer", xlabel="block", ylabel="WD")
    axes[2].set(title="Spearman(WD, mapping difficulty)", xlabel="block", ylabel="rho")
    for ax in axes:
        ax.legend(fontsize=7)
    _save(fig, path)


def ablation_figure(rows: list[dict], path: Path) -> None:
    """Perplexity against the sparsity of the selected neurons, one line per selection; the negative
    pre-activation variant as bars."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    dense = next((r["ppl"] for r in rows if r["variant"] == "dense"), None)
    pruned = [r for r in rows if r["variant"] == "sparsegpt-rows"]
    for criterion in dict.fromkeys(r["criterion"] for r in pruned):
        mine = sorted((r for r in pruned if r["criterion"] == criterion), key=lambda r: r["sparsity"])
        axes[0].plot([100 * r["sparsity"] for r in mine], [r["ppl"] for r in mine], marker="o", label=criterion)
    if dense is not None:
        axes[0].axhline(dense, color="black", ls=":", label="dense")
    axes[0].set(yscale="log", xlabel="sparsity of the selected neurons' rows (%)", ylabel="perplexity",
                title="SparseGPT on the selected neurons only")
    axes[0].legend(fontsize=8)
    negative = [r for r in rows if r["variant"] == "zero-negative"]
    axes[1].bar([r["criterion"] for r in negative], [r["ppl"] for r in negative], color="tab:orange")
    if dense is not None:
        axes[1].axhline(dense, color="black", ls=":", label="dense")
        axes[1].legend()
    axes[1].set(ylabel="perplexity", title="negative pre-activations of the selected neurons zeroed")
    axes[1].tick_params(axis="x", rotation=20)
    _save(fig, path)


def disentanglement_figure(wd_dense: np.ndarray, wd_weighted: np.ndarray, selected: np.ndarray,
                           md_dense: np.ndarray, md_weighted: np.ndarray, path: Path, title: str,
                           floor: dict | None = None) -> None:
    """Dense against cluster-weighted WD and MD per neuron (Wasserstein neurons highlighted), with the WD that
    Gaussian outputs would show at these token counts (the finite-sample floor)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, dense, weighted, label in ((axes[0], wd_dense, wd_weighted, "WD"),
                                       (axes[1], md_dense, md_weighted, "mapping difficulty")):
        ok = np.isfinite(dense) & np.isfinite(weighted)
        rest = ok & ~selected
        ax.scatter(dense[rest], weighted[rest], s=3, alpha=0.4, label="other neurons")
        ax.scatter(dense[ok & selected], weighted[ok & selected], s=8, color="tab:red", label="Wasserstein neurons")
        top = max(float(dense[ok].max(initial=0)), float(weighted[ok].max(initial=0)))
        ax.plot([0, top], [0, top], color="black", lw=0.8)
        if floor is not None and label == "WD":
            ax.axhline(floor["weighted"], color="tab:gray", ls="--", lw=0.8, label="Gaussian floor, clusters")
            ax.axvline(floor["dense"], color="tab:gray", ls=":", lw=0.8, label="Gaussian floor, all tokens")
        ax.set(xlabel=f"dense {label}", ylabel=f"cluster-weighted {label}", title=f"{title}: {label}")
        ax.legend(fontsize=8)
    _save(fig, path)


def expert_sweep_figure(dense: torch.Tensor, sparse: dict[int, torch.Tensor], distances: dict[int, float],
                        path: Path, title: str) -> None:
    """One neuron's dense output distribution against its sparse one with 1, 2, 4, ... experts."""
    fig, axes = plt.subplots(1, len(sparse), figsize=(3.6 * len(sparse), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    d = dense.double().numpy()
    lo, hi = np.percentile(d, [0.2, 99.8])
    span = hi - lo
    for ax, (experts, values) in zip(axes, sparse.items()):
        ax.hist(d, bins=80, range=(lo - 0.3 * span, hi + 0.3 * span), density=True, alpha=0.5, label="dense")
        ax.hist(values.double().numpy(), bins=80, range=(lo - 0.3 * span, hi + 0.3 * span), density=True,
                alpha=0.5, label="sparse")
        ax.set(title=f"{experts} expert{'s' if experts > 1 else ''}: W1 to dense {distances[experts]:.3f}",
               xlabel="output")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


__all__ = ["ablation_figure", "disentanglement_figure", "expert_sweep_figure", "layer_figure", "summary_figure"]
