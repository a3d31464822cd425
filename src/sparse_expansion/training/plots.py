"""Figures of the law study: activation ratio against tokens seen (with the fitted laws), and against the
width-to-depth ratio."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .law import relu_law, silu_law  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def law_figure(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, run in result["runs"].items():
        rows = run["checkpoints"]
        d = np.array([r["tokens"] for r in rows], dtype=float) / 1e6
        a = np.array([r["activation_ratio"] for r in rows])
        line = ax.plot(d, a, marker="o", ms=4, ls="", label=f"{name} (CETT {run['cett']:.3f})")[0]
        fit = run.get("fit", {})
        if "error" not in fit and d.size > 1:
            grid = np.linspace(d[1], d[-1], 200)
            if "b" in fit:
                curve = relu_law(grid, fit["c"], fit["alpha"], fit["b"], fit["A0"])
                text = f"exp(-{fit['c']:.3g} D^{fit['alpha']:.3g} + {fit['b']:.3g}) + {fit['A0']:.3g}"
            else:
                curve = silu_law(grid, fit["c"], fit["alpha"], fit["A0"])
                text = f"-{fit['c']:.3g} D^-{fit['alpha']:.3g} + {fit['A0']:.3g}"
            ax.plot(grid, curve, color=line.get_color(), lw=1, label=f"fit: {text}")
    ax.set(xlabel="tokens seen (millions)", ylabel=f"activation ratio (CETT-PPL-{result['ppl_increase']:.0%})",
           title="Activation ratio during training")
    ax.legend(fontsize=7)
    _save(fig, path)


def width_depth_figure(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = sorted(rows, key=lambda r: r["width_depth_ratio"])
    ax.plot([r["width_depth_ratio"] for r in rows], [r["activation_ratio"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"{r['hidden']}x{r['layers']}", (r["width_depth_ratio"], r["activation_ratio"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="width / depth (hidden size / layers)", ylabel="final activation ratio",
           title="ReLU models, similar non-embedding parameters")
    _save(fig, path)
