"""The GPU 2:4 path: pattern checks everywhere, conversion and speed only where CUDA is present."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from sparse_expansion.inference import accelerate
from sparse_expansion.layers.semi_structured import SemiStructuredLinear, is_two_four, semi_structured_supported
from sparse_expansion.models import discover
from sparse_expansion.pruning import SparsitySpec, get_method, prune_model

needs_gpu = pytest.mark.skipif(not semi_structured_supported(), reason="needs a CUDA GPU with compute capability >= 8")


def test_two_four_pattern_check():
    weight = torch.randn(8, 16)
    assert not is_two_four(weight)
    weight.view(8, 4, 4)[..., :2] = 0
    assert is_two_four(weight)
    weight[0, 2] = 0  # three zeros in a group still fits
    assert is_two_four(weight)
    weight[1, 0] = 1.0  # one zero in a group does not
    assert not is_two_four(weight)
    assert not is_two_four(torch.zeros(4, 6))  # columns not a multiple of 4


def test_nm_pruning_gives_the_two_four_pattern_and_cpu_models_are_left_alone():
    model = make_model("llama")
    windows = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    prune_model(model, discover(model), windows, get_method("sparsegpt"), SparsitySpec.create(nm="2:4"),
                progress=False)
    mlp = discover(model).blocks[0].mlp
    assert is_two_four(mlp.gate_proj.weight) and is_two_four(mlp.down_proj.weight)
    # On the CPU the 2:4 GPU path never applies (the CPU kernels may take these layers instead).
    accelerate(model)
    assert not any(isinstance(m, SemiStructuredLinear) for m in model.modules())


@needs_gpu
def test_semi_structured_model_matches_dense_on_gpu():
    model = make_model("llama", hidden_size=128, intermediate_size=256)
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_model(model, discover(model), windows, get_method("sparsegpt"), SparsitySpec.create(nm="2:4"),
                progress=False)
    model = model.to("cuda", torch.float16)
    x = windows[:2].cuda()
    with torch.no_grad():
        expected = model(input_ids=x).logits.float()
        report = accelerate(model, mode="always")
        got = model(input_ids=x).logits.float()
    assert report["available"] and report["layers"] == 3 * len(discover(model).blocks)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@needs_gpu
def test_semi_structured_benchmark_agrees_with_a_timing_of_its_own():
    """The bench's times against torch.utils.benchmark's own (CUDA-synchronised) timing of the dense and the 2:4
    product on the same shapes, through torch's API rather than the layer's: the same order of magnitude."""
    import torch.nn.functional as F
    from torch.utils import benchmark

    from sparse_expansion.bench.kernel import semi_structured_benchmark

    rows = cols = 1024
    result = semi_structured_benchmark(rows, cols, batch=64, min_run_time=0.1)
    weight = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
    weight.view(rows, cols // 4, 4)[..., :2] = 0
    sparse = torch.sparse.to_sparse_semi_structured(weight)

    def own_ms(fn, x):
        timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x})
        return timer.blocked_autorange(min_run_time=0.1).median * 1e3

    for label, tokens in (("single", 1), ("batched", 64)):
        timings = result[label]
        x = torch.randn(tokens, cols, device="cuda", dtype=torch.float16)
        assert 0.1 < timings["dense_ms"] / own_ms(lambda a: F.linear(a, weight), x) < 10, timings
        assert timings["speedup"] == pytest.approx(timings["dense_ms"] / timings["semi_structured_ms"], rel=1e-9)
    # At 64 tokens torch's 2:4 product takes the input as it is (below that the layer pads it).
    x = torch.randn(64, cols, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(F.linear(x, sparse), F.linear(x, weight), rtol=1e-2, atol=1e-2)
    assert 0.1 < result["batched"]["semi_structured_ms"] / own_ms(lambda a: F.linear(a, sparse), x) < 10
    assert set(result["layer_uses_semi_structured_at"]) <= {1, 64}
