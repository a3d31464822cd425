"""Selective expansion: only the top-scoring rows of each FFN linear become experts, the rest are shared."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import sparse_expansion
from conftest import make_model, random_windows
from sparse_expansion import UsageError
from sparse_expansion.cli import main
from sparse_expansion.expansion import ExpansionConfig, ExpertLinear, SelectiveExpertLinear, expand_model, fit_router
from sparse_expansion.expansion.build import select_rows
from sparse_expansion.inference import accelerate, force_sparse
from sparse_expansion.io.model_dir import MANIFEST_FILE, file_sha256
from sparse_expansion.kernels import native
from sparse_expansion.layers import ROUTERS_ATTR, SwitchCache, kind_of, linear_weight, set_linear_weight
from sparse_expansion.models import discover, ffn_costs
from sparse_expansion.pruning import SparsitySpec
from test_costs import counted_ffn_flops

EXPERTS = 3


def output_variance(path, weight, inputs, bias):
    """A scorer that needs the calibration inputs: each neuron's output variance."""
    return F.linear(inputs, weight, bias).var(0)


def _expand(selective=None, sparsity=0.6, row_scores=output_variance, seed=0):
    model = make_model("llama", seed=seed)
    report = expand_model(model, discover(model), random_windows(), SparsitySpec(sparsity),
                          ExpansionConfig(experts=EXPERTS, pca_reduction=8, selective=selective), progress=False,
                          row_scores=row_scores if selective is not None else None)
    return model, report


def _ffn_layers(model):
    layout = discover(model)
    return {f"{layout.blocks_path}.{i}.{lin.name}": block.get_submodule(lin.name)
            for i, block in enumerate(layout.blocks) for lin in layout.select("ffn")}


def _logits(model, seed=3):
    with torch.no_grad():
        return model(input_ids=random_windows(2, 12, seed=seed)).logits


def test_fraction_one_is_the_full_expansion():
    full, full_report = _expand()
    selective, report = _expand(selective=1.0)
    for (path, expert), layer in zip(_ffn_layers(full).items(), _ffn_layers(selective).values()):
        assert isinstance(expert, ExpertLinear) and isinstance(layer, SelectiveExpertLinear)
        assert layer.shared_rows.numel() == 0 and torch.equal(layer.expert_rows, torch.arange(expert.out_features))
        assert torch.equal(layer.expert_weight, expert.weight)
        assert torch.equal(linear_weight(layer), expert.weight)
        assert report.layers[path]["zeros"] == full_report.layers[path]["zeros"]
        assert report.layers[path]["selected_rows"] == expert.out_features
    assert torch.equal(_logits(selective), _logits(full))


def test_quarter_of_the_rows_are_expanded_and_the_forward_is_exact():
    calls = {}

    def scores(path, weight, inputs, bias):
        calls[path] = (weight.shape, inputs.shape, bias)
        calls[path + ":scores"] = output_variance(path, weight, inputs, bias)
        return calls[path + ":scores"]

    model, report = _expand(selective=0.25, row_scores=scores)
    layout = discover(model)
    for path, layer in _ffn_layers(model).items():
        out_features, in_features = layer.out_features, layer.in_features
        n_sel = math.ceil(0.25 * out_features)
        assert calls[path][0] == (out_features, in_features) and calls[path][1] == (6 * 24, in_features)
        # The top quarter by score, in ascending order; the rest shared; together every row once.
        expected = torch.sort(calls[path + ":scores"], descending=True, stable=True).indices[:n_sel].sort().values
        assert torch.equal(layer.expert_rows, expected)
        assert torch.equal(torch.sort(torch.cat([layer.shared_rows, layer.expert_rows])).values,
                           torch.arange(out_features))
        assert layer.shared_weight.shape == (out_features - n_sel, in_features)
        assert layer.expert_weight.shape == (EXPERTS, n_sel, in_features)
        assert report.layers[path]["selected_rows"] == n_sel
        sparsity = torch.tensor(report.layers[path]["sparsity"])
        assert torch.allclose(sparsity, torch.full_like(sparsity, 0.6), atol=0.02)
        # Stored: the shared rows once, the selected rows once per expert (plus int64 row indices).
        assert layer.shared_weight.numel() + layer.expert_weight.numel() == in_features * (
            out_features - n_sel + EXPERTS * n_sel)
        # Forward against a per-token reference: shared rows from the shared weight, selected rows from the
        # expert the router picks.
        x = torch.randn(2, 7, in_features, generator=torch.Generator().manual_seed(1))
        flat = x.reshape(-1, in_features)
        router = layer.router
        labels = router.assign(flat)
        reference = torch.empty(flat.shape[0], out_features)
        for t, label in enumerate(labels):
            reference[t, layer.shared_rows] = flat[t] @ layer.shared_weight.t()
            reference[t, layer.expert_rows] = flat[t] @ layer.expert_weight[label].t()
        with torch.no_grad():
            torch.testing.assert_close(layer(x).reshape(-1, out_features), reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer(x[:1, :1]).flatten(), reference[0], rtol=1e-5, atol=1e-5)
        block = layout.blocks[int(path.split(".")[2])]
        assert any(router is r for r in getattr(block, ROUTERS_ATTR).values())
    full, _ = _expand()
    assert ffn_costs(model, layout)["stored_bytes"] < ffn_costs(full, discover(full))["stored_bytes"]
    expected_params = sum(m.in_features * (m.out_features - math.ceil(0.25 * m.out_features)
                                           + EXPERTS * math.ceil(0.25 * m.out_features))
                          for m in _ffn_layers(model).values())
    assert ffn_costs(model, layout)["ffn_params_stored"] == expected_params


def test_selective_layer_with_bias_and_its_kind():
    torch.manual_seed(0)
    tokens = torch.randn(200, 8)
    router = fit_router(tokens, experts=3, reduction=None)
    shared_rows, expert_rows = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4])
    layer = SelectiveExpertLinear(router, torch.randn(3, 8), torch.randn(3, 3, 8), shared_rows, expert_rows,
                                  torch.randn(6))
    x = torch.randn(4, 5, 8)
    full = linear_weight(layer)  # (experts, out, in): every expert's whole matrix
    assert full.shape == (3, 6, 8)
    labels = router.assign(x)
    out = layer(x).reshape(-1, 6)
    for t, (token, label) in enumerate(zip(x.reshape(-1, 8), labels)):
        torch.testing.assert_close(out[t], F.linear(token, full[label], layer.bias))
    kind = kind_of(layer)
    assert kind.name == "selective_expert_linear" and kind.linear
    assert kind.bytes_per_token(layer) == 4 * (3 * 8 + 3 * 8 + 6) + 8 * 6  # shared, one expert, bias, indices
    # set_weight takes one matrix for every expert, or a stack whose shared rows agree.
    set_linear_weight(layer, full[1])
    assert torch.equal(linear_weight(layer), full[1].expand(3, 6, 8))
    set_linear_weight(layer, full)
    assert torch.equal(linear_weight(layer), full)
    with pytest.raises(ValueError, match="shared rows"):
        set_linear_weight(layer, torch.randn(3, 6, 8))


def test_row_selection_is_deterministic():
    scores = torch.tensor([1.0, 3.0, float("nan"), 3.0, 2.0, 3.0, 0.0, 1.0, 5.0, 4.0])
    assert select_rows(scores, 0.3, 10, "x").tolist() == [1, 8, 9]  # 0.3 * 10 rows is 3, not 4
    assert select_rows(scores, 0.4, 10, "x").tolist() == [1, 3, 8, 9]  # ties: the lower index
    assert select_rows(scores, 0.01, 10, "x").tolist() == [8]  # at least one row
    assert select_rows(torch.full((4,), float("nan")), 0.5, 4, "x").tolist() == [0, 1]
    with pytest.raises(UsageError, match="expected 10 values"):
        select_rows(scores[:5], 0.5, 10, "x")


@pytest.mark.parametrize("weight_format", ["compressed", "dense"])
@pytest.mark.parametrize("selective", [0.25, 1.0])
def test_save_and_load_round_trip(selective, weight_format, tokenizer, tmp_path):
    model, _ = _expand(selective=selective)
    out = sparse_expansion.save(model, tokenizer, tmp_path / "m", format=weight_format)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for name, digest in manifest["weights"]["sha256"].items():
        assert file_sha256(out / name) == digest
    layers = {k: v for k, v in manifest["custom_layers"].items() if v["kind"] == "selective_expert_linear"}
    assert len(layers) == len(_ffn_layers(model))
    loaded = sparse_expansion.load(out).model
    assert torch.equal(_logits(loaded), _logits(model))
    layout = discover(loaded)
    for (path, original), layer in zip(_ffn_layers(model).items(), _ffn_layers(loaded).values()):
        assert isinstance(layer, SelectiveExpertLinear)
        assert layers[path]["selected_rows"] == original.selected_features
        assert torch.equal(layer.shared_rows, original.shared_rows)
        assert torch.equal(layer.expert_rows, original.expert_rows)
        assert torch.equal(linear_weight(layer), linear_weight(original))
        block = layout.blocks[int(path.split(".")[2])]
        assert any(layer.router is r for r in getattr(block, ROUTERS_ATTR).values())
    if selective < 1:
        full, _ = _expand()
        full_manifest = json.loads((sparse_expansion.save(full, tokenizer, tmp_path / "full", format=weight_format)
                                    / MANIFEST_FILE).read_text())
        assert manifest["weights"]["dense_bytes"] < full_manifest["weights"]["dense_bytes"]
        assert manifest["weights"]["bytes"] < full_manifest["weights"]["bytes"]


@pytest.mark.parametrize("selective", [0.25, 1.0])
def test_reported_ffn_flops_equal_flop_counter(selective):
    model, _ = _expand(selective=selective, sparsity=0.0)
    costs = ffn_costs(model, discover(model))
    assert costs["ffn_flops_per_token"] == counted_ffn_flops(model)
    assert costs["router_flops_per_token"] > 0
    assert costs["ffn_flops_per_token"] > costs["ffn_dense_flops_per_token"]  # dense FFN plus the routers


def test_pruned_flops_count_shared_rows_once_and_one_expert():
    model, _ = _expand(selective=0.25, sparsity=0.5)
    for layer in _ffn_layers(model).values():
        nonzero = int(torch.count_nonzero(layer.shared_weight)) + int(torch.count_nonzero(layer.expert_weight)) / 3
        assert kind_of(layer).flops_per_token(layer) == pytest.approx(2 * nonzero)


@pytest.mark.skipif(not native.available(), reason="native CSR kernels not built")
def test_logits_match_with_the_sparse_kernels():
    model, _ = _expand(selective=0.25, sparsity=0.7)
    x = random_windows(2, 20, seed=4)
    with torch.no_grad():
        expected, expected_one = model(input_ids=x).logits, model(input_ids=x[:1, :1]).logits
        report = accelerate(model, cache=SwitchCache(batch_sizes=(1,), repeats=1))
        force_sparse(model)
        got, got_one = model(input_ids=x).logits, model(input_ids=x[:1, :1]).logits
    layers = _ffn_layers(model).values()
    assert all(layer.shared_kernel is not None for layer in layers)
    assert report["experts"] == sum(1 + layer.experts for layer in layers)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_one, expected_one, rtol=1e-4, atol=1e-4)


def test_workflow_scores_rows_by_wasserstein_distance(monkeypatch):
    from sparse_expansion.analysis.wasserstein import wasserstein_to_gaussian
    from sparse_expansion.workflow import jobs

    generator = torch.Generator().manual_seed(0)
    inputs, weight, bias = (torch.randn(50, 8, generator=generator), torch.randn(6, 8, generator=generator),
                            torch.randn(6, generator=generator))
    weight[2] = 0  # a constant neuron: NaN distance, never expanded
    expected = wasserstein_to_gaussian(inputs @ weight.T + bias)
    assert torch.isnan(expected[2])
    expected[2] = float("-inf")
    scores = jobs.wasserstein_row_scores("x", weight, inputs, bias)
    torch.testing.assert_close(scores, expected)
    monkeypatch.setattr(jobs, "SCORE_CHUNK_ELEMENTS", 50 * 4)  # four neurons at a time: the same scores
    assert torch.equal(jobs.wasserstein_row_scores("x", weight, inputs, bias), scores)


@pytest.mark.parametrize("value", [0, 1.5, -0.25, float("nan")])
def test_bad_fractions_are_refused(value):
    with pytest.raises(UsageError, match=r"share of rows in \(0, 1\]") as error:
        ExpansionConfig(selective=value)
    assert "\n" not in str(error.value)


def test_selective_needs_row_scores():
    model = make_model("llama")
    with pytest.raises(UsageError, match="needs row scores"):
        expand_model(model, discover(model), random_windows(), SparsitySpec(0.5), ExpansionConfig(selective=0.5),
                     progress=False)


@pytest.mark.parametrize("value", ["0", "101", "-5"])
def test_cli_refuses_bad_percentages(value, llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "se"
    code = main(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--sparsity", "0.5",
                 "--selective", value, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code != 0 and len(lines) == 1, err
    assert "--selective must be a share of rows in (0, 100]" in lines[0]
    assert not out.exists()


def test_cli_selective_expansion(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "se"
    code = main(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2",
                 "--pca-reduction", "8", "--sparsity", "0.5", "--selective", "25", "--out", str(out),
                 "--calib-samples", "4", "--seqlen", "32", "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["selective"] == 0.25
    assert all(layer["selected_rows"] == math.ceil(0.25 * layer["shape"][0]) for layer in manifest["layers"].values())
    assert {v["kind"] for v in manifest["custom_layers"].values()} == {"router", "selective_expert_linear"}
    loaded = sparse_expansion.load(out).model
    assert any(isinstance(m, SelectiveExpertLinear) for m in loaded.modules())
