"""Figure of the activation-sparsity study: perplexity against activation ratio, one curve per method."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves_figure(curves: dict[str, list[dict]], dense_ppl: float, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, points in curves.items():
        points = sorted(points, key=lambda p: p["activation_ratio"])
        ax.plot([p["activation_ratio"] for p in points], [p["ppl"] for p in points], marker="o", ms=4, label=method)
    ax.axhline(dense_ppl, color="black", ls=":", lw=0.8, label="dense")
    ax.axhline(dense_ppl * 1.01, color="gray", ls="--", lw=0.8, label="dense + 1%")
    ax.set(xlabel="activation ratio (fraction of FFN intermediate activations kept)", ylabel="perplexity",
           yscale="log", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
