"""Plot docs/study/selective.json: perplexity against stored FFN bytes and against FFN FLOPs per token."""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results")
    parser.add_argument("--out", default="docs/study")
    args = parser.parse_args()
    with open(args.results) as handle:
        data = json.load(handle)
    rows = data["results"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, scale, label in ((axes[0], "ffn_stored_bytes", 2 ** 20, "stored FFN weights and routers (MiB)"),
                                  (axes[1], "ffn_flops_per_token", 1e6, "FFN MFLOP per token (routers included)")):
        for row in rows:
            random = row.get("selection") == "random"
            color = "tab:gray" if random else ("tab:blue" if row["method"] == "sparsegpt" else
                                                "tab:red" if row["selective_percent"] is None else "tab:green")
            ax.scatter(row[key] / scale, row["ppl"], color=color, marker="x" if random else "o")
            ax.annotate(row["label"].replace(" (wasserstein)", ""), (row[key] / scale, row["ppl"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        selective = sorted((r for r in rows if r["selective_percent"] is not None and r.get("selection") != "random"),
                           key=lambda r: r[key])
        ax.plot([r[key] / scale for r in selective], [r["ppl"] for r in selective], color="tab:green", lw=0.8)
        ax.axhline(data["dense_ppl"], color="black", ls=":", lw=0.8, label="dense")
        ax.set(xlabel=label, ylabel="perplexity")
        ax.legend(fontsize=8)
    sparsity = rows[0]["sparsity"]
    fig.suptitle(f"Selective expansion at {sparsity:.0%} sparsity (embedded model; green: top-p% rows by WD, "
                 "gray x: random rows)")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "selective.png"), dpi=100)


if __name__ == "__main__":
    main()
