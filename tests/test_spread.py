"""Numbers with their spread: compare over calibration seeds (every run kept, the same test windows for all, the
statistics scipy's), paired ratios and their verdict words, the environment in the reports, and the calibration-size
warning exactly when the tokens are fewer than the widest pruned layer's inputs."""

import json
import math

import pytest
import torch
from scipy import stats

from conftest import run_cli, small_args
from sparse_expansion.data import calibration_windows, evaluation_windows, load_corpus, resolve_bos
from sparse_expansion.evaluation import spread
from sparse_expansion.models import load_model

SEEDS = 3


def _t_interval(values):
    values = list(values)
    mean = sum(values) / len(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, stats.tstd(values), low, high


@pytest.fixture(scope="module")
def seeded(llama_dir, corpus_dir, tmp_path_factory):
    """compare --seeds 3 (seed 5..7) of dense, SparseGPT and Wanda, run twice."""
    out = tmp_path_factory.mktemp("seeds")
    args = ["compare", "--methods", "dense,wanda,sparsegpt", "--sparsity", "0.5", "--model", str(llama_dir),
            "--data", str(corpus_dir), *small_args(calib_samples=4, eval_samples=3), "--seed", "5",
            "--seeds", str(SEEDS)]
    from sparse_expansion.cli import main

    runs = []
    for name in ("a", "b"):
        assert main([*args, "--json", str(out / f"{name}.json")]) == 0
        runs.append(json.loads((out / f"{name}.json").read_text()))
    return runs, out


def test_every_run_is_kept_with_the_same_test_windows(seeded, llama_dir, corpus_dir):
    (first, _), _ = seeded
    rows = first["results"]
    for method in ("dense", "wanda", "sparsegpt"):
        assert sorted(r["seed"] for r in rows if r["method"] == method) == [5, 6, 7]
    # The test windows, cut again here, hash to what every run recorded; the calibration windows differ by seed.
    loaded = load_model(str(llama_dir), quiet=True)
    corpus = load_corpus(str(corpus_dir))
    bos = resolve_bos(loaded.tokenizer, "auto")
    test = evaluation_windows(corpus, loaded.tokenizer, 32, 3, bos=bos)
    from sparse_expansion.workflow.report import windows_digest

    assert {r["test_windows_sha256"] for r in rows} == {windows_digest(test)}
    for seed in (5, 6, 7):
        calib = calibration_windows(corpus, loaded.tokenizer, 4, 32, seed, bos=bos)
        assert {r["calib_windows_sha256"] for r in rows if r["seed"] == seed and r["calib_tokens"]} == {
            windows_digest(calib)}
    assert len({r["calib_windows_sha256"] for r in rows if r["calib_tokens"]}) == SEEDS


def test_the_statistics_are_scipys_and_the_ratios_paired_by_seed(seeded):
    (first, _), _ = seeded
    rows = first["results"]
    by = {(r["method"], r["seed"]): r["ppl"] for r in rows}
    groups = {g["method"]: g for g in first["summary"]["groups"]}
    assert first["summary"]["reference"] == "sparsegpt"
    for method, group in groups.items():
        if method == "dense":  # the same figure at every seed: scipy's interval of no spread is NaN, ours a point
            assert group["ppl"]["ci_low"] == group["ppl"]["ci_high"] == by[("dense", 5)]
            continue
        mean, std, low, high = _t_interval(by[(method, s)] for s in (5, 6, 7))
        assert group["ppl"]["mean"] == pytest.approx(mean, rel=1e-12)
        assert group["ppl"]["std"] == pytest.approx(std, rel=1e-9)
        assert (group["ppl"]["ci_low"], group["ppl"]["ci_high"]) == pytest.approx((low, high), rel=1e-9)
    ratios = [by[("wanda", s)] / by[("sparsegpt", s)] for s in (5, 6, 7)]
    vs = groups["wanda"]["vs_reference"]
    assert vs["ratios"] == pytest.approx(ratios, rel=1e-12)
    mean, _, low, high = _t_interval(ratios)
    assert (vs["mean"], vs["ci_low"], vs["ci_high"]) == pytest.approx((mean, low, high), rel=1e-9)
    assert vs["verdict"] == ("better" if high < 1 else "worse" if low > 1 else "not distinguishable at 3 seeds")
    assert "vs_reference" not in groups["sparsegpt"]
    # dense reads no data: measured once, the same figure paired at every seed
    assert groups["dense"]["ppl"]["std"] == 0


def test_the_same_seeds_give_the_same_numbers(seeded):
    (a, b), _ = seeded
    assert [(r["method"], r["seed"], r["ppl"]) for r in a["results"]] == [
        (r["method"], r["seed"], r["ppl"]) for r in b["results"]]


def test_reports_carry_the_environment_and_the_intervals(seeded):
    (first, _), out = seeded
    env = first["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["batch_size"] == 8
    assert isinstance(env["cpu_flags"], list)
    report = (out / "a.md").read_text()
    assert f"{torch.get_num_threads()} threads" in report and "batch size 8" in report
    wanda = next(g for g in first["summary"]["groups"] if g["method"] == "wanda")
    assert spread.describe(wanda["ppl"]) in report and "±" in report
    assert (out / "a.png").stat().st_size > 0


def test_threads_sets_torchs_threads_for_the_run(llama_dir, corpus_dir, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        code, _, _ = run_cli(["eval", "--model", str(llama_dir), "--data", str(corpus_dir), *small_args(),
                              "--threads", "1", "--json", str(tmp_path / "e.json")], capsys)
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("values", "reference", "words"), [
    ([10.0, 10.2, 9.9], [10.1, 10.0, 10.05], "not distinguishable at 3 seeds"),  # ratios around 1
    ([9.0, 9.1, 8.95, 9.05], [10.0, 10.1, 9.9, 10.05], "better"),  # about 10% lower at every seed
    ([11.0, 11.2, 10.9], [10.0, 10.1, 9.95], "worse"),
    ([9.0], [10.0], "not distinguishable at 1 seed"),  # one pair gives no interval
])
def test_the_verdict_follows_the_interval(values, reference, words):
    result = spread.paired_ratio(values, reference)
    assert result["verdict"] == words
    if len(values) > 1:
        ratios = [v / r for v, r in zip(values, reference, strict=True)]
        _, _, low, high = _t_interval(ratios)
        assert (result["ci_low"] <= 1 <= result["ci_high"]) == (low <= 1 <= high)


def test_summarize_matches_scipy_and_refuses_nothing():
    values = [3.0, 4.5, 5.25, 4.0, 3.5]
    summary = spread.summarize(values)
    mean, std, low, high = _t_interval(values)
    assert (summary["mean"], summary["std"], summary["ci_low"], summary["ci_high"]) == pytest.approx(
        (mean, std, low, high))
    assert spread.summarize([2.0])["half_width"] is None
    with pytest.raises(ValueError, match="values"):
        spread.summarize([])
    assert math.isclose(summary["half_width"], (high - low) / 2)


@pytest.mark.parametrize(("calib_samples", "warned"), [(3, True), (4, False), (5, False)])
def test_the_calibration_warning_appears_exactly_when_tokens_are_fewer_than_the_widest_input(
        calib_samples, warned, llama_dir, corpus_dir, tmp_path, capsys):
    """The tiny Llama's widest FFN input is down_proj's 128 (intermediate size); windows of 32 tokens."""
    code, _, err = run_cli(["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--model", str(llama_dir),
                            "--data", str(corpus_dir), *small_args(calib_samples=calib_samples),
                            "--out", str(tmp_path / "p")], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "warning" in line]
    if warned:
        assert len(lines) == 1 and f"{calib_samples * 32:,} calibration tokens" in lines[0]
        assert "128 inputs" in lines[0] and "mlp.down_proj" in lines[0]
    else:
        assert lines == []
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    expected = {"layer": "model.layers.*.mlp.down_proj", "inputs": 128, "calib_tokens": calib_samples * 32}
    assert manifest.get("calibration_warning") == (expected if warned else None)
