"""Plots for the Sparse Expansion study from a `sparse-expansion compare --json` file.

    python benchmarks/plot_expansion.py docs/study/expansion.json docs/study/iso_flops.json --out docs/study

Writes ppl_vs_experts.png (one line per sparsity, one-shot baselines as horizontal marks) and
ppl_vs_ffn_flops.png (perplexity against FFN FLOPs per token, routers counted: the paper's headline).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINES = {"sparsegpt": ("SparseGPT", "--"), "wanda": ("Wanda", ":"), "magnitude": ("magnitude", "-.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+", help="compare --json outputs; their rows are pooled")
    parser.add_argument("--out", default="docs/study")
    args = parser.parse_args()
    rows = []
    for path in args.json_files:
        with open(path) as handle:
            rows += json.load(handle)["results"]
    os.makedirs(args.out, exist_ok=True)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    # Baselines run at extra (iso-FLOP) sparsities appear only in the FLOPs plot.
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] == "sparse-expansion"})
    colors = dict(zip(sparsities, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in sparsities:
        se = sorted((r for r in rows if r["method"] == "sparse-expansion" and r["sparsity"] == s),
                    key=lambda r: r["experts"])
        if se:
            ax.plot([r["experts"] for r in se], [r["ppl"] for r in se], "o-", color=colors[s],
                    label=f"Sparse Expansion, {s:.0%}")
        for method, (label, style) in BASELINES.items():
            base = next((r for r in rows if r["method"] == method and r["sparsity"] == s), None)
            if base and base["ppl"] < 1e4:
                ax.axhline(base["ppl"], color=colors[s], linestyle=style, linewidth=1,
                           label=f"{label}, {s:.0%}")
    if dense:
        ax.axhline(dense["ppl"], color="black", linewidth=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("experts per FFN linear")
    ax.set_ylabel("perplexity (embedded test split)")
    ax.set_title("Perplexity against number of experts")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ppl_vs_experts.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"sparsegpt": "s", "wanda": "^", "magnitude": "x"}
    for method, marker in markers.items():
        pts = sorted((r["ffn_flops_per_token"] / 1e6, r["ppl"]) for r in rows if r["method"] == method
                     and r["ppl"] < 1e4)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color="gray", label=method)
    expanded = [r for r in rows if r["method"] == "sparse-expansion"]
    ax.scatter([r["ffn_flops_per_token"] / 1e6 for r in expanded], [r["ppl"] for r in expanded],
               s=[12 * r["experts"] ** 0.8 + 10 for r in expanded], c=[colors[r["sparsity"]] for r in expanded],
               label="Sparse Expansion (size = experts, colour = sparsity)", zorder=3)
    if dense:
        ax.axhline(dense["ppl"], color="black", linewidth=1, label="dense")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FFN MFLOPs per token (non-zeros x 2, routers included)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity against FFN compute per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ppl_vs_ffn_flops.png"), dpi=120)


if __name__ == "__main__":
    main()
