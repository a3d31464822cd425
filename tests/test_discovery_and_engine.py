"""Architecture discovery and the sequential engine on tiny random models of every supported family."""

import pytest
import torch
from torch import nn

from conftest import FAMILIES, make_model
from sparse_expansion import UsageError
from sparse_expansion.calibration import SequentialCalibration
from sparse_expansion.models import discover, linear_weight
from sparse_expansion.pruning import METHODS, SparsitySpec, prune_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_discovery_finds_blocks_and_ffn_linears(family):
    model = make_model(family)
    layout = discover(model)
    assert len(layout.blocks) == 2
    ffn_in, ffn_out = FAMILIES[family]
    ffn = layout.select("ffn")
    assert sorted(lin.name for lin in ffn if lin.role == "ffn_in") == sorted(ffn_in)
    assert sorted(lin.name for lin in ffn if lin.role == "ffn_out") == sorted(ffn_out)
    attention = [lin for lin in layout.select("all") if lin.kind == "attention"]
    assert attention, "scope all must add the attention linears"
    assert all(lin.kind == "ffn" for lin in ffn)


def test_no_decoder_blocks_is_a_clear_error():
    with pytest.raises(UsageError, match="no decoder blocks"):
        discover(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_engine_replays_block_kwargs_exactly(family):
    """Capturing block 0's inputs and replaying every block reproduces the model's own hidden states."""
    model = make_model(family)
    layout = discover(model)
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    seen = []
    engine = SequentialCalibration(model, layout, batch_size=2, progress=False)

    def record(index, block, feed):
        seen.append(index)

    batches = engine.capture(windows)
    assert torch.allclose(torch.cat([b.hidden for b in batches]), expected[0], atol=1e-5)
    # Run blocks in order and compare with the model's hidden states after block 0 (the last entry of
    # hidden_states is post-final-norm in some families, so check the intermediate one).
    out = engine.forward_block(layout.blocks[0], batches, keep_outputs=True)
    assert torch.allclose(torch.cat([b.hidden for b in out]), expected[1], atol=1e-5)
    engine.run(windows, record)
    assert seen == [0, 1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_prunes_every_family(family, method):
    model = make_model(family)
    layout = discover(model)
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    report = prune_model(model, layout, windows, METHODS[method], SparsitySpec(0.5), progress=False)
    assert len(report.layers) == 2 * len(layout.select("ffn"))
    for name, info in report.layers.items():
        rows, cols = info["shape"]
        # Within one weight per row (Wanda) / per block (SparseGPT) / per matrix (magnitude) of 50%.
        assert abs(info["zeros"] - info["numel"] * 0.5) <= max(rows, cols), name
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    assert torch.isfinite(logits).all()


def test_scope_all_prunes_attention_too():
    model = make_model("llama")
    layout = discover(model)
    windows = torch.randint(0, 300, (2, 16))
    report = prune_model(model, layout, windows, METHODS["sparsegpt"], SparsitySpec(0.5), scope="all",
                         progress=False)
    assert "model.layers.0.self_attn.q_proj" in report.layers
    q = linear_weight(layout.blocks[0].self_attn.q_proj)
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_same_seed_gives_identical_masks_twice():
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(7))
    masks = []
    for _ in range(2):
        model = make_model("qwen2")
        layout = discover(model)
        prune_model(model, layout, windows, METHODS["sparsegpt"], SparsitySpec(0.6), progress=False)
        masks.append([linear_weight(m) == 0 for m in (layout.blocks[1].get_submodule(n.name)
                                                         for n in layout.select("ffn"))])
    for a, b in zip(*masks):
        assert torch.equal(a, b)


def test_pruning_later_blocks_sees_pruned_activations():
    """Sequential: block 1's statistics come from block 0 *after* pruning (errors accumulate)."""
    windows = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model = make_model("llama")
    layout = discover(model)
    seen = {}

    class Spy(METHODS["wanda"].statistic):
        def update(self, inputs):
            super().update(inputs)
            seen.setdefault(id(self), inputs.clone())

    spy_method = METHODS["wanda"].__class__("wanda", METHODS["wanda"].prune, Spy)
    engine_inputs = []
    original = SequentialCalibration.forward_block

    def capture_forward(self, block, batches, keep_outputs):
        if not keep_outputs:
            engine_inputs.append(torch.cat([b.hidden for b in batches]))
        return original(self, block, batches, keep_outputs)

    SequentialCalibration.forward_block = capture_forward
    try:
        dense_hidden = None
        with torch.no_grad():
            dense_hidden = model(input_ids=windows, output_hidden_states=True).hidden_states[1]
        prune_model(model, layout, windows, spy_method, SparsitySpec(0.9), progress=False)
    finally:
        SequentialCalibration.forward_block = original
    with torch.no_grad():
        pruned_hidden = model(input_ids=windows, output_hidden_states=True).hidden_states[1]
    # Block 1 was calibrated on the pruned block 0's outputs, not the dense ones.
    assert torch.allclose(engine_inputs[1], pruned_hidden, atol=1e-5)
    assert not torch.allclose(engine_inputs[1], dense_hidden, atol=1e-3)
