"""Architecture discovery and the sequential engine on tiny random models of every supported family."""

import pytest
import torch
from torch import nn

from conftest import FAMILIES, make_model
from sparse_expansion import UsageError
from sparse_expansion.calibration import BlockHooks, SequentialCalibration, Step, Watch, block_outputs
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


# The module the model applies after its last block (its hidden_states[-1] is taken after it).
FINAL_NORMS = {"llama": "model.norm", "qwen2": "model.norm", "mistral": "model.norm", "gemma": "model.norm",
               "gemma2": "model.norm", "gemma3": "model.norm", "phi": "model.final_layernorm",
               "gpt_neox": "gpt_neox.final_layer_norm", "opt": "model.decoder.final_layer_norm",
               "gpt2": "transformer.ln_f"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_outputs_equal_the_models_own_hidden_states(family):
    """Every block gets the arguments the model itself passes to it: the engine's propagation reproduces the
    model's hidden states at every block (Gemma-2/3: sliding-window and global layers, window < sequence)."""
    model = make_model(family)
    windows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    before_norm = []
    norm = model.get_submodule(FINAL_NORMS[family])
    handle = norm.register_forward_pre_hook(lambda _m, args: before_norm.append(args[0].detach()))
    with torch.no_grad():
        expected = list(model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states)
    handle.remove()
    expected[-1] = before_norm[0]  # the last entry is after the final norm: compare before it
    got = block_outputs(model, windows, batch_size=2)
    assert len(got) == len(expected) - 1 == 2
    for index, (ours, theirs) in enumerate(zip(got, expected[1:])):
        error = (ours - theirs).norm() / theirs.norm()
        assert error <= 1e-5, f"block {index}: relative error {error:.2e}"


def test_block_outputs_can_stop_early():
    model = make_model("gemma2")
    windows = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    assert len(block_outputs(model, windows, stop_after=0)) == 1


def test_gemma2_layers_get_different_arguments():
    """The case the old engine got wrong: block 1 (global) must not get block 0's (sliding-window) mask."""
    model = make_model("gemma2")
    layout = discover(model)
    engine = SequentialCalibration(model, layout, batch_size=4, progress=False)
    batch = engine.capture(torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2)))[0]
    mask0, mask1 = (batch.calls[i][1]["attention_mask"] for i in (0, 1))
    assert not torch.equal(mask0, mask1)


class _Counter:
    def __init__(self):
        self.calls = []

    def update(self, tensor):
        self.calls.append(tensor.shape)

    def merge(self, other):
        self.calls += other.calls
        return self


def test_stages_run_in_order_and_observe_only_takes_one_pass():
    model = make_model("llama")
    layout = discover(model)
    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    events = []

    class Probe(Step):
        def __init__(self, modifies):
            self.modifies = modifies

        def observe(self, index, block):
            events.append(("observe", index))
            return {"down": Watch("mlp.down_proj", _Counter()), "block": Watch("", _Counter(), on="output")}

        def modify(self, index, block, statistics):
            events.append(("modify", index, len(statistics["down"].calls), len(statistics["block"].calls)))

    def reduce(statistics):
        events.append(("reduce",))
        return statistics

    hooks = BlockHooks(after_block=lambda i, b, h, s: events.append(("after", i)))
    engine = SequentialCalibration(model, layout, batch_size=2, progress=False, hooks=hooks)
    engine.run(windows, Probe(True), reduce=reduce)
    assert events[:4] == [("observe", 0), ("reduce",), ("modify", 0, 2, 2), ("after", 0)]
    events.clear()
    engine.hooks = BlockHooks(stop_after=0)
    engine.run(windows, Probe(False))
    assert events == [("observe", 0), ("modify", 0, 2, 2)]  # statistics from the propagation pass itself


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

    def capture_forward(self, index, block, batches, keep_outputs):
        if not keep_outputs:
            engine_inputs.append(torch.cat([b.hidden for b in batches]))
        return original(self, index, block, batches, keep_outputs)

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
