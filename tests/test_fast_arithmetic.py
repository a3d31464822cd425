"""The experts' fast arithmetic (PruneOptions.factorization "fast") and the kernels under it, against independent
computations: numpy/scipy inverses and products, a direct transcription of SparseGPT, a stable sort."""

import threading

import numpy as np
import pytest
import torch

from sparse_expansion import UsageError
from sparse_expansion.expansion.fitting import fit_router
from sparse_expansion.kernels.linalg import invert_lower_triangular_
from sparse_expansion.pruning import SparsitySpec, sparsegpt_prune
from sparse_expansion.pruning.masks import lowest_mask
from sparse_expansion.pruning.sparsegpt import hessian_factors, inverse_hessian_factors
from sparse_expansion.runtime import one_thread_each
from test_pruning_math import correlated_inputs, layer_stats, reference_sparsegpt


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_one_thread_each_keeps_order_runs_single_threaded_and_restores_the_count(two_threads):
    seen = []

    def work(item):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return item * item

    assert one_thread_each(work, range(7)) == [i * i for i in range(7)]
    assert {count for _, count in seen} == {1}
    assert torch.get_num_threads() == 2
    with pytest.raises(UsageError, match="boom"):
        one_thread_each(lambda item: (_ for _ in ()).throw(UsageError("boom")) if item == 3 else item, range(5))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("column_major", [True, False])
def test_triangular_inverse_in_place_matches_numpy(dtype, column_major):
    g = torch.Generator().manual_seed(0)
    lower = (torch.randn(50, 50, generator=g, dtype=dtype).tril() + 8 * torch.eye(50, dtype=dtype))
    expected = np.linalg.inv(lower.double().numpy())
    work = lower.t().contiguous().t() if column_major else lower.clone()
    assert invert_lower_triangular_(work)
    np.testing.assert_allclose(work.double().numpy(), expected, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=1e-6 if dtype == torch.float32 else 1e-13)
    singular = lower.clone()
    singular[7, 7] = 0
    kept = singular.clone()
    assert not invert_lower_triangular_(singular) and torch.equal(singular, kept)  # nothing written
    assert not invert_lower_triangular_(lower.half())


def test_fast_factors_do_not_depend_on_the_thread_count(two_threads):
    x = correlated_inputs(tokens=900, features=160)
    hessians = torch.stack([layer_stats(x[i::3])[0].matrix for i in range(3)])
    two, damping = inverse_hessian_factors(hessians, 0.01, "fast")
    torch.set_num_threads(1)
    one, _ = inverse_hessian_factors(hessians, 0.01, "fast")
    assert torch.equal(one, two)
    for e in range(3):  # the factor itself: U^T U = (H + damp I)^-1, checked with numpy's inverse
        damped = hessians[e].double() + damping[e] * torch.eye(160, dtype=torch.float64)
        np.testing.assert_allclose((two[e].double().t() @ two[e].double()).numpy(), np.linalg.inv(damped.numpy()),
                                   rtol=2e-3, atol=2e-3 * np.abs(np.linalg.inv(damped.numpy())).max())


def test_block_updates_match_the_direct_transcription(two_threads):
    x = correlated_inputs(tokens=4000, features=200)
    weight = torch.randn(24, 200, generator=torch.Generator().manual_seed(6))
    h, _ = layer_stats(x)
    expected, expected_mask = reference_sparsegpt(weight, h.matrix, 0.6)
    result = sparsegpt_prune(weight, None, SparsitySpec(0.6), factors=hessian_factors(h.matrix.unsqueeze(0), 0.01,
                                                                                        "fast"), block_updates=True)
    assert (result.mask != expected_mask).float().mean() < 0.002  # float32 vs float64: near-ties only
    agree = result.mask == expected_mask
    assert torch.allclose(result.weight[agree.all(1)], expected[agree.all(1)], rtol=1e-3, atol=1e-3)


def test_experts_divided_among_threads_equal_one_thread(two_threads):
    x = correlated_inputs(features=64)
    weights = torch.randn(5, 16, 64, generator=torch.Generator().manual_seed(7))
    hessians = torch.stack([layer_stats(x[i::5])[0].matrix for i in range(5)])
    factors = hessian_factors(hessians, 0.01, "fast")
    shared = sparsegpt_prune(weights, None, SparsitySpec(0.5), factors=factors, block_updates=True)
    torch.set_num_threads(1)
    alone = sparsegpt_prune(weights, None, SparsitySpec(0.5), factors=factors, block_updates=True)
    assert torch.equal(shared.weight, alone.weight) and torch.equal(shared.mask, alone.mask)


def test_mask_of_transposed_scores_equals_a_stable_sort():
    g = torch.Generator().manual_seed(8)
    for stored in (torch.randn(3, 40, 30, generator=g), torch.randint(0, 4, (3, 40, 30), generator=g).float()):
        scores = stored.transpose(1, 2)  # (3, 30, 40), column-major: the layout SparseGPT's loop scores in
        for sparsity in (0.1, 0.5, 0.9):
            flat = scores.reshape(3, 1, -1)
            k = int(flat.shape[-1] * sparsity)
            expected = torch.zeros(flat.shape, dtype=torch.bool)
            expected.scatter_(-1, torch.argsort(flat, dim=-1, stable=True)[..., :k], True)
            assert torch.equal(lowest_mask(scores, SparsitySpec(sparsity), False), expected.reshape(scores.shape))


def test_router_fitted_in_place_is_the_same_router():
    x = correlated_inputs(tokens=600, features=64)
    kept = fit_router(x, experts=4, reduction=8, seed=1)
    work = x.clone()
    in_place = fit_router(work, experts=4, reduction=8, seed=1, overwrite=True)
    for name in ("mean", "projection", "centroids"):
        assert torch.equal(getattr(kept, name), getattr(in_place, name)), name
    torch.testing.assert_close(work, x - kept.mean)  # the tokens were centred where they lay
