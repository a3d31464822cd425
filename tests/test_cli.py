"""The command-line interface end to end on a tiny local model and corpus, and its errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparse_expansion
from sparse_expansion.cli import main

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-samples", "3", "--quiet"]


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_a_loadable_directory_with_a_manifest(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(["prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--method", "sparsegpt",
                               "--sparsity", "0.5", "--out", str(out), "--eval", *SMALL], capsys)
    assert code == 0, stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "sparsegpt" and manifest["sparsity"] == 0.5
    assert manifest["calib_tokens"] == 4 * 32
    assert manifest["settings"]["seed"] == 0
    assert len(manifest["layers"]) == 2 * 3
    assert all(abs(layer["sparsity"] - 0.5) < 0.01 for layer in manifest["layers"].values())
    assert manifest["perplexity"]["eval_tokens"] == 3 * 32
    assert manifest["weights"]["encoding"] == "compressed" and manifest["weights"]["form"] == "state-dict"
    assert manifest["weights"]["bytes"] < manifest["weights"]["dense_bytes"]
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    model = sparse_expansion.load(str(out)).model
    assert (model.model.layers[0].mlp.down_proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    # --format dense: a plain Hugging Face checkpoint with the same weights.
    dense_out = tmp_path / "pruned-dense"
    assert run_cli(["prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--method", "sparsegpt",
                    "--sparsity", "0.5", "--out", str(dense_out), "--format", "dense", *SMALL], capsys)[0] == 0
    hf_model = AutoModelForCausalLM.from_pretrained(dense_out)
    for (name, a), (_, b) in zip(model.state_dict().items(), hf_model.state_dict().items()):
        assert torch.equal(a, b), name
    # The pruned directory evaluates like any model directory.
    code, stdout, _ = run_cli(["eval", "--model", str(out), "--data", str(corpus_dir), *SMALL], capsys)
    assert code == 0 and "perplexity" in stdout


def test_nm_with_quantization(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "nm"
    code, _, err = run_cli(["prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--nm", "2:4",
                            "--bits", "4", "--out", str(out), "--format", "dense", *SMALL], capsys)
    assert code == 0, err
    weight = AutoModelForCausalLM.from_pretrained(out).model.layers[1].mlp.up_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert all(len(torch.unique(row)) <= 16 for row in weight)


def test_compare_writes_json_and_markdown(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    code, stdout, err = run_cli(["compare", "--model", str(llama_dir), "--data", str(corpus_dir), "--methods",
                                 "dense,magnitude,wanda,sparsegpt", "--sparsity", "0.5", "--json", str(out), *SMALL],
                                capsys)
    assert code == 0, err
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["dense", "magnitude", "wanda", "sparsegpt"]
    for row in results:
        for key in ("method", "sparsity", "ppl", "eval_tokens", "calib_tokens", "seconds"):
            assert key in row
        assert row["eval_tokens"] == 3 * 32
    assert results[2]["calib_tokens"] == 4 * 32
    assert "| sparsegpt |" in stdout
    assert "| wanda |" in (tmp_path / "cmp.md").read_text()


def test_console_script_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparse_expansion.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compare" in result.stdout


def _assert_clean_failure(code, err, out_dir, match):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert match in lines[0]
    if out_dir is not None:
        assert not out_dir.exists()
        assert not any(p.name.startswith(f".{out_dir.name}.") for p in out_dir.parent.iterdir())


@pytest.mark.parametrize("case", [
    "missing_model", "hub_offline", "no_blocks", "sparsity_high", "sparsity_negative", "bad_nm",
    "short_calibration", "window_too_long", "missing_data",
])
def test_bad_input_gives_one_line_error_and_no_output(case, llama_dir, corpus_dir, model_dir_factory, tmp_path,
                                                      capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--sparsity", "0.5", "--out", str(out),
            *SMALL]

    def set_option(name, value):
        args[args.index(name) + 1] = value

    expected = {
        "missing_model": "model path not found",
        "hub_offline": "could not load 'someone/some-model' from the Hugging Face hub",
        "no_blocks": "no decoder blocks",
        "sparsity_high": "sparsity must be in [0, 1)",
        "sparsity_negative": "sparsity must be in [0, 1)",
        "bad_nm": "malformed N:M",
        "short_calibration": "shorter than one window",
        "window_too_long": "longer than the model's context",
        "missing_data": "data path not found",
    }[case]
    if case == "missing_model":
        set_option("--model", str(tmp_path / "does-not-exist"))
    elif case == "hub_offline":
        set_option("--model", "someone/some-model")
    elif case == "no_blocks":
        set_option("--model", str(model_dir_factory("llama", num_hidden_layers=0)))
    elif case == "sparsity_high":
        set_option("--sparsity", "1.0")
    elif case == "sparsity_negative":
        set_option("--sparsity", "-0.2")
    elif case == "bad_nm":
        args += ["--nm", "2by4"]
    elif case == "short_calibration":
        short = tmp_path / "short"
        short.mkdir()
        (short / "train.txt").write_text("tiny")
        (short / "test.txt").write_text("tiny")
        set_option("--data", str(short))
    elif case == "window_too_long":
        set_option("--seqlen", "4096")
    elif case == "missing_data":
        set_option("--data", str(tmp_path / "nothing-here"))
    code, _, err = run_cli(args, capsys)
    _assert_clean_failure(code, err, out, expected)


def test_existing_output_is_not_overwritten(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(["prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--sparsity", "0.5",
                            "--out", str(out), *SMALL], capsys)
    assert code != 0 and "already exists" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_failure_during_the_run_leaves_no_partial_directory(llama_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    from sparse_expansion.io import model_dir

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_dir.json, "dumps", explode)
    out = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        main(["prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--sparsity", "0.5",
              "--out", str(out), *SMALL])
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_expand_eval_generate_and_compare(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "expanded"
    code, stdout, err = run_cli(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "3",
                                 "--pca-reduction", "8", "--sparsity", "0.5", "--out", str(out), "--eval", *SMALL],
                                capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "sparse-expansion" and manifest["experts"] == 3
    assert all(len(layer["sparsity"]) == 3 for layer in manifest["layers"].values())
    assert manifest["costs"]["ffn_flops_per_token"] < manifest["costs"]["ffn_dense_flops_per_token"]
    assert sum(sum(r["tokens_per_expert"]) for r in manifest["routers"].values()) == 2 * 2 * 4 * 32
    code, stdout, _ = run_cli(["eval", "--model", str(out), "--data", str(corpus_dir), *SMALL], capsys)
    assert code == 0 and "perplexity" in stdout
    code, stdout, err = run_cli(["generate", "--model", str(out), "--prompt", "The quick brown",
                                 "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    assert stdout.startswith("The quick brown")
    report = tmp_path / "se.json"
    code, stdout, err = run_cli(["compare", "--model", str(llama_dir), "--data", str(corpus_dir), "--methods",
                                 "sparsegpt,sparse-expansion", "--sparsity", "0.5,0.7", "--experts", "1,2",
                                 "--pca-reduction", "8", "--json", str(report), *SMALL], capsys)
    assert code == 0, err
    rows = json.loads(report.read_text())["results"]
    assert [(r["method"], r["sparsity"], r["experts"]) for r in rows] == [
        ("sparsegpt", 0.5, None), ("sparsegpt", 0.7, None),
        ("sparse-expansion", 0.5, 1), ("sparse-expansion", 0.5, 2),
        ("sparse-expansion", 0.7, 1), ("sparse-expansion", 0.7, 2)]
    for row in rows:
        assert row["ffn_flops_per_token"] > 0 and row["stored_bytes"] > 0
    # One expert is SparseGPT: the same perplexity.
    assert rows[2]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--experts", "0"], "--experts must be at least 1"),
    (["--experts", "100000"], "calibration tokens"),
    (["--pca-reduction", "1000"], "leaves no PCA dimensions"),
])
def test_expand_bad_input(extra, message, llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "se"
    code, _, err = run_cli(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--sparsity", "0.5",
                            "--out", str(out), *SMALL, *extra], capsys)
    _assert_clean_failure(code, err, out, message)


def test_loading_a_corrupted_expanded_model_fails_cleanly(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "se"
    assert run_cli(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2",
                    "--pca-reduction", "8", "--sparsity", "0.5", "--out", str(out), *SMALL], capsys)[0] == 0
    weights = out / "model.compressed.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(["eval", "--model", str(out), "--data", str(corpus_dir), *SMALL], capsys)
    _assert_clean_failure(code, err, None, "corrupted or truncated")
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"], capsys)
    _assert_clean_failure(code, err, None, "model path not found")


def test_kernel_bench_reports_a_speedup(tmp_path, capsys):
    out = tmp_path / "kernel.json"
    code, stdout, err = run_cli(["bench", "--kernel", "--rows", "64", "--cols", "128", "--sparsity", "0.9",
                                 "--batch", "4", "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["speedup"] == result["single"]["speedup"] > 0
    assert result["nnz"] == pytest.approx(64 * 128 * 0.1, rel=0.3)
    code, _, err = run_cli(["bench"], capsys)
    _assert_clean_failure(code, err, None, "exactly one of --kernel or --model")


def test_model_bench_against_a_baseline(llama_dir, corpus_dir, tmp_path, capsys):
    expanded = tmp_path / "se"
    assert run_cli(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2",
                    "--pca-reduction", "8", "--sparsity", "0.5", "--out", str(expanded), *SMALL], capsys)[0] == 0
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", "--model", str(expanded), "--baseline", str(llama_dir), "--prompt-tokens",
                                 "16", "--new-tokens", "4", "--repeats", "1", "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["decode_speedup"] > 0 and result["prefill_speedup"] > 0
    assert result["model"]["ffn_flops_per_token"] < result["baseline"]["ffn_flops_per_token"]
    assert result["model"]["disk_bytes"] > 0 and result["baseline"]["disk_bytes"] > 0


def test_generate_with_an_empty_prompt_fails_cleanly(llama_dir, capsys):
    capsys.readouterr()
    code = main(["generate", "--model", str(llama_dir), "--prompt", "  ", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--prompt is empty" in err and len(err.strip().splitlines()) == 1


def test_bench_accepts_quiet(tmp_path, capsys):
    from sparse_expansion.cli import build_parser

    assert build_parser().parse_args(["bench", "--kernel", "--quiet"]).quiet
