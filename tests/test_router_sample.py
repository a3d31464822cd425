"""--router-tokens: routers fitted on a seeded sample of the calibration tokens, every token then routed."""

import pytest
import torch

from conftest import SMALL
from sparse_expansion.cli import main
from sparse_expansion.expansion.fitting import sample_tokens
from sparse_expansion.models import load_model


def test_sample_tokens_keeps_distinct_rows_in_order_and_all_when_there_are_few():
    x = torch.arange(40.0).reshape(20, 2)
    assert sample_tokens(x, None, 0) is x and sample_tokens(x, 20, 0) is x and sample_tokens(x, 99, 0) is x
    picked = sample_tokens(x, 7, seed=3)
    rows = (picked[:, 0] / 2).long()
    assert picked.shape == (7, 2) and torch.equal(x[rows], picked)
    assert rows.unique().numel() == 7 and torch.equal(rows, rows.sort().values)
    assert torch.equal(sample_tokens(x, 7, seed=3), picked)  # the same seed, the same sample
    assert not torch.equal(sample_tokens(x, 7, seed=4), picked)


def _expand(llama_dir, corpus_dir, out, *extra):
    assert main(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2", "--sparsity", "0.5",
                 "--pca-reduction", "8", "--out", str(out), *SMALL, *extra]) == 0
    return load_model(str(out), quiet=True).model.state_dict()


@pytest.fixture(scope="module")
def builds(llama_dir, corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("router-tokens")
    # 4 calibration windows of 32 tokens: 128 tokens per router
    return {name: _expand(llama_dir, corpus_dir, out / name, *extra) for name, extra in {
        "all": [], "more": ["--router-tokens", "128"], "sample": ["--router-tokens", "40"],
        "sample-again": ["--router-tokens", "40"]}.items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sample_as_large_as_the_calibration_is_todays_result_exactly(builds):
    assert _equal(builds["all"], builds["more"])


def test_a_sample_is_deterministic_and_changes_the_routers(builds):
    assert _equal(builds["sample"], builds["sample-again"])
    routers = [k for k in builds["all"] if "sparse_expansion_routers" in k]
    assert routers and any(not torch.equal(builds["all"][k], builds["sample"][k]) for k in routers)
