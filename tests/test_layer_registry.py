"""The layer registry: converters tried in priority order, whatever the order their modules were imported in, and
what `accelerate` switched, as each kind reports it (`fast_paths`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_model
from sparse_expansion.inference import accelerate, force_sparse
from sparse_expansion.kernels import native
from sparse_expansion.layers import SparseLinear, protocol
from sparse_expansion.layers.linear import LinearKind
from sparse_expansion.layers.protocol import AccelerateContext, converters, kind_of, register_converter
from sparse_expansion.layers.switch import ALWAYS, SwitchCache
from sparse_expansion.models import discover
from sparse_expansion.pruning import SparsitySpec, get_method, prune_model


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the converter registry: what a test registers is gone afterwards."""
    monkeypatch.setattr(protocol, "_CONVERTERS", dict(protocol._CONVERTERS))


def test_linear_converters_are_tried_by_priority_csr_first():
    found = converters(LinearKind.name)
    assert [c.name for c in found] == ["csr", "semi_structured"]  # the order the imports gave before
    priorities = [c.priority for c in found]
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == len(priorities)


def test_a_later_registration_with_a_higher_priority_is_tried_first(registry):
    calls = []

    def low(module, context):
        calls.append("low")
        return None

    replacement = nn.Identity()

    def high(module, context):
        calls.append("high")
        return replacement

    register_converter(LinearKind.name, "test-low", low, priority=-100)  # registered (imported) first
    register_converter(LinearKind.name, "test-high", high, priority=1000)
    names = [c.name for c in converters(LinearKind.name)]
    assert names[0] == "test-high" and names[-1] == "test-low"
    assert names == [c.name for c in sorted(converters(LinearKind.name), key=lambda c: -c.priority)]

    linear = nn.Linear(4, 4)
    context = AccelerateContext(mode="always", switches=SwitchCache(batch_sizes=(1,), repeats=1))
    assert kind_of(linear).accelerate(linear, context) is replacement
    assert calls == ["high"]  # the first that applies wins; the rest are not tried


def test_converters_of_one_kind_need_distinct_priorities_and_names(registry):
    existing = converters(LinearKind.name)[0]
    with pytest.raises(ValueError, match="distinct priorities"):
        register_converter(LinearKind.name, "test-clash", lambda m, c: None, priority=existing.priority)
    with pytest.raises(ValueError, match="twice"):
        register_converter(LinearKind.name, existing.name, lambda m, c: None, priority=12345)
    register_converter("some_other_kind", "test-other", lambda m, c: None, priority=existing.priority)
    assert "test-other" not in [c.name for c in converters(LinearKind.name)]


def test_off_mode_tries_no_converter(registry):
    register_converter(LinearKind.name, "test-boom", lambda m, c: pytest.fail("tried in off mode"), priority=999)
    linear = nn.Linear(4, 4)
    with torch.no_grad():
        assert kind_of(linear).accelerate(linear, AccelerateContext(mode="off")) is linear


@pytest.mark.skipif(not native.available(), reason="the native CPU kernels are not built")
def test_accelerate_reports_by_path_what_each_kind_switched():
    model = make_model("llama")
    layout = discover(model)
    prune_model(model, layout, torch.randint(0, 300, (4, 16)), get_method("magnitude"), SparsitySpec(0.7),
                progress=False)
    report = accelerate(model, cache=SwitchCache(batch_sizes=(1,), repeats=1))
    switched = report["switched"]
    assert len(switched) == report["layers"] == len(layout.select("ffn")) * len(layout.blocks)
    assert report["kinds"] == {"sparse_linear": report["layers"]}
    for path, kind_name in switched.items():
        module = model.get_submodule(path)
        assert isinstance(module, SparseLinear) and kind_of(module).name == kind_name
    force_sparse(model)
    assert all(path.switch == ALWAYS for m in model.modules() if kind_of(m) is not None
               for path in kind_of(m).fast_paths(m))
