"""Neuron entanglement analysis: the statistics against independent computations, the streaming pass against
the model's own outputs, the ablation's pieces, disentanglement, and the `neurons` command."""

import json
import math
import statistics

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import FAMILIES, SMALL, make_model
from sparse_expansion.analysis import mapping_difficulty, top_fraction, wasserstein_to_gaussian
from sparse_expansion.analysis.wasserstein import disjoint_pairs
from sparse_expansion.cli import main

GRID = scipy.stats.norm.ppf((np.arange(400_000) + 0.5) / 400_000)  # a fine standard-normal quantile grid


def _scipy_wd(sample: torch.Tensor) -> float:
    x = sample.double().numpy()
    return scipy.stats.wasserstein_distance((x - x.mean()) / x.std(), GRID)


def _samples():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(3000, generator=g)
    bimodal = torch.cat([torch.randn(1500, generator=g) - 3, torch.randn(1500, generator=g) + 3])
    uniform = torch.rand(3000, generator=g)
    return gaussian, bimodal, uniform


def test_wasserstein_matches_scipy_and_orders_the_shapes():
    gaussian, bimodal, uniform = _samples()
    values = [float(wasserstein_to_gaussian(s)) for s in (gaussian, bimodal, uniform)]
    for value, sample in zip(values, (gaussian, bimodal, uniform)):
        assert value == pytest.approx(_scipy_wd(sample), abs=1e-3)
    assert values[0] < values[2] < values[1]  # Gaussian closest, then uniform, then two separated modes
    assert values[0] < 0.05 and values[1] > 0.25


def test_wasserstein_per_neuron_is_shape_only():
    gaussian, bimodal, uniform = _samples()
    stacked = torch.stack([gaussian, bimodal, uniform], dim=1)
    per_neuron = wasserstein_to_gaussian(stacked)
    assert per_neuron.shape == (3,)
    assert torch.allclose(per_neuron, torch.stack([wasserstein_to_gaussian(c) for c in stacked.t()]))
    # Location and scale are removed by the z-score.
    assert float(wasserstein_to_gaussian(7.5 * bimodal - 2)) == pytest.approx(float(per_neuron[1]), abs=1e-9)
    assert math.isnan(float(wasserstein_to_gaussian(torch.full((10,), 3.0))))


def test_mapping_difficulty_matches_a_direct_transcription():
    inputs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.5, 0.0],
                           [4.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    outputs = torch.tensor([[0.1, 1.0], [0.5, -1.0], [2.0, 0.0], [0.3, 4.0], [1.5, 2.0], [0.0, 0.5], [2.5, 1.0],
                            [1.0, 1.0], [0.7, 0.2], [3.0, -2.0]])
    i, j = disjoint_pairs(len(inputs), seed=3)
    pairs = [(int(a), int(b)) for a, b in zip(i, j)]
    assert len({t for p in pairs for t in p}) == 2 * len(pairs) == len(inputs)  # disjoint, all tokens used
    expected = []
    for neuron in range(outputs.shape[1]):
        kept = [(a, b) for a, b in pairs if math.dist(inputs[a].tolist(), inputs[b].tolist()) > 0]
        n_x = max(math.dist(inputs[a].tolist(), inputs[b].tolist()) for a, b in kept)
        n_y = statistics.median(abs(float(outputs[a, neuron]) - float(outputs[b, neuron])) for a, b in kept)
        ratios = [(abs(float(outputs[a, neuron]) - float(outputs[b, neuron])) / n_y)
                  / (math.dist(inputs[a].tolist(), inputs[b].tolist()) / n_x) for a, b in kept]
        expected.append(sum(ratios) / len(ratios))
    got = mapping_difficulty(inputs, outputs, seed=3)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(mapping_difficulty(inputs, outputs[:, 1], seed=3)) == pytest.approx(expected[1], rel=1e-12)


def test_mapping_difficulty_skips_pairs_with_identical_inputs():
    inputs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    outputs = torch.tensor([0.0, 5.0, 1.0, 3.0])
    # Every split into pairs: the identical pair (0, 1) must never count (it would divide by zero).
    for seed in range(6):
        assert math.isfinite(float(mapping_difficulty(inputs, outputs, seed=seed)))


def test_top_fraction_counts_and_ties():
    scores = torch.tensor([0.5, float("nan"), 0.9, 0.5, 0.1])
    assert top_fraction(scores, 40).tolist() == [2, 0]
    assert top_fraction(scores, 1).tolist() == [2]  # at least one
    assert top_fraction(scores, 100).tolist()[-1] == 1  # NaN last


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_streamed_neurons_match_the_models_own_outputs(family):
    """The engine's pass measures the very pre-activations the model computes in its own forward."""
    from sparse_expansion.analysis.neurons import analyze_neurons
    from sparse_expansion.models import discover

    model = make_model(family)
    layout = discover(model)
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    own = {}
    handles = []
    for index, block in enumerate(layout.blocks):
        for name in FAMILIES[family][0] + FAMILIES[family][1]:
            module = block.get_submodule(name)
            path = f"{layout.blocks_path}.{index}.{name}"
            handles.append(module.register_forward_hook(
                lambda m, a, o, path=path: own.__setitem__(path, o.detach().reshape(-1, o.shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    measured = {}
    analyze_neurons(model, layout, windows, [0, 1], lambda layer: measured.__setitem__(layer.path, layer),
                    top_percent=10, batch_size=2, progress=False)
    assert set(measured) == set(own)
    for path, layer in measured.items():
        expected = wasserstein_to_gaussian(own[path])
        assert torch.allclose(layer.wd, expected, atol=1e-5), path
        assert torch.allclose(layer.mean, own[path].double().mean(0), atol=1e-5)
        assert layer.wasserstein_neurons.numel() == math.ceil(0.1 * own[path].shape[1])


def test_pruning_only_selected_rows_leaves_the_others_dense():
    from sparse_expansion.models import discover
    from sparse_expansion.pruning import SparsitySpec, get_method, prune_model

    model = make_model("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    layout = discover(model)
    rows = {f"{layout.blocks_path}.{i}.{name}": torch.tensor([1, 5, 7]) for i in range(2)
            for name in FAMILIES["llama"][0] + FAMILIES["llama"][1]}
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    report = prune_model(model, layout, windows, get_method("sparsegpt"), SparsitySpec.create(sparsity=0.9),
                         progress=False, rows=rows)
    for path in rows:
        weight, before = model.get_submodule(path).weight, dense[path + ".weight"]
        others = torch.ones(weight.shape[0], dtype=torch.bool)
        others[[1, 5, 7]] = False
        assert torch.equal(weight[others], before[others])
        assert float((weight[[1, 5, 7]] == 0).double().mean()) == pytest.approx(0.9, abs=0.01)
        assert report.layers[path]["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_zeroing_negative_preactivations_touches_only_the_selected_neurons():
    from sparse_expansion.analysis.ablation import zero_negative_preactivations

    model = make_model("llama")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    path = "model.layers.0.mlp.gate_proj"
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: seen.__setitem__("in", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
        expected = torch.nn.functional.linear(seen["in"], model.get_submodule(path).weight)
        expected[..., [3, 9]] = expected[..., [3, 9]].clamp_min(0)
        with zero_negative_preactivations(model, {path: torch.tensor([3, 9])}) as hooked:
            got = model.get_submodule(path)(seen["in"])
    handle.remove()
    assert hooked == 1
    assert torch.equal(got, expected)
    assert bool((expected[..., [3, 9]] >= 0).all()) and bool((expected < 0).any())


def test_clusters_that_separate_modes_disentangle_a_neuron():
    """A neuron whose output is bimodal because its inputs come from two clusters: a router that splits the
    clusters leaves a near-Gaussian output in each, so the weighted WD falls; one expert changes nothing."""
    from sparse_expansion.analysis.disentangle import layer_disentanglement
    from sparse_expansion.layers import Router

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(400, 2, generator=g) + torch.tensor([6.0, 0.0]),
                   torch.randn(400, 2, generator=g) - torch.tensor([6.0, 0.0])])
    layer = torch.nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.bias.zero_()
    two = Router(2, None, 2)
    two.centroids.copy_(torch.tensor([[6.0, 0.0], [-6.0, 0.0]]))
    result = layer_disentanglement(layer, two, x, top_percent=34)
    assert result["cluster_sizes"] == [400, 400]
    assert float(result["wd_dense"][0]) > 0.3 and float(result["wd_weighted"][0]) < 0.1
    assert int(result["wasserstein_neurons"][0]) == 0
    one = Router(2, None, 1)
    same = layer_disentanglement(layer, one, x, top_percent=34)
    assert torch.allclose(same["wd_weighted"], same["wd_dense"])
    assert torch.allclose(same["md_weighted"], same["md_dense"])


def test_neurons_command_writes_the_analysis(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "neurons"
    assert main(["neurons", "--model", str(llama_dir), "--data", str(corpus_dir), "--out", str(out),
                 "--top-percent", "5", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["blocks"] == [0, 1] and len(summary["layers"]) == 6
    environment = summary["environment"]  # what moves the figures' rounding, as compare's reports record it
    assert environment["threads"] == torch.get_num_threads() and environment["dtype"] == "float32"
    assert environment["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (out / "summary.png").is_file()
    layer = json.loads((out / "layers" / "001.mlp.up_proj.json").read_text())
    assert len(layer["wasserstein_neurons"]) == math.ceil(0.05 * 128)
    lines = (out / "layers" / "001.mlp.up_proj.csv").read_text().splitlines()
    assert lines[0].startswith("neuron,wd,mapping_difficulty") and len(lines) == 129
    wd = [float(line.split(",")[1]) for line in lines[1:]]
    assert max(wd) == pytest.approx(layer["wd"]["max"], rel=1e-5)
    assert (out / "layers" / "001.mlp.up_proj.png").is_file()


def test_neurons_ablation_and_disentanglement(llama_dir, corpus_dir, tmp_path, capsys):
    expanded = tmp_path / "expanded"
    assert main(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2", "--sparsity",
                 "0.5", "--out", str(expanded), *SMALL]) == 0
    out = tmp_path / "neurons"
    assert main(["neurons", "--model", str(llama_dir), "--data", str(corpus_dir), "--out", str(out), "--layers", "1",
                 "--ablate", "--ablate-sparsity", "0.9", "--expanded", str(expanded), "--sweep-experts", "1,2",
                 "--top-percent", "10", *SMALL]) == 0
    ablation = json.loads((out / "ablation.json").read_text())["results"]
    assert ablation[0]["variant"] == "dense"
    variants = {(r["criterion"], r["variant"]) for r in ablation[1:]}
    assert len(variants) == 10  # 5 criteria x (SparseGPT on the rows, negative pre-activations)
    wd_row = next(r for r in ablation if r["criterion"] == "wasserstein" and r["variant"] == "sparsegpt-rows")
    assert wd_row["overlap_with_wasserstein"] == 1.0
    assert wd_row["measured_row_sparsity"] == pytest.approx(0.9, abs=0.02)
    assert (out / "ablation.md").is_file() and (out / "ablation.png").is_file()
    result = json.loads((out / "disentanglement.json").read_text())
    assert [layer["block"] for layer in result["layers"]] == [1, 1, 1]
    assert 0 <= result["wd_all_neurons"]["fraction_lower"] <= 1
    assert set(result["expert_sweep"]["w1_to_dense"]) == {"1", "2"}
    assert (out / "disentanglement" / "expert_sweep.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--layers", "7"], "--layers 7 is out of range"),
    (["--top-percent", "0"], "--top-percent must be in (0, 100]"),
    (["--top-percent", "101"], "--top-percent must be in (0, 100]"),
    (["--ablate", "--ablate-sparsity", "1.0"], "--ablate-sparsity must be in [0, 1)"),
    (["--expanded", "MODEL"], "not a Sparse Expansion model directory"),
])
def test_neurons_bad_input(extra, message, llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "out"
    extra = [str(llama_dir) if item == "MODEL" else item for item in extra]
    capsys.readouterr()
    code = main(["neurons", "--model", str(llama_dir), "--data", str(corpus_dir), "--out", str(out), *extra, *SMALL])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gaussian_floor_shrinks_with_the_sample():
    """Gaussian outputs still show a WD at finite token counts; the floor the report draws falls like 1/sqrt(n)."""
    from sparse_expansion.analysis.disentangle import gaussian_floor

    small, large = gaussian_floor([256]), gaussian_floor([4096])
    assert 0.03 < small < 0.07 and 0.008 < large < 0.018
    assert small / large == pytest.approx(4.0, rel=0.25)
    assert gaussian_floor([256, 4096]) == pytest.approx((256 * small + 4096 * large) / 4352, rel=1e-9)
