"""The per-layer pruning math, on matrices alone (no model)."""

import pytest
import torch

from sparse_expansion import UsageError
from sparse_expansion.calibration.observers import Hessian, InputSquaredNorm
from sparse_expansion.pruning import (
    PruneOptions,
    SparsitySpec,
    magnitude_prune,
    parse_nm,
    sparsegpt_prune,
    wanda_prune,
    wanda_scores,
)
from sparse_expansion.pruning.masks import lowest_mask
from sparse_expansion.pruning.quantization import ChannelQuantizer


def correlated_inputs(tokens=2048, features=96, seed=0):
    """Inputs with very different feature scales and strong correlations, as in real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, features // 4, generator=g)
    mix = torch.randn(features // 4, features, generator=g)
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    return (latent @ mix + 0.3 * torch.randn(tokens, features, generator=g)) * scales


def layer_stats(x):
    h, n = Hessian(x.shape[1]), InputSquaredNorm(x.shape[1])
    for chunk in x.split(500):  # several batches, as the engine feeds them
        h.update(chunk)
        n.update(chunk)
    return h, n


def prune_all(weight, x, spec):
    h, n = layer_stats(x)
    options = PruneOptions()
    return {
        "magnitude": magnitude_prune(weight, None, spec, options),
        "wanda": wanda_prune(weight, n, spec, options),
        "sparsegpt": sparsegpt_prune(weight, h.matrix, spec).weight,
    }


@pytest.mark.parametrize("spec", [SparsitySpec(0.5), SparsitySpec(0.7), SparsitySpec.create(nm="2:4")])
def test_sparsegpt_reconstructs_outputs_better_than_wanda_and_magnitude(spec):
    x = correlated_inputs()
    weight = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(1))
    dense_out = x @ weight.t()
    errors = {name: (x @ w.t() - dense_out).pow(2).sum().item() for name, w in prune_all(weight, x, spec).items()}
    assert errors["sparsegpt"] < errors["wanda"]
    assert errors["sparsegpt"] < errors["magnitude"]


def test_hessian_and_norm_statistics_match_their_definitions():
    x = correlated_inputs(tokens=300, features=16)
    h, n = layer_stats(x)
    assert torch.allclose(h.matrix, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(n.mean_sq, x.pow(2).mean(0), rtol=1e-5)
    assert h.tokens == n.tokens == 300


def test_wanda_matches_its_formula_on_a_hand_made_example():
    weight = torch.tensor([[1.0, -2.0, 3.0, -0.5],
                           [0.2, 4.0, -1.0, 1.0]])
    # Input feature norms ||X_j||: 4, 1, 0.5, 2 (mean squares 16, 1, 0.25, 4 up to a constant).
    stat = InputSquaredNorm(4)
    stat.update(torch.tensor([[4.0, 1.0, 0.5, 2.0], [-4.0, -1.0, -0.5, -2.0]]))
    scores = wanda_scores(weight, stat.mean_sq)
    expected = torch.tensor([[4.0, 2.0, 1.5, 1.0],
                             [0.8, 4.0, 0.5, 2.0]])
    assert torch.allclose(scores, expected)
    pruned = wanda_prune(weight, stat, SparsitySpec(0.5), PruneOptions())
    # Row 0 keeps |1*4| and |-2*1|; row 1 keeps |4*1| and |1*2|: per-row comparison groups.
    assert torch.equal(pruned, torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.0, 4.0, 0.0, 1.0]]))


def test_magnitude_is_layer_wise():
    weight = torch.tensor([[5.0, 4.0, 3.0, 2.0], [0.1, 0.2, 0.3, 0.4]])
    pruned = magnitude_prune(weight, None, SparsitySpec(0.5), PruneOptions())
    assert torch.equal(pruned, torch.tensor([[5.0, 4.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_sparsity_is_exact_per_group(sparsity):
    x = correlated_inputs(features=200)  # 200 columns: one full 128 block and one partial block
    weight = torch.randn(48, 200, generator=torch.Generator().manual_seed(2))
    spec = SparsitySpec(sparsity)
    pruned = prune_all(weight, x, spec)
    # Wanda: exactly floor(s * cols) zeros in every row.
    assert ((pruned["wanda"] == 0).sum(1) == int(200 * sparsity)).all()
    # Magnitude: exactly floor(s * numel) zeros in the matrix.
    assert (pruned["magnitude"] == 0).sum() == int(weight.numel() * sparsity)
    # SparseGPT: exactly floor(s * rows * block) zeros in every column block (adaptive mask).
    for start, end in ((0, 128), (128, 200)):
        zeros = (pruned["sparsegpt"][:, start:end] == 0).sum().item()
        assert zeros == int(48 * (end - start) * sparsity)


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_sparsity_is_exact_in_every_group(nm):
    n, m = parse_nm(nm)
    x = correlated_inputs(features=96)
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))
    for name, pruned in prune_all(weight, x, SparsitySpec.create(nm=nm)).items():
        zeros_per_group = (pruned.reshape(32, -1, m) == 0).sum(-1)
        assert (zeros_per_group == n).all(), name


def test_sparsegpt_is_deterministic():
    x = correlated_inputs()
    weight = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(4))
    h, _ = layer_stats(x)
    first = sparsegpt_prune(weight, h.matrix, SparsitySpec(0.6))
    second = sparsegpt_prune(weight, h.matrix, SparsitySpec(0.6))
    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.weight, second.weight)


def test_sparsegpt_handles_dead_inputs_and_a_singular_hessian():
    x = correlated_inputs(tokens=40, features=64)  # fewer tokens than features: H is singular
    x[:, 5] = 0  # a dead input
    weight = torch.randn(16, 64)
    h, _ = layer_stats(x)
    result = sparsegpt_prune(weight, h.matrix, SparsitySpec(0.5))
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, 5] == 0).all()


def test_sparsegpt_joint_quantization_uses_a_per_row_grid_and_keeps_zeros():
    x = correlated_inputs()
    weight = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(5))
    h, _ = layer_stats(x)
    result = sparsegpt_prune(weight, h.matrix, SparsitySpec(0.5), bits=3)
    assert (result.weight[result.mask] == 0).all()
    for row in result.weight:
        assert len(torch.unique(row)) <= 2**3
    # Error feedback beats masking and rounding to the same grid without it.
    quantizer = ChannelQuantizer(3).fit(weight)
    naive = torch.stack([quantizer.quantize(col) for col in weight.masked_fill(result.mask, 0).t()], dim=1)
    dense_out = x @ weight.t()
    joint_err = (x @ result.weight.t() - dense_out).pow(2).sum()
    naive_err = (x @ naive.t() - dense_out).pow(2).sum()
    assert joint_err < naive_err


def test_lowest_mask_breaks_ties_by_position():
    scores = torch.ones(2, 8)
    mask = lowest_mask(scores, SparsitySpec(0.5), per_row=True)
    assert torch.equal(mask[0], torch.tensor([True] * 4 + [False] * 4))


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b", "2:4:8", ""])
def test_malformed_nm_is_rejected(bad):
    with pytest.raises(UsageError):
        SparsitySpec.create(nm=bad) if bad else parse_nm(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(UsageError):
        SparsitySpec.create(sparsity=bad)


def reference_sparsegpt(weight, hessian, sparsity, blocksize=128, percdamp=0.01):
    """A direct transcription of SparseGPT: every OBS update applied to all later columns at once."""
    W = weight.clone().double()
    H = hessian.clone().double()
    cols = W.shape[1]
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        scores = W[:, start:end] ** 2 / U.diagonal()[start:end] ** 2
        k = int(scores.numel() * sparsity)
        block_mask = torch.zeros(scores.numel(), dtype=torch.bool)
        block_mask[torch.argsort(scores.flatten(), stable=True)[:k]] = True
        mask[:, start:end] = block_mask.view(scores.shape)
        for i in range(start, end):
            q = W[:, i].masked_fill(mask[:, i], 0)
            err = (W[:, i] - q) / U[i, i]
            W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
            W[:, i] = q
    return W.float(), mask


def test_sparsegpt_matches_a_direct_transcription_of_the_algorithm():
    x = correlated_inputs(tokens=4000, features=200)
    weight = torch.randn(24, 200, generator=torch.Generator().manual_seed(6))
    h, _ = layer_stats(x)
    expected, expected_mask = reference_sparsegpt(weight, h.matrix, 0.6)
    result = sparsegpt_prune(weight, h.matrix, SparsitySpec(0.6))
    assert (result.mask != expected_mask).float().mean() < 0.002  # float32 vs float64: near-ties only
    agree = result.mask == expected_mask
    assert torch.allclose(result.weight[agree.all(1)], expected[agree.all(1)], rtol=1e-3, atol=1e-3)


def test_batched_experts_equal_one_at_a_time():
    x = correlated_inputs(features=64)
    weights = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(7))
    hessians = torch.stack([layer_stats(x[i::3])[0].matrix for i in range(3)])
    batched = sparsegpt_prune(weights, hessians, SparsitySpec(0.5))
    for e in range(3):
        single = sparsegpt_prune(weights[e], hessians[e], SparsitySpec(0.5))
        assert torch.equal(single.mask, batched.mask[e])
        assert torch.allclose(single.weight, batched.weight[e], atol=1e-6)


@pytest.mark.parametrize("factorization", ["reference", "fast"])
def test_inverse_factor_and_dampening_retry(factorization):
    from sparse_expansion.pruning.sparsegpt import inverse_hessian_factors

    x = correlated_inputs(tokens=500, features=32)
    h = layer_stats(x)[0].matrix
    singular = torch.zeros(32, 32)
    singular[0, 0] = -1.0  # indefinite: needs the dampening raised
    factors, damping = inverse_hessian_factors(torch.stack([h, singular]), 0.01, factorization)
    damped = h + damping[0] * torch.eye(32)
    assert torch.allclose(factors[0].t() @ factors[0], torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)
    assert torch.equal(factors[0], factors[0].triu())
    assert damping[1] > 1.0 and torch.isfinite(factors[1]).all()
    single, single_damping = inverse_hessian_factors(h.unsqueeze(0), 0.01, factorization)
    assert single_damping[0] == damping[0] and torch.equal(single[0], factors[0])


def test_fast_factorization_is_the_reference_factor_up_to_rounding():
    from sparse_expansion.pruning.sparsegpt import inverse_hessian_factors

    x = correlated_inputs(tokens=3000, features=300)
    h = layer_stats(x)[0].matrix.double()
    # The upper Cholesky factor of (H + damp I)^-1 is unique: both paths must give it (float64 here, so that
    # rounding is far below the tolerance), checked against scipy's inverse and Cholesky.
    from scipy.linalg import cholesky, inv

    reference, damping = inverse_hessian_factors(h.unsqueeze(0), 0.01, "reference")
    fast, fast_damping = inverse_hessian_factors(h.unsqueeze(0), 0.01, "fast")
    expected = cholesky(inv((h + damping[0] * torch.eye(300, dtype=h.dtype)).numpy()), lower=False)
    assert fast_damping == damping
    assert torch.allclose(fast[0], torch.from_numpy(expected), rtol=1e-8, atol=1e-10)
    assert torch.allclose(reference[0], torch.from_numpy(expected), rtol=1e-8, atol=1e-10)
    # float32, as the pipeline runs: SparseGPT on either factor gives nearly the same mask
    weight = torch.randn(24, 300, generator=torch.Generator().manual_seed(6))
    options = [PruneOptions(factorization=f) for f in ("reference", "fast")]
    from sparse_expansion.pruning.methods import sparsegpt_method

    masks = [sparsegpt_method(weight, layer_stats(x)[0], SparsitySpec(0.6), o) == 0 for o in options]
    assert (masks[0] != masks[1]).float().mean() < 0.01


@pytest.mark.parametrize("per_row", [True, False])
def test_selection_mask_equals_a_stable_sort(per_row):
    g = torch.Generator().manual_seed(8)
    for scores in (torch.randn(2, 30, 40, generator=g), torch.randint(0, 4, (2, 30, 40), generator=g).float()):
        for sparsity in (0.1, 0.5, 0.9):
            flat = scores if per_row else scores.reshape(2, 1, -1)
            k = int(flat.shape[-1] * sparsity)
            expected = torch.zeros(flat.shape, dtype=torch.bool)
            expected.scatter_(-1, torch.argsort(flat, dim=-1, stable=True)[..., :k], True)
            assert torch.equal(lowest_mask(scores, SparsitySpec(sparsity), per_row), expected.reshape(scores.shape))


@pytest.mark.parametrize("statistic", [Hessian, InputSquaredNorm])
def test_merged_statistics_equal_one_statistic_fed_everything(statistic):
    """`merge` (used for clusters too small for their own, and next for all-reducing across processes)."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 12, generator=generator) for n in (5, 17, 9)]
    whole, parts = statistic(12), [statistic(12), statistic(12)]
    for b in batches:
        whole.update(b)
    parts[0].update(batches[0])
    parts[1].update(batches[1])
    parts[1].update(batches[2])
    merged = parts[0].merge(parts[1])
    field = "matrix" if statistic is Hessian else "mean_sq"
    x = torch.cat(batches).double()
    direct = 2 * x.t() @ x / x.shape[0] if statistic is Hessian else x.pow(2).mean(0)  # independent formula
    assert merged.tokens == whole.tokens == 31
    torch.testing.assert_close(getattr(merged, field).double(), direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(getattr(merged, field), getattr(whole, field), rtol=1e-5, atol=1e-6)
    parts = [statistic(12) for _ in batches]
    for part, b in zip(parts, batches):
        part.update(b)
    combined = statistic.combine(parts)
    assert combined.tokens == 31
    torch.testing.assert_close(getattr(combined, field).double(), direct, rtol=1e-5, atol=1e-6)
