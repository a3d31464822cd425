"""What each command prints of its result: one function per command, text only (the jobs wrote the files)."""

from __future__ import annotations

from ..evaluation import spread


def built(result, out: str) -> None:
    report, data = result.report, result.manifest
    if data["command"] == "prune":
        print(f"{report.method} {report.spec.label}: measured sparsity {report.overall_sparsity():.4f} over "
              f"{len(report.layers)} layers in {report.seconds:.1f} s -> {out}")
    else:
        config = report.config
        print(f"sparse expansion x{config.experts} at {report.spec.label}: {report.overall_sparsity():.4f} sparsity "
              f"per expert, {report.fallbacks()} fallback experts, {report.seconds:.1f} s -> {out}")
        costs = data["costs"]
        print(f"FFN FLOPs/token {costs['ffn_flops_per_token'] / 1e6:.1f} M (dense "
              f"{costs['ffn_dense_flops_per_token'] / 1e6:.1f} M, router {costs['router_flops_per_token'] / 1e6:.2f} "
              f"M); stored {costs['stored_bytes'] / 2**20:.0f} MiB")
    if "perplexity" in data:
        print(f"perplexity {data['perplexity']['ppl']:.3f} on {data['perplexity']['eval_tokens']} tokens")
    over = data.get("perplexity_over_seeds")
    if over:
        ppl = over["ppl"]
        print(f"perplexity over {ppl['n']} calibration seeds ({', '.join(map(str, over['seeds']))}): "
              f"{ppl['mean']:.3f} ± {ppl['half_width']:.3f} (95% CI [{ppl['ci_low']:.3f}, {ppl['ci_high']:.3f}], "
              f"std {ppl['std']:.3f}); the model written is seed {over['seeds'][0]}'s")


def perplexity(result: dict, seqlen: int) -> None:
    print(f"perplexity {result['ppl']:.4f} on {result['eval_tokens']} tokens ({result['eval_windows']} windows "
          f"of {seqlen})")


def neurons(summary: dict, out: str) -> None:
    layers = summary["layers"]
    print(f"{len(layers)} FFN linear layers of {len(summary['blocks'])} blocks, {summary['calib_tokens']} calibration "
          f"tokens -> {out}")
    for row in layers[:3]:
        rho = row["spearman_wd_md"]
        print(f"  {row['layer']}: median WD {row['wd']['median']:.4f}, max {row['wd']['max']:.4f}, "
              f"Spearman(WD, MD) {rho if rho is None else round(rho, 3)}")
    if len(layers) > 3:
        print("...")
    for row in summary.get("ablation", [])[1:]:
        sparsity = "zero negative" if row["sparsity"] is None else f"{row['sparsity']:.0%}"
        print(f"  ablation {row['criterion']} {sparsity}: perplexity {row['ppl']:.3f}")
    over = summary.get("ablation_over_seeds")
    if over:
        print(f"  over {len(over['seeds'])} calibration seeds (95% CI; ratio to the Wasserstein choice, paired):")
        for g in over["groups"]:
            vs = g.get("vs_wasserstein")
            if vs is not None:
                sparsity = "zero negative" if g["sparsity"] is None else f"{g['sparsity']:.0%}"
                print(f"    {g['criterion']} {sparsity}: perplexity {spread.describe(g['ppl'])}, "
                      f"/ wasserstein {vs['mean']:.3f} [{vs['ci_low']:.3f}, {vs['ci_high']:.3f}]: {vs['verdict']}")
    d = summary.get("disentanglement", {}).get("wd_wasserstein_neurons", {})
    if d.get("neurons"):
        print(f"  disentanglement: weighted WD lower for {d['fraction_lower']:.1%} of the Wasserstein neurons, "
              f"median change {d['median_relative_change']:+.1%}")


def activations(result: dict, increase: float) -> None:
    print(f"PPL-{increase:.1%} activation ratio {result['activation_ratio']:.4f} (sparsity {result['sparsity']:.4f}) "
          f"at CETT {result['cett']:.4f}: perplexity {result['sparse_ppl']:.4f} against dense "
          f"{result['dense_ppl']:.4f} ({result['ppl_ratio']:.4f}x) on {result['eval_tokens']} tokens")
    for name, point in (result.get("at_cett_ratio") or {}).items():
        print(f"  {name} at the same activation ratio ({point['activation_ratio']:.4f}): perplexity {point['ppl']:.4f}")
    over = result.get("over_seeds")
    if over:
        print(f"over {len(over['seeds'])} calibration seeds (95% CI): activation ratio "
              f"{spread.describe(over['activation_ratio'], 4)}, perplexity {spread.describe(over['sparse_ppl'], 4)} "
              f"({spread.describe(over['ppl_ratio'], 4)}x dense), CETT {spread.describe(over['cett'], 4)}")
        for name, entry in (over.get("at_cett_ratio") or {}).items():
            vs = entry["vs_cett"]
            print(f"  {name} / CETT at equal activation ratio: {vs['mean']:.4f} [{vs['ci_low']:.4f}, "
                  f"{vs['ci_high']:.4f}]: {vs['verdict']}")


def law(result: dict, out: str) -> None:
    for name, run in result["runs"].items():
        rows, fit = run["checkpoints"], run["fit"]
        fitted = fit["error"] if "error" in fit else (f"A0 {fit['A0']:.4f}, alpha {fit['alpha']:.3g}, "
                                                      f"rmse {fit['rmse']:.4f}")
        print(f"{name}: activation ratio {rows[0]['activation_ratio']:.4f} at {rows[0]['tokens']:,} tokens -> "
              f"{rows[-1]['activation_ratio']:.4f} at {rows[-1]['tokens']:,} (CETT {run['cett']:.4f}); fit: {fitted}")
    for row in result["width_depth"]:
        print(f"{row['run']}: width/depth {row['width_depth_ratio']:.1f}, "
              f"activation ratio {row['activation_ratio']:.4f}")
    print(f"-> {out}/law.json, law.png")


def model_bench(result: dict) -> None:
    for name in ("baseline", "model"):
        r = result[name]
        print(f"{name} ({result['dtype']}): prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode "
              f"{r['decode_tokens_per_s']:.1f} tok/s, reading {r['decode_bytes_per_token']:,} bytes a token: "
              f"{r['bandwidth_fraction']:.0%} of the bandwidth limit ({r['decode_limit_tokens_per_s']:.1f} tok/s at "
              f"{result['bandwidth_gbs']:.1f} GB/s); disk {r['disk_bytes'] or 0:,} bytes, parameters "
              f"{r['parameter_bytes']:,} bytes")
    print(f"speedup: prefill {result['prefill_speedup']:.2f}x, decode {result['decode_speedup']:.2f}x; "
          f"peak RSS {result['peak_rss_mb']:.0f} MB (both models)")


def activation_bench(result: dict, bench) -> None:
    for label, tokens in (("single", 1), ("batched", bench.batch)):
        t = result[label]
        print(f"{bench.rows}x{bench.cols} at {bench.activation_sparsity:.0%} activation sparsity, {tokens} token(s): "
              f"dense {t['dense_ms']:.3f} ms, masked dense {t['masked_dense_ms']:.3f} ms, kernel {t['kernel_ms']:.3f} "
              f"ms, layer {t['layer_ms']:.3f} ms, speedup {t['speedup']:.2f}x (memory-bound limit: dense "
              f"{t['dense_limit_ms']:.3f} ms, kernel {t['kernel_limit_ms']:.3f} ms at {result['bandwidth_gbs']:.1f} "
              "GB/s)")


def semi_structured_bench(result: dict, bench) -> None:
    for label in ("single", "batched"):
        t = result[label]
        print(f"{bench.rows}x{bench.cols} 2:4 {result['dtype']} on {result['device']}, {label}: dense "
              f"{t['dense_ms']:.4f} ms, semi-structured {t['semi_structured_ms']:.4f} ms, speedup {t['speedup']:.2f}x")
    uses = result["layer_uses_semi_structured_at"] or "never"
    print(f"a model's layer of this shape uses 2:4 at token counts: {uses}")


def kernel_bench(result: dict, bench) -> None:
    sparsity = bench.weight_sparsity
    what = result["dtype"] + (f", {result['bits']}-bit grid" if result["bits"] else "")
    for label, tokens in (("single", 1), ("batched", bench.batch)):
        t = result[label]
        others = "".join(f"{title} {t[key + '_ms']:.3f} ms, " for key, title in (
            ("torch_csr", "torch CSR"), ("scipy_csr", "scipy CSR"), ("bitmask_kernel", "our bitmask"),
            ("csr_kernel", "our CSR")) if key + "_ms" in t)
        kernel = (f"kernel ({result['form']}) {t['kernel_ms']:.3f} ms, layer {t['layer_ms']:.3f} ms, "
                  if "kernel_ms" in t else "")
        limit = f", sparse {t['sparse_limit_ms']:.3f} ms" if "sparse_limit_ms" in t else ""
        print(f"{bench.rows}x{bench.cols} at {sparsity:.0%} ({what}), {tokens} token(s): dense {t['dense_ms']:.3f} "
              f"ms, {others}{kernel}speedup {t['speedup']:.2f}x (memory-bound limit: dense {t['dense_limit_ms']:.3f} "
              f"ms{limit} at {result['bandwidth_gbs']:.1f} GB/s)")
    if not result["kernel_available"]:
        print(f"sparse kernel unavailable: {result['kernel_unavailable_reason']}")
