"""Activation sparsity: CETT against a direct computation, thresholds, counting what is applied, the command."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SMALL, make_model
from sparse_expansion.activation import cett, threshold_for_cett
from sparse_expansion.cli import main


def _direct_cett(x, w, t):
    """Transcription of the definition: per token, drop the neurons with |x_i|·||W[:, i]|| < t, then
    ||W x_dropped|| / ||W x||; mean over tokens."""
    rows, cols = len(w), len(w[0])
    norms = [math.sqrt(sum(w[r][i] ** 2 for r in range(rows))) for i in range(cols)]
    values = []
    for token in x:
        full = [sum(w[r][i] * token[i] for i in range(cols)) for r in range(rows)]
        tail = [sum(w[r][i] * token[i] for i in range(cols) if abs(token[i]) * norms[i] < t) for r in range(rows)]
        values.append(math.sqrt(sum(v * v for v in tail)) / math.sqrt(sum(v * v for v in full)))
    return sum(values) / len(values)


def test_cett_matches_a_direct_computation():
    x = [[0.5, -2.0, 0.1, 1.0], [3.0, 0.2, -0.4, 0.0], [-1.0, 1.0, 1.0, 0.3]]
    w = [[1.0, 0.5, -2.0, 0.0], [0.0, 1.0, 1.0, 3.0]]
    for t in (0.0, 0.3, 1.0, 2.5, 10.0):
        assert cett(torch.tensor(x), torch.tensor(w), t) == pytest.approx(_direct_cett(x, w, t), rel=1e-6)


def test_threshold_search_stays_within_the_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g) * torch.rand(32, generator=g)
    w = torch.randn(16, 32, generator=g)
    previous = -1.0
    for target in (0.0, 0.05, 0.2, 0.5):
        t = threshold_for_cett(x, w, target)
        assert cett(x, w, t) <= target + 1e-9
        assert t >= previous  # a larger error budget never lowers the threshold
        previous = t
    # The search is not just feasible but tight: slightly above the threshold the CETT exceeds a target that binds.
    t = threshold_for_cett(x, w, 0.2, candidates=100_000)
    assert cett(x, w, t * 1.02) > 0.2 - 0.01


def test_one_search_answers_many_targets_as_fresh_searches_do():
    """The remembered grid CETTs (ThresholdSearch) give each target exactly what a search of its own gives."""
    from sparse_expansion.activation.cett import ThresholdSearch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 48, generator=g) * torch.rand(48, generator=g)
    w = torch.randn(24, 48, generator=g)
    search = ThresholdSearch(x, w, candidates=512)
    targets = (0.3, 0.01, 0.2, 0.2001, 0.05, 0.5, 0.0)
    assert [search.threshold(t) for t in targets] == [threshold_for_cett(x, w, t, candidates=512) for t in targets]
    assert len(search._cett) < len(targets) * 9  # 9 = log2(512) grid CETTs per fresh search: the work is shared


def _counted_against_independent_hooks(model, activations, windows):
    """Apply the thresholds of CETT 0.2 and run the model; a second hook at every down projection counts the
    non-zero inputs it receives. Returns the counter and those independent ratios (already checked equal)."""
    from sparse_expansion.activation.thresholds import layer_thresholds, neuron_thresholds, thresholded

    per_neuron = neuron_thresholds(activations, layer_thresholds(activations, 0.2))
    seen = {}
    with thresholded(model, per_neuron) as counter:
        handles = [model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, p=p: seen.setdefault(p, []).append(a[0].detach().clone())) for p in per_neuron]
        with torch.no_grad():
            model(input_ids=windows)
        for handle in handles:
            handle.remove()
    ratios = {p: float((torch.cat(v) != 0).double().mean()) for p, v in seen.items()}
    assert counter.ratios() == pytest.approx(ratios, rel=1e-12)
    return counter, ratios


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_applied_thresholds_are_what_is_counted(family):
    """The activation ratio the counter reports equals the non-zero fraction an independent hook sees at the
    input of every down projection (gated and non-gated MLPs, GPT-2's Conv1D included)."""
    from conftest import FAMILIES
    from sparse_expansion.activation.thresholds import collect_intermediate
    from sparse_expansion.models import discover

    model = make_model(family)
    layout = discover(model)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    activations = collect_intermediate(model, layout, windows, progress=False)
    assert set(activations.inputs) == {f"{layout.blocks_path}.{i}.{FAMILIES[family][1][0]}" for i in range(2)}
    counter, ratios = _counted_against_independent_hooks(model, activations, windows)
    assert counter.ratio() == pytest.approx(sum(ratios.values()) / 2, rel=1e-12)
    assert 0.05 < counter.ratio() < 0.999  # something was dropped, not everything


def test_activations_command(llama_dir, corpus_dir, tokenizer, tmp_path, capsys):
    out = tmp_path / "act.json"
    # A small budget: on the random tiny model a larger one drops nearly every input, and the check below would
    # hardly notice other thresholds.
    assert main(["activations", "--model", str(llama_dir), "--data", str(corpus_dir), "--ppl-increase", "0.002",
                 "--json", str(out), "--baselines", *SMALL]) == 0
    result = json.loads(out.read_text())
    for key in ("dense_ppl", "sparse_ppl", "activation_ratio", "cett"):
        assert key in result
    curves = result["curves"]
    assert set(curves) == {"CETT", "top-k", "FAT-epsilon", "exact zeros"}
    # A constant top-k keeps exactly k of the 128 intermediate neurons (ties aside) at every token.
    for point in curves["top-k"]:
        assert point["activation_ratio"] == pytest.approx(round(point["k_ratio"] * 128) / 128, abs=0.01)
    assert curves["exact zeros"][0]["activation_ratio"] == pytest.approx(1.0)  # SiLU: no exact zeros
    assert (tmp_path / "act.png").is_file()
    ratios = [layer["activation_ratio"] for layer in result["layers"]]
    assert result["activation_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    # Both perplexities again, computed here: the JSON's per-layer CETT thresholds t installed by hand on the dense
    # model (a down projection's input i is dropped where |x_i| * ||W[:, i]|| < t), evaluated on the first two
    # 32-token windows of the test text.
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = tokenizer(corpus_dir.joinpath("test.txt").read_text()).input_ids
    windows = torch.tensor(ids[:2 * 32]).reshape(2, 32)
    assert result["dense_ppl"] == pytest.approx(_direct_perplexity(model, windows), rel=1e-5)
    assert [layer["layer"] for layer in result["layers"]] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    kept = {}

    def drop_below(module, args, t, path):
        keep = args[0].abs() * module.weight.detach().norm(dim=0) >= t
        kept[path] = keep.double().mean().item()
        return (args[0] * keep,)

    handles = [model.get_submodule(layer["layer"]).register_forward_pre_hook(
        lambda m, args, t=layer["threshold"], p=layer["layer"]: drop_below(m, args, t, p))
        for layer in result["layers"]]
    assert result["sparse_ppl"] == pytest.approx(_direct_perplexity(model, windows), rel=1e-4)
    for handle in handles:
        handle.remove()
    assert result["sparse_ppl"] > result["dense_ppl"] * 1.001  # the thresholds dropped something that mattered
    # The ratios were measured on the evaluation windows too: the fraction of inputs the hooks kept.
    for layer in result["layers"]:
        assert 0 < layer["activation_ratio"] == pytest.approx(kept[layer["layer"]], abs=1e-6)


def _direct_perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of every next token, from the model's own logits."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), dim=-1)
    nll = -logprobs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


@pytest.mark.parametrize("value", ["0", "-0.1"])
def test_activations_bad_increase(value, llama_dir, corpus_dir, tmp_path, capsys):
    capsys.readouterr()
    code = main(["activations", "--model", str(llama_dir), "--data", str(corpus_dir), "--ppl-increase", value,
                 "--json", str(tmp_path / "x.json"), *SMALL])
    err = capsys.readouterr().err
    assert code != 0 and "--ppl-increase must be positive" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("pruned", [False, True])
def test_thresholded_layer_equals_masking_then_dense_and_its_kernel_agrees(pruned):
    from sparse_expansion.kernels import native
    from sparse_expansion.layers import ThresholdedLinear
    from sparse_expansion.layers.protocol import AccelerateContext, kind_of
    from sparse_expansion.layers.switch import SwitchCache

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    if pruned:  # a pruned down projection: the kernel reads W^T as CSR
        with torch.no_grad():
            linear.weight.masked_fill_(torch.rand(40, 96) < 0.7, 0)
    thresholds = torch.rand(96) * 1.5
    layer = ThresholdedLinear(linear, thresholds, 0.4)
    x = torch.randn(3, 7, 96)
    masked = torch.where(x.abs() >= thresholds, x, torch.zeros_like(x))
    with torch.no_grad():
        expected = torch.nn.functional.linear(masked, linear.weight, linear.bias)
        assert torch.equal(layer(x), expected)
        if not native.available():
            pytest.skip("no C compiler: the kernel is not built")
        kind_of(layer).accelerate(layer, AccelerateContext(mode="always", switches=SwitchCache(), cpu_kernels=True))
        assert layer.kernel.sparse == pruned
        for tokens in (1, 5, 21):
            flat = x.reshape(-1, 96)[:tokens]
            assert torch.allclose(layer(flat), expected.reshape(-1, 40)[:tokens], atol=1e-5)
        active = (x.reshape(-1, 96)[:21].abs() >= thresholds).sum(1)
        assert torch.equal(layer.kernel.last_active, active)


def test_saved_thresholds_reload_and_run_sparse(llama_dir, corpus_dir, tmp_path, capsys):
    from sparse_expansion.layers import ThresholdedLinear
    from sparse_expansion.models import discover, ffn_costs, load_model

    out = tmp_path / "thresholded"
    assert main(["activations", "--model", str(llama_dir), "--data", str(corpus_dir), "--ppl-increase", "0.05",
                 "--out", str(out), "--json", str(tmp_path / "a.json"), *SMALL]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    loaded = load_model(str(out))
    layers = [m for m in loaded.model.modules() if isinstance(m, ThresholdedLinear)]
    assert len(layers) == 2
    for layer, record in zip(layers, result["layers"]):
        assert float(layer.activation_ratio) == pytest.approx(record["activation_ratio"])
    # The saved model evaluates to the perplexity the search reported with the same thresholds applied.
    assert main(["eval", "--model", str(out), "--data", str(corpus_dir), "--json", str(tmp_path / "e.json"),
                 *SMALL]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["ppl"] == pytest.approx(result["sparse_ppl"], rel=1e-5)
    # Costs: the down projections count only the expected active inputs.
    costs = ffn_costs(loaded.model, discover(loaded.model))
    assert costs["ffn_flops_per_token"] < costs["ffn_dense_flops_per_token"]
    assert costs["ffn_dense_flops_per_token"] - costs["ffn_flops_per_token"] == pytest.approx(
        sum(2 * 64 * 128 * (1 - float(layer.activation_ratio)) for layer in layers), rel=1e-6)


@pytest.mark.slow  # timed: seconds per candidate product, by design
def test_activation_kernel_bench_runs_and_checks_its_product(tmp_path, capsys):
    from sparse_expansion.kernels import native

    if not native.available():
        pytest.skip("no C compiler: the kernel is not built")
    out = tmp_path / "bench.json"
    assert main(["bench", "--kernel", "--activation-sparsity", "0.9", "--rows", "64", "--cols", "256", "--batch", "4",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["single"]["rows_read"] == pytest.approx(0.1 * 256, abs=20)
    assert result["single"]["kernel_limit_ms"] < result["single"]["dense_limit_ms"]


def test_thresholds_on_a_model_of_another_shape_are_refused(llama_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "thresholded"
    assert main(["activations", "--model", str(llama_dir), "--data", str(corpus_dir), "--ppl-increase", "0.05",
                 "--out", str(out), *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = 96  # the saved thresholds and weights are for 128 intermediate neurons
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    code = main(["eval", "--model", str(out), "--data", str(corpus_dir), *SMALL])
    err = capsys.readouterr().err
    assert code != 0 and "does not match" in err and len(err.strip().splitlines()) == 1


def test_activations_without_blocks_fails_cleanly(model_dir_factory, corpus_dir, tmp_path, capsys):
    empty = model_dir_factory("llama", num_hidden_layers=0)
    capsys.readouterr()
    code = main(["activations", "--model", str(empty), "--data", str(corpus_dir), "--json", str(tmp_path / "a.json"),
                 *SMALL])
    err = capsys.readouterr().err
    assert code != 0 and "no decoder blocks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.json").exists()


def test_expanded_models_use_each_tokens_expert():
    """CETT of an expert layer equals the definition applied token by token with the token's expert weight, and
    thresholds apply per expert on an expanded model (the counter matches an independent count)."""
    from sparse_expansion.activation.thresholds import collect_intermediate
    from sparse_expansion.expansion import ExpansionConfig, expand_model
    from sparse_expansion.models import discover
    from sparse_expansion.pruning import SparsitySpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    w = torch.randn(2, 3, 4, generator=g)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    per_token = sum(_direct_cett([x[t].tolist()], w[labels[t]].tolist(), 0.8) for t in range(6)) / 6
    assert cett(x, w, 0.8, labels=labels) == pytest.approx(per_token, rel=1e-6)

    model = make_model("llama")
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    expand_model(model, discover(model), windows, SparsitySpec.create(sparsity=0.5), ExpansionConfig(experts=2),
                 progress=False)
    activations = collect_intermediate(model, discover(model), windows, progress=False)
    assert all(w.dim() == 3 for w in activations.weights.values())
    assert set(activations.labels) == set(activations.inputs)
    counter, ratios = _counted_against_independent_hooks(model, activations, windows)
    assert 0.05 < counter.ratio() < 0.999
