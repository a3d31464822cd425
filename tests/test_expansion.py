"""Sparse Expansion: routers, experts, the expanded layer, the sequential build, save and load."""

import pytest
import torch
import torch.nn.functional as F

import sparse_expansion
from conftest import FAMILIES, make_model, random_windows
from sparse_expansion import UsageError
from sparse_expansion.evaluation import perplexity
from sparse_expansion.expansion import ExpansionConfig, ExpertLinear, expand_model, fit_router
from sparse_expansion.expansion import build as build_module
from sparse_expansion.expansion.fitting import _kmeans_torch
from sparse_expansion.models import discover, linear_weight
from sparse_expansion.pruning import METHODS, PruneOptions, SparsitySpec, prune_model


def clustered_tokens(n=600, d=32, centres=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(centres, d, generator=g)
    labels = torch.randint(centres, (n,), generator=g)
    return means[labels] + torch.randn(n, d, generator=g)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
@pytest.mark.parametrize("reduction", [4, None])
def test_every_token_goes_to_its_nearest_centroid(backend, reduction):
    x = clustered_tokens()
    router = fit_router(x, experts=6, reduction=reduction, restarts=2, seed=0, backend=backend)
    z = (x - router.mean) @ router.projection if reduction else x - router.mean
    expected = torch.cdist(z, router.centroids).argmin(1)
    assert torch.equal(router.assign(x), expected)
    assert router.dim == (32 // reduction if reduction else 32)


def test_router_fit_is_deterministic_and_seeded():
    x = clustered_tokens()
    a = fit_router(x, experts=4, reduction=4, seed=1)
    b = fit_router(x, experts=4, reduction=4, seed=1)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.projection, b.projection)


def test_pca_projection_is_orthonormal_and_ordered():
    x = clustered_tokens(d=16) * torch.linspace(0.1, 3, 16)
    router = fit_router(x, experts=2, reduction=4)
    p = router.projection
    assert torch.allclose(p.t() @ p, torch.eye(4), atol=1e-4)
    variances = router.project(x).var(0)
    assert (variances[:-1] >= variances[1:]).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": 0}, "at least 1"),
    ({"experts": 700}, "calibration tokens"),
    ({"experts": 2, "reduction": 64}, "leaves no PCA dimensions"),
    ({"experts": 2, "init": "kmeans"}, "unknown k-means init 'kmeans'"),
    ({"experts": 2, "max_iter": 0}, "max_iter must be at least 1"),
    ({"experts": 2, "restarts": 0}, "restarts must be at least 1"),
    ({"experts": 2, "tol": -1.0}, "tol must be at least 0"),
])
def test_router_bad_input(kwargs, message):
    with pytest.raises(UsageError, match=message):
        fit_router(clustered_tokens(), **kwargs)


def exact_sq_distances(z, centres):
    """Squared distances computed difference by difference (no matrix-product shortcut)."""
    return torch.cdist(z, centres, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def inertia_of(router, x):
    return exact_sq_distances(router.project(x), router.centroids).min(1).values.sum().item()


@pytest.mark.parametrize("init", ["k-means++", "random"])
@pytest.mark.parametrize("data", ["clustered", "gaussian"])
def test_kmeans_labels_are_the_nearest_fitted_centroids(init, data):
    if data == "clustered":
        z = clustered_tokens(n=2000, d=16, centres=8, seed=4)
    else:
        z = torch.randn(2000, 8, generator=torch.Generator().manual_seed(4))
    centres, labels, inertia = _kmeans_torch(z, 6, restarts=2, seed=0, init=init)
    distances = exact_sq_distances(z, centres)
    assert torch.equal(labels, distances.argmin(1))
    assert inertia == pytest.approx(distances.min(1).values.sum().item(), rel=1e-4)
    # Lloyd converged: every centre is the mean of its tokens.
    for e in range(6):
        assert torch.allclose(centres[e], z[labels == e].mean(0), atol=1e-3)


@pytest.mark.parametrize("experts, reduction", [(12, None), (12, 4), (6, None)])
def test_torch_kmeans_inertia_matches_scikit_learn(experts, reduction):
    x = clustered_tokens(n=3000, d=16, centres=12, seed=7)
    ours = fit_router(x, experts, reduction, restarts=4, seed=0)
    reference = fit_router(x, experts, reduction, restarts=4, seed=0, backend="sklearn")
    assert inertia_of(ours, x) <= 1.02 * inertia_of(reference, x)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_same_seed_gives_identical_centroids(init):
    x = clustered_tokens(n=1000, d=16, centres=8)
    a, b = (fit_router(x, 8, 4, restarts=3, seed=5, init=init) for _ in range(2))
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.projection, b.projection)


def test_random_init_and_few_iterations_still_cluster():
    x = clustered_tokens(n=1500, d=16, centres=5, seed=2)
    reference = inertia_of(fit_router(x, 5, None, restarts=4, seed=0, backend="sklearn"), x)
    random_init = fit_router(x, 5, None, restarts=8, seed=0, init="random")
    assert inertia_of(random_init, x) <= 1.02 * reference
    one_step = fit_router(x, 5, None, seed=0, max_iter=1)
    assert inertia_of(one_step, x) < exact_sq_distances(x, x.mean(0, keepdim=True)).sum().item()


def test_kmeans_with_fewer_distinct_tokens_than_clusters():
    # Seeding runs out of distinct tokens and Lloyd keeps re-seeding empty clusters; both must stay finite.
    z = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]).repeat(20, 1)
    centres, labels, inertia = _kmeans_torch(z, 5, restarts=2, seed=0, max_iter=20)
    assert torch.isfinite(centres).all() and inertia == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(labels, exact_sq_distances(z, centres).argmin(1))


@pytest.mark.parametrize("field, value, message", [
    ("kmeans_iterations", 0, "kmeans_iterations must be at least 1"),
    ("kmeans_init", "farthest", "kmeans_init must be one of k-means.., random, got 'farthest'"),
])
def test_router_settings_are_validated(field, value, message):
    with pytest.raises(UsageError, match=message):
        ExpansionConfig(**{field: value})


def test_expert_linear_routes_each_token_to_one_expert():
    torch.manual_seed(0)
    router = fit_router(clustered_tokens(d=8), experts=3, reduction=None)
    weight = torch.randn(3, 5, 8)
    bias = torch.randn(5)
    layer = ExpertLinear(router, weight, bias)
    x = clustered_tokens(n=20, d=8, seed=3).reshape(4, 5, 8)
    labels = router.assign(x)
    out = layer(x).reshape(-1, 5)
    for t, (token, label) in enumerate(zip(x.reshape(-1, 8), labels)):
        assert torch.allclose(out[t], F.linear(token, weight[label], bias), atol=1e-5)
    single = x[:1, :1]
    assert torch.allclose(layer(single).flatten(), F.linear(single.flatten(), weight[router.assign(single)[0]], bias))


@pytest.mark.parametrize("factorization", ["reference", "fast", None])
def test_one_expert_reproduces_sparsegpt(factorization):
    """One expert is SparseGPT with the same factorization; the experts' default (None) is the fast one, while
    SparseGPT's own default stays the authors' arithmetic."""
    windows = random_windows()
    reference = make_model("llama")
    prune_model(reference, discover(reference), windows, METHODS["sparsegpt"], SparsitySpec(0.6),
                options=PruneOptions(factorization=factorization or "fast"), progress=False)
    expanded = make_model("llama")
    expand_model(expanded, discover(expanded), windows, SparsitySpec(0.6), ExpansionConfig(experts=1),
                 options=PruneOptions(factorization=factorization), progress=False)
    for ref_block, exp_block in zip(reference.model.layers, expanded.model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            ref = getattr(ref_block.mlp, name).weight
            exp = getattr(exp_block.mlp, name)
            assert isinstance(exp, ExpertLinear)
            assert torch.equal(ref == 0, exp.weight[0] == 0), name
            assert torch.equal(ref, exp.weight[0]), name
    test = random_windows(4, 24, seed=9)
    a = perplexity(reference, test, progress=False).ppl
    b = perplexity(expanded, test, progress=False).ppl
    assert abs(a - b) / a < 1e-4


@pytest.mark.parametrize("spec", [SparsitySpec(0.7), SparsitySpec.create(nm="2:4")])
def test_every_expert_has_the_requested_sparsity(spec):
    model = make_model("qwen2")
    layout = discover(model)
    report = expand_model(model, layout, random_windows(8, 32), spec, ExpansionConfig(experts=3, pca_reduction=8,
                                                                                  min_cluster_tokens=1),
                          progress=False)
    assert len(report.layers) == 2 * 3
    for block in layout.blocks:
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = getattr(block.mlp, name).weight  # (experts, out, in)
            assert weight.shape[0] == 3
            if spec.is_nm:
                assert ((weight.reshape(3, weight.shape[1], -1, 4) == 0).sum(-1) == 2).all()
            else:
                out_features, in_features = weight.shape[1:]
                for start in range(0, in_features, 128):
                    end = min(start + 128, in_features)
                    zeros = (weight[:, :, start:end] == 0).flatten(1).sum(1)
                    assert (zeros == int(out_features * (end - start) * 0.7)).all()


def test_an_empty_cluster_falls_back_to_the_layer_hessian(monkeypatch):
    real_fit = build_module.fit_router

    def fit_with_a_far_centroid(*args, **kwargs):
        router = real_fit(*args, **kwargs)
        router.centroids[-1] = 1e6  # no token is ever nearest to it
        return router

    monkeypatch.setattr(build_module, "fit_router", fit_with_a_far_centroid)
    model = make_model("llama")
    layout = discover(model)
    report = expand_model(model, layout, random_windows(), SparsitySpec(0.5),
                          ExpansionConfig(experts=3, min_cluster_tokens=1), progress=False)
    for info in report.routers.values():
        assert info["tokens_per_expert"][-1] == 0
    for info in report.layers.values():
        assert info["fallback_experts"] == [2]
        assert info["sparsity"][2] == pytest.approx(0.5, abs=0.01)
    expert = layout.blocks[0].mlp.up_proj.weight[2]
    assert torch.isfinite(expert).all() and (expert != 0).any()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_can_be_expanded(family):
    model = make_model(family)
    layout = discover(model)
    windows = random_windows(6, 24)
    with torch.no_grad():
        dense_logits = model(input_ids=windows).logits
    expand_model(model, layout, windows, SparsitySpec(0.5), ExpansionConfig(experts=2, pca_reduction=8),
                 progress=False)
    assert sum(isinstance(m, ExpertLinear) for m in model.modules()) == 2 * len(layout.select("ffn"))
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, dense_logits)
    # Discovery still recognises the expanded layers.
    assert {lin.name for lin in discover(model).select("ffn")} == {lin.name for lin in layout.select("ffn")}


@pytest.fixture(scope="module")
def expanded_llama(tokenizer):
    model = make_model("llama")
    report = expand_model(model, discover(model), random_windows(), SparsitySpec(0.5),
                          ExpansionConfig(experts=4, pca_reduction=8), progress=False)
    return model, report


@pytest.mark.parametrize("weight_format", ["auto", "dense"])
def test_save_and_load_give_identical_logits(expanded_llama, tokenizer, tmp_path, weight_format):
    model, _ = expanded_llama
    sparse_expansion.save(model, tokenizer, tmp_path / "se", manifest={"test": True}, format=weight_format)
    expected_file = "model.safetensors" if weight_format == "dense" else "model.compressed.safetensors"
    assert (tmp_path / "se" / expected_file).is_file()
    loaded = sparse_expansion.load(tmp_path / "se").model
    x = random_windows(2, 20, seed=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert not list(tmp_path.glob(".se.*"))


def test_generate_runs_with_the_kv_cache(expanded_llama):
    model, _ = expanded_llama
    prompt = random_windows(1, 8, seed=2)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)


def test_build_bad_input():
    model = make_model("llama")
    layout = discover(model)
    with pytest.raises(UsageError, match="at least 1"):
        expand_model(model, layout, random_windows(), SparsitySpec(0.5), ExpansionConfig(experts=0), progress=False)
    with pytest.raises(UsageError, match="calibration tokens"):
        expand_model(model, layout, random_windows(1, 4), SparsitySpec(0.5), ExpansionConfig(experts=5),
                     progress=False)
    with pytest.raises(UsageError, match="no PCA dimensions"):
        expand_model(model, layout, random_windows(), SparsitySpec(0.5), ExpansionConfig(experts=2, pca_reduction=100),
                     progress=False)


def test_experts_pruned_a_few_at_a_time_equal_all_at_once(monkeypatch):
    """Large layers are pruned a batch of experts at a time (bounded memory): the experts are the same."""
    windows = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(1))
    spec = SparsitySpec.create(sparsity=0.6)
    config = ExpansionConfig(experts=5, pca_reduction=8, min_cluster_tokens=8)
    built = {}
    for per_batch in (5, 2):
        monkeypatch.setattr(build_module, "experts_per_batch", lambda rows, cols, k, device, n=per_batch: n)
        model = make_model("llama")
        expand_model(model, discover(model), windows, spec, config, progress=False)
        built[per_batch] = {name: t.clone() for name, t in model.state_dict().items()}
    assert built[5].keys() == built[2].keys()
    for name in built[5]:
        assert torch.equal(built[5][name], built[2][name]), name
    # The sizing rule itself: everything at once for small layers, a few at a time for a 7B down projection.
    monkeypatch.undo()
    monkeypatch.setattr(build_module, "free_bytes", lambda device: 20 * 2**30)
    assert build_module.experts_per_batch(1536, 576, 16, torch.device("cpu")) == 16
    # A Llama-7B down projection: 16 fp32 Hessians of 11008^2 alone are 7.8 GB.
    assert 1 <= build_module.experts_per_batch(4096, 11008, 16, torch.device("cpu")) < 8
    monkeypatch.setattr(build_module, "free_bytes", lambda device: 2**20)
    assert build_module.experts_per_batch(4096, 11008, 16, torch.device("cpu")) == 1  # never none


def test_compact_experts_give_the_same_logits_from_a_fraction_of_the_memory(expanded_llama, tokenizer, tmp_path):
    """Loaded for inference with `compact`, each expert is one CSR copy (no dense stack): the logits are the
    dense stack's, the kernels (forced on) agree to rounding, and the model refuses to be saved."""
    from sparse_expansion.inference import accelerate
    from sparse_expansion.models.model_dir import load_model_dir

    model, _ = expanded_llama
    sparse_expansion.save(model, tokenizer, tmp_path / "se")
    compact, _, _ = load_model_dir(tmp_path / "se", compact=True)
    layers = [m for m in compact.modules() if isinstance(m, ExpertLinear)]
    assert layers and all(m.compacted for m in layers)
    dense_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, ExpertLinear))
    held = sum(m.weight.untyped_storage().nbytes() + sum(k.nbytes for k in m.expert_kernels) for m in layers)
    assert held < 0.8 * dense_bytes  # 50% sparse experts: ~6 of 8 bytes per weight pair (CSR, 16-bit columns)
    x = random_windows(2, 20, seed=5)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        assert torch.equal(compact(input_ids=x).logits, expected)  # decoded experts: the same products
        accelerate(compact, "always")  # every expert product through the CSR kernel
        torch.testing.assert_close(compact(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)
    originals = dict(model.named_modules())
    for name, module in compact.named_modules():  # the protocol still reads the weights (decoded)
        if isinstance(module, ExpertLinear):
            assert torch.equal(linear_weight(module), originals[name].weight)
    with pytest.raises(UsageError, match="cannot be saved"):
        sparse_expansion.save(compact, tokenizer, tmp_path / "again")
    assert not (tmp_path / "again").exists()
