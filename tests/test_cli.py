"""The command-line interface end to end on a tiny local model and corpus, and its errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparse_expansion
from conftest import run_cli, small_args
from sparse_expansion.cli import main

# Three evaluation windows: a count the checks below tell apart from the calibration windows.
SMALL = small_args(eval_samples=3)


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


@pytest.mark.slow  # a Python process of its own
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
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert [(r["method"], r["sparsity"], r["experts"]) for r in rows] == [
        ("sparsegpt", 0.5, None), ("sparsegpt", 0.7, None),
        ("sparse-expansion", 0.5, 1), ("sparse-expansion", 0.5, 2),
        ("sparse-expansion", 0.7, 1), ("sparse-expansion", 0.7, 2)]
    # SparseGPT keeps (1 - sparsity) of the 2 blocks x 3 FFN linears of 64 x 128 weights: 2 FLOPs per weight kept.
    for row in rows[:2]:
        assert row["ffn_flops_per_token"] == pytest.approx((1 - row["sparsity"]) * 2 * 3 * 2 * 64 * 128, rel=0.01)
    for lower, higher in ((rows[2], rows[4]), (rows[3], rows[5])):  # 0.5 against 0.7
        assert higher["ffn_flops_per_token"] < lower["ffn_flops_per_token"]
    # Stored bytes: a pruned model keeps its dense tensors in memory; a second expert adds one more copy of every
    # FFN weight (2 x 3 x 64 x 128 floats) and a little router.
    tensors = {t.data_ptr(): t for t in [*dense.parameters(), *dense.buffers()]}.values()
    assert rows[0]["stored_bytes"] == rows[1]["stored_bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    for one, two in ((rows[2], rows[3]), (rows[4], rows[5])):
        assert two["stored_bytes"] - one["stored_bytes"] == pytest.approx(2 * 3 * 64 * 128 * 4, rel=0.01)
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


@pytest.fixture(scope="module")
def expanded_dir(llama_dir, corpus_dir, tmp_path_factory):
    """Two experts at 50% sparsity (PCA to 8 dimensions), built once for the tests that read or copy it."""
    out = tmp_path_factory.mktemp("expanded") / "se"
    assert main(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2",
                 "--pca-reduction", "8", "--sparsity", "0.5", "--out", str(out), *SMALL]) == 0
    return out


def test_loading_a_corrupted_expanded_model_fails_cleanly(expanded_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "se"
    shutil.copytree(expanded_dir, out)
    weights = out / "model.compressed.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(["eval", "--model", str(out), "--data", str(corpus_dir), *SMALL], capsys)
    _assert_clean_failure(code, err, None, "corrupted or truncated")
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"], capsys)
    _assert_clean_failure(code, err, None, "model path not found")


def _own_ms(fn, *args) -> float:
    """Median milliseconds per call by torch.utils.benchmark, on as many threads as the bench runs."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.2).median * 1e3


def _same_magnitude(reported: float, measured: float) -> bool:
    return 0.1 < reported / measured < 10


@pytest.mark.slow  # timed: seconds per candidate product, by design
def test_kernel_bench_reports_a_speedup(tmp_path, capsys):
    import scipy.sparse

    out = tmp_path / "kernel.json"
    code, stdout, err = run_cli(["bench", "--kernel", "--rows", "64", "--cols", "128", "--sparsity", "0.9",
                                 "--batch", "4", "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["nnz"] == pytest.approx(64 * 128 * 0.1, rel=0.3)
    assert result["kernel_available"]
    # The read bandwidth in GB/s: within an order of magnitude of a sum over 256 MiB timed here.
    buffer = torch.ones(64 * 2 ** 20)
    assert _same_magnitude(result["bandwidth_gbs"], buffer.numel() * 4 / _own_ms(buffer.sum) / 1e6)
    del buffer
    # Each speedup is the ratio of the two times the bench reports next to it.
    assert result["speedup"] == result["single"]["speedup"]
    assert result["kernel_speedup"] == result["single"]["kernel_speedup"]
    for label, tokens in (("single", 1), ("batched", 4)):
        timings = result[label]
        assert timings["speedup"] == pytest.approx(timings["dense_layer_ms"] / timings["layer_ms"], rel=1e-9)
        for name in ("kernel", "scipy_csr", "torch_csr"):
            assert timings[f"{name}_speedup"] == pytest.approx(timings["dense_ms"] / timings[f"{name}_ms"], rel=1e-9)
        # Bytes a product moves: the float32 weight, input and output; the CSR form less at 90% sparsity.
        assert timings["dense_bytes"] == 4 * (64 * 128 + tokens * (64 + 128))
        assert timings["csr_bytes"] < timings["dense_bytes"]
        # The times are milliseconds per product: within an order of magnitude of this test's own timing of the
        # dense and the scipy CSR product on the same shapes (what a unit or per-call slip would miss by 1000).
        weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
        x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(2))
        assert _same_magnitude(timings["dense_ms"], _own_ms(torch.nn.functional.linear, x, weight)), timings
        csr = scipy.sparse.random(64, 128, density=0.1, format="csr", dtype="float32", random_state=0)
        xn = x.t().contiguous().numpy()
        assert _same_magnitude(timings["scipy_csr_ms"], _own_ms(csr.dot, xn)), timings
    code, _, err = run_cli(["bench"], capsys)
    _assert_clean_failure(code, err, None, "exactly one of --kernel or --model")


def _own_tokens_per_s(model, ids: torch.Tensor, new_tokens: int, repeats: int = 5) -> tuple[float, float]:
    """Prefill (one pass over the prompt, no cache) and greedy cached decode speed, timed here: median of runs."""
    import statistics
    import time

    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=False)
            prefill.append(time.perf_counter() - start)
            out = model(input_ids=ids, use_cache=True)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                            use_cache=True)
            decode.append(time.perf_counter() - start)
    return ids.shape[1] / statistics.median(prefill), new_tokens / statistics.median(decode)


@pytest.mark.slow  # timed: repeated prefill and decode runs of two models, by design
def test_model_bench_against_a_baseline(llama_dir, expanded_dir, tmp_path, capsys):
    expanded = expanded_dir
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", "--model", str(expanded), "--baseline", str(llama_dir), "--prompt-tokens",
                                 "32", "--new-tokens", "32", "--repeats", "3", "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    for kind in ("prefill", "decode"):
        assert result[f"{kind}_speedup"] == pytest.approx(
            result["model"][f"{kind}_tokens_per_s"] / result["baseline"][f"{kind}_tokens_per_s"], rel=1e-9)
    # Tokens per second, within an order of magnitude of this test's own timing of the same models (a figure
    # per pass or per run instead of per token would be 32 times off).
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(5))
    for kind, model in (("baseline", AutoModelForCausalLM.from_pretrained(llama_dir).eval()),
                        ("model", sparse_expansion.load(str(expanded)).model)):
        prefill, decode = _own_tokens_per_s(model, ids, 32)
        assert _same_magnitude(result[kind]["prefill_tokens_per_s"], prefill), (kind, result[kind], prefill)
        assert _same_magnitude(result[kind]["decode_tokens_per_s"], decode), (kind, result[kind], decode)
    assert result["model"]["ffn_flops_per_token"] < result["baseline"]["ffn_flops_per_token"]
    for kind, path in (("model", expanded), ("baseline", llama_dir)):
        assert result[kind]["disk_bytes"] == sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def test_generate_with_an_empty_prompt_fails_cleanly(llama_dir, capsys):
    capsys.readouterr()
    code = main(["generate", "--model", str(llama_dir), "--prompt", "  ", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--prompt is empty" in err and len(err.strip().splitlines()) == 1


def test_bench_accepts_quiet(tmp_path, capsys):
    from sparse_expansion.cli import build_parser

    assert build_parser().parse_args(["bench", "--kernel", "--quiet"]).quiet
