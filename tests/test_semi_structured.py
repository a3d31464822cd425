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
def test_semi_structured_benchmark_runs():
    from sparse_expansion.bench.kernel import semi_structured_benchmark

    result = semi_structured_benchmark(1024, 1024, batch=64, min_run_time=0.1)
    for label in ("single", "batched"):
        timings = result[label]
        assert timings["speedup"] == pytest.approx(timings["dense_ms"] / timings["semi_structured_ms"])
    assert set(result["layer_uses_semi_structured_at"]) <= {1, 64}
