"""The large-model memory plan (issue 18, item 5): where cluster statistics accumulate and in what precision."""

import gc
import weakref

import pytest
import torch

from conftest import make_model, random_windows
from sparse_expansion.calibration import Hessian
from sparse_expansion.evaluation import perplexity
from sparse_expansion.expansion import ExpansionConfig, expand_model
from sparse_expansion.expansion import build as build_module
from sparse_expansion.models import discover
from sparse_expansion.pruning import METHODS, SparsitySpec


@pytest.mark.parametrize(("free", "expected"), [(10 << 30, "cuda"), (1 << 20, "cpu")])
def test_cluster_statistics_go_to_the_host_when_the_device_would_not_hold_them(monkeypatch, free, expected):
    monkeypatch.setattr(build_module, "free_bytes", lambda device: free)
    method = METHODS["sparsegpt"]
    # 16 Hessians of 1,024 inputs in fp32: 64 MiB, against 40% of 10 GiB (device) or of 1 MiB (host)
    where, dtype = build_module.statistic_placement(ExpansionConfig(), method, 1024, 16, torch.device("cuda"))
    assert (where.type, dtype) == (expected, torch.float32)
    forced, _ = build_module.statistic_placement(ExpansionConfig(statistic_device="cpu"), method, 1024, 16,
                                                 torch.device("cuda"))
    assert forced.type == "cpu"
    _, half = build_module.statistic_placement(ExpansionConfig(statistic_dtype="bfloat16"), method, 8, 2,
                                               torch.device("cpu"))
    assert half == torch.bfloat16


def test_a_bfloat16_hessian_is_the_float32_one_to_its_precision():
    x = torch.randn(4000, 48, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 1, 48)
    full, half = Hessian(48), Hessian(48, dtype=torch.bfloat16)
    for chunk in x.split(500):
        full.update(chunk)
        half.update(chunk)
    assert half.matrix.dtype == torch.bfloat16 and half.tokens == full.tokens == 4000
    expected = 2 * x.double().t() @ x.double() / 4000  # the definition, in float64
    assert torch.allclose(full.matrix.double(), expected, rtol=1e-4, atol=1e-4)
    error = (half.matrix.double() - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.05  # bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding, 8 running updates


def test_an_expansion_with_bfloat16_statistics_prunes_every_expert_and_stays_close():
    windows, test = random_windows(8, 32), random_windows(4, 24, seed=9)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = make_model("llama")
        report = expand_model(model, discover(model), windows, SparsitySpec(0.5),
                              ExpansionConfig(experts=2, pca_reduction=8, min_cluster_tokens=1,
                                              statistic_dtype=dtype), progress=False)
        assert all(s == pytest.approx(0.5, abs=0.01) for info in report.layers.values() for s in info["sparsity"])
        results[dtype] = perplexity(model, test, progress=False).ppl
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.05)


def test_a_groups_statistics_go_before_the_next_group_and_the_experts_are_assembled_after_them(monkeypatch):
    """What lets a rank hold only its own experts while it prunes: per block, every group is fitted before any
    expert is assembled (broadcast from its owner under torchrun), and no statistic outlives its group."""
    events, alive = [], []
    real_fit, real_stack = build_module.fit_group, build_module.GroupFit.stack
    real_assemble = build_module.distributed.assemble_owned

    def living() -> int:
        gc.collect()
        return sum(ref() is not None for ref in alive)

    def fit_group(*args, **kwargs):
        events.append(("fit", living()))
        fit = real_fit(*args, **kwargs)
        alive.extend(weakref.ref(statistic) for statistic in fit.clusters)
        return fit

    def stack(self, start, end, keep=True):
        stacked = real_stack(self, start, end, keep)
        alive.append(weakref.ref(stacked))
        return stacked

    def assemble(local, count):
        events.append(("assemble", living()))
        return real_assemble(local, count)

    monkeypatch.setattr(build_module, "fit_group", fit_group)
    monkeypatch.setattr(build_module.GroupFit, "stack", stack)
    monkeypatch.setattr(build_module.distributed, "assemble_owned", assemble)
    model = make_model("llama")
    layout = discover(model)
    expand_model(model, layout, random_windows(8, 32), SparsitySpec(0.5),
                 ExpansionConfig(experts=2, pca_reduction=8, min_cluster_tokens=1), progress=False)
    per_block = [("fit", 0), ("fit", 0), ("assemble", 0), ("assemble", 0), ("assemble", 0)]  # gate+up, down
    assert events == per_block * len(layout.blocks)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("statistic_device", [None, "cpu"])
def test_an_expansion_on_the_gpu_keeps_finished_experts_and_host_statistics_apart_and_matches_the_cpu(
        statistic_device):
    windows, test = random_windows(8, 32), random_windows(4, 24, seed=9)
    ppl = {}
    for device in ("cpu", "cuda"):
        model = make_model("llama")
        config = ExpansionConfig(experts=2, pca_reduction=8, min_cluster_tokens=1, statistic_device=statistic_device)
        expand_model(model, discover(model), windows, SparsitySpec(0.5), config, device=device, progress=False)
        assert all(p.device.type == "cpu" for p in model.parameters())  # the engine hands every block back
        ppl[device] = perplexity(model, test, progress=False).ppl
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=0.05)  # GPU rounding moves masks, not the result
