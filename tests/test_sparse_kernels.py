"""The CPU sparse kernels: same outputs as the dense products, measured switch, model-level wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import generate_from_both_formats, make_model, random_windows
from sparse_expansion.expansion import ExpansionConfig, ExpertLinear, expand_model
from sparse_expansion.inference import accelerate, force_sparse
from sparse_expansion.kernels import native
from sparse_expansion.layers.sparse_linear import CSRWeight, SparseLinear, SwitchCache, apply_switch
from sparse_expansion.models import discover
from sparse_expansion.pruning import SparsitySpec, get_method, prune_model

ALWAYS_SPARSE = [(2 ** 20, True)]


def assert_fp32_close(got, x, weight, bias=None):
    """Within fp32 rounding of the exact (float64) product: a few ulps of sum |w||x| per output."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    scale = F.linear(x.double().abs(), weight.double().abs()) + (0 if bias is None else bias.double().abs())
    error = (got.double() - exact).abs()
    assert bool((error <= 1e-6 * scale + 1e-7).all()), float((error / (scale + 1e-30)).max())


def sparse_matrix(rows, cols, sparsity, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    return weight.masked_fill(torch.rand(rows, cols, generator=generator) < sparsity, 0)


def test_kernels_build_on_this_machine():
    # CI machines have a C compiler: the kernels must really be there, not silently skipped.
    assert native.available(), native.unavailable_reason()


@pytest.mark.parametrize("rows,cols", [(37, 29), (64, 40000), (8, 70000)])
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_csr_product_equals_dense(rows, cols, tokens, with_bias):
    weight = sparse_matrix(rows, cols, 0.7)
    if cols > 32768:  # column indices past int16's range exercise the unsigned 16-bit and 32-bit variants
        weight[:, -1] = 1.5
    csr = CSRWeight(weight)
    assert csr.suffix == ("u16" if cols <= 65536 else "i32")
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(rows) if with_bias else None
    assert_fp32_close(csr.matmul(x, bias), x, weight, bias)


def test_empty_rows_and_an_all_zero_matrix():
    weight = sparse_matrix(20, 50, 0.5)
    weight[3] = 0
    weight[19] = 0
    x = torch.randn(5, 50)
    torch.testing.assert_close(CSRWeight(weight).matmul(x), F.linear(x, weight))
    zero = CSRWeight(torch.zeros(4, 9))
    assert zero.nnz == 0
    assert torch.equal(zero.matmul(torch.randn(2, 9)), torch.zeros(2, 4))


def test_switch_takes_the_decision_measured_for_the_next_size_up():
    csr = CSRWeight(sparse_matrix(8, 8, 0.5))
    assert not csr.use_sparse(1)  # nothing measured: dense
    csr.switch = [(1, True), (2, True), (4, False), (8, True)]
    assert [csr.use_sparse(n) for n in (1, 2, 3, 4, 5, 8, 9, 1000)] == [True, True, False, False, True, True, True,
                                                                       True]


def test_switch_measurement_is_shared_by_layers_of_one_shape_and_density():
    cache = SwitchCache(batch_sizes=(1, 4), repeats=1)
    a, b = sparse_matrix(30, 20, 0.6, seed=0), sparse_matrix(30, 20, 0.6, seed=0)
    csr_a, csr_b = CSRWeight(a), CSRWeight(b)
    apply_switch(cache, csr_a, a)
    apply_switch(cache, csr_b, b)
    assert len(cache.measured) == 1
    assert [t for t, _ in csr_a.switch] == [1, 4] and csr_a.switch == csr_b.switch


def test_sparse_linear_matches_its_dense_layer_and_falls_back():
    linear = torch.nn.Linear(48, 24)
    with torch.no_grad():
        linear.weight.copy_(sparse_matrix(24, 48, 0.8))
    layer = SparseLinear(linear, CSRWeight(linear.weight))
    layer.kernel.switch = ALWAYS_SPARSE
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x))
        layer.kernel.switch = [(2 ** 20, False)]
        assert torch.equal(layer(x), linear(x))  # the dense fallback is the very same product
    # With gradients enabled the layer must stay differentiable: dense path.
    layer.kernel.switch = ALWAYS_SPARSE
    y = layer(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_pruned_model_logits_match_with_kernels(family):
    model = make_model(family)
    prune_model(model, discover(model), random_windows(4, high=320), get_method("sparsegpt"), SparsitySpec(0.7),
                progress=False)
    x = random_windows(2, 20, seed=3, high=320)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        report = accelerate(model, cache=SwitchCache(batch_sizes=(1, 2), repeats=1))
        force_sparse(model)
        got = model(input_ids=x).logits
        one_token = model(input_ids=x[:1, :1]).logits
    layout = discover(model)
    assert report["available"] and report["layers"] == len(layout.select("ffn")) * len(layout.blocks)
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one_token, expected[:1, :1], rtol=1e-4, atol=1e-4)


def test_expanded_model_logits_match_with_kernels():
    model = make_model("llama")
    expand_model(model, discover(model), random_windows(6, high=320), SparsitySpec(0.7),
                 ExpansionConfig(experts=3, pca_reduction=8), progress=False)
    x = random_windows(2, 20, seed=4, high=320)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        expected_one = model(input_ids=x[:1, :1]).logits
        report = accelerate(model, cache=SwitchCache(batch_sizes=(1,), repeats=1))
        force_sparse(model)
        got = model(input_ids=x).logits
        got_one = model(input_ids=x[:1, :1]).logits
    experts = sum(m.experts for m in model.modules() if isinstance(m, ExpertLinear))
    assert report["experts"] == experts > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_one, expected_one, rtol=1e-4, atol=1e-4)


def test_dense_layers_and_kernels_off_leave_the_model_alone(monkeypatch):
    model = make_model("llama")  # dense: nothing to switch
    report = accelerate(model, cache=SwitchCache(batch_sizes=(1,), repeats=1))
    assert report["layers"] == 0 and not any(isinstance(m, SparseLinear) for m in model.modules())
    pruned = make_model("llama")
    prune_model(pruned, discover(pruned), random_windows(4, high=320), get_method("magnitude"), SparsitySpec(0.7),
                progress=False)
    assert accelerate(pruned, mode="off")["layers"] == 0
    monkeypatch.setenv(native.DISABLE_ENV, "off")
    native._load.cache_clear()
    try:
        report = accelerate(pruned)
        assert not report["available"] and "SPARSE_EXPANSION_KERNELS" in report["reason"]
        assert not any(isinstance(m, SparseLinear) for m in pruned.modules())
    finally:
        monkeypatch.delenv(native.DISABLE_ENV)
        native._load.cache_clear()


def test_generate_from_compressed_equals_dense_checkpoint(llama_dir, corpus_dir, tmp_path, capsys):
    prune = ["--model", str(llama_dir), "--method", "sparsegpt", "--sparsity", "0.7", "--calib-samples", "4",
             "--seqlen", "32", "--data", str(corpus_dir), "--quiet"]
    # "always" runs every pruned layer through the sparse kernel, whatever the measured switch says.
    texts = generate_from_both_formats(tmp_path, capsys, prune, "The quick brown", 12, kernels="always")
    assert (tmp_path / "compressed" / "model.compressed.safetensors").is_file()
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    assert texts["compressed"] == texts["dense"] and texts["dense"].strip()


def test_a_failing_compiler_leaves_the_kernels_off_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # exists on every POSIX machine and always fails
    monkeypatch.setenv("SPARSE_EXPANSION_CACHE", str(tmp_path))  # no cached library to fall back on
    native._load.cache_clear()
    try:
        assert not native.available()
        assert "false failed" in native.unavailable_reason()
        assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left behind
        with pytest.raises(RuntimeError, match="sparse kernels unavailable"):
            native.library()
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    assert native.available()
