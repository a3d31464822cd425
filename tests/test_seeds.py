"""--seeds beyond compare: expand/prune --eval, activations and neurons --ablate repeat their job over calibration
draws seed, seed + 1, ... on the same test windows. Each further seed's figures are checked against a separate run at
that --seed (an independent computation of the same thing), the spread against scipy's."""

import json

import pytest
from scipy import stats

from conftest import run_cli, small_args
from sparse_expansion.cli import main

ARGS = small_args(calib_samples=4, eval_samples=3)


def _interval(values):
    mean = sum(values) / len(values)
    return (mean, stats.tstd(values), *stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values)))


def test_expand_over_seeds_equals_separate_runs_and_leaves_only_its_output(llama_dir, corpus_dir, tmp_path, capsys):
    common = ["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2", "--sparsity", "0.5",
              "--pca-reduction", "8", "--eval", *ARGS]
    code, out, _ = run_cli([*common, "--seed", "3", "--seeds", "3", "--out", str(tmp_path / "x")], capsys)
    assert code == 0 and "over 3 calibration seeds" in out
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    over = manifest["perplexity_over_seeds"]
    assert over["seeds"] == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # the other seeds' builds are gone
    ppl = [r["ppl"] for r in over["runs"]]
    assert ppl[0] == manifest["perplexity"]["ppl"]
    for seed, value in zip((4, 5), ppl[1:]):
        assert run_cli([*common, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}")], capsys)[0] == 0
        alone = json.loads((tmp_path / f"s{seed}" / "manifest.json").read_text())["perplexity"]["ppl"]
        assert value == alone
    assert len({r["test_windows_sha256"] for r in over["runs"]}) == 1
    assert len({r["calib_windows_sha256"] for r in over["runs"]}) == 3
    mean, std, low, high = _interval(ppl)
    summary = over["ppl"]
    assert (summary["mean"], summary["std"], summary["ci_low"], summary["ci_high"]) == pytest.approx(
        (mean, std, low, high), rel=1e-9)


def test_prune_over_seeds_through_the_api(llama_dir, corpus_dir, tmp_path):
    import sparse_expansion as se

    se.prune(str(llama_dir), data=str(corpus_dir), method="wanda", sparsity=0.5, calib_samples=4, seqlen=32,
             eval_samples=3, quiet=True, seeds=2, out=tmp_path / "p", evaluate=True)
    over = json.loads((tmp_path / "p" / "manifest.json").read_text())["perplexity_over_seeds"]
    assert over["seeds"] == [0, 1] and over["ppl"]["n"] == 2
    with pytest.raises(ValueError, match="seeds"):
        se.prune(str(llama_dir), data=str(corpus_dir), method="wanda", seeds=2)  # no out


def test_activations_over_seeds_pair_the_baselines_with_cett(llama_dir, corpus_dir, tmp_path, capsys):
    common = ["activations", "--model", str(llama_dir), "--data", str(corpus_dir), "--ppl-increase", "0.05",
              "--baselines", *ARGS]
    assert main([*common, "--seeds", "2", "--json", str(tmp_path / "a.json")]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    over = result["over_seeds"]
    assert over["seeds"] == [0, 1]
    assert main([*common, "--seed", "1", "--json", str(tmp_path / "b.json")]) == 0
    alone = json.loads((tmp_path / "b.json").read_text())
    second = over["runs"][1]
    assert (second["activation_ratio"], second["sparse_ppl"], second["cett"]) == (
        alone["activation_ratio"], alone["sparse_ppl"], alone["cett"])
    assert second["at_cett_ratio"] == alone["at_cett_ratio"]
    assert result["activation_ratio"] == over["runs"][0]["activation_ratio"]  # the top level is the first seed's
    for name in ("top-k", "FAT-epsilon"):
        ratios = [r["at_cett_ratio"][name]["ppl"] / r["sparse_ppl"] for r in over["runs"]]
        assert over["at_cett_ratio"][name]["vs_cett"]["ratios"] == pytest.approx(ratios, rel=1e-12)
    # top-k keeps k = ratio x d_f inputs per token (at least one of the 128): its measured ratio is CETT's up to
    # rounding k to a whole number
    for run in over["runs"]:
        assert run["at_cett_ratio"]["top-k"]["activation_ratio"] == pytest.approx(
            max(run["activation_ratio"], 1 / 128), abs=0.5 / 128 + 1e-9)


def test_neurons_ablation_over_seeds(llama_dir, corpus_dir, tmp_path, capsys):
    common = ["neurons", "--model", str(llama_dir), "--data", str(corpus_dir), "--layers", "1", "--ablate",
              "--ablate-sparsity", "0.9", "--top-percent", "10", "--no-plots", *ARGS]
    assert main([*common, "--seeds", "2", "--out", str(tmp_path / "n")]) == 0
    over = json.loads((tmp_path / "n" / "ablation_seeds.json").read_text())
    assert over["seeds"] == [0, 1] and (tmp_path / "n" / "ablation_seeds.md").is_file()
    assert main([*common, "--seed", "1", "--out", str(tmp_path / "m")]) == 0
    alone = json.loads((tmp_path / "m" / "ablation.json").read_text())["results"]
    assert [r["ppl"] for r in over["runs"]["1"]] == [r["ppl"] for r in alone]
    first = json.loads((tmp_path / "n" / "ablation.json").read_text())["results"]
    assert [r["ppl"] for r in over["runs"]["0"]] == [r["ppl"] for r in first]
    by_seed = {seed: {(r["variant"], r["criterion"], r["sparsity"]): r["ppl"] for r in over["runs"][str(seed)]}
               for seed in (0, 1)}
    random = next(g for g in over["groups"] if g["criterion"] == "random" and g["variant"] == "sparsegpt-rows")
    expected = [by_seed[s][("sparsegpt-rows", "random", 0.9)] / by_seed[s][("sparsegpt-rows", "wasserstein", 0.9)]
                for s in (0, 1)]
    assert random["vs_wasserstein"]["ratios"] == pytest.approx(expected, rel=1e-12)
