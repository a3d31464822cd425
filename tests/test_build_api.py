"""One build path: `sparse_expansion.expand/prune(..., out=DIR)` from Python writes the bytes that the CLI writes with
the same settings, and a Python build killed mid-block and called again with `resume=True` finishes with them too."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import sparse_expansion
from conftest import small_args
from sparse_expansion.cli import main

SMALL = small_args(calib_samples=6, eval_samples=None, batch_size=2)
SETTINGS = {"calib_samples": 6, "seqlen": 32, "batch_size": 2, "quiet": True}

# A Python build in a child that SIGKILLs itself while block 1 propagates (after the block changed, before it was
# saved); called again with resume=True it must finish with the uninterrupted bytes.
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import sparse_expansion
    from sparse_expansion.calibration.engine import SequentialCalibration

    original = SequentialCalibration.forward_block

    def forward_block(self, index, block, batches, keep_outputs):
        if index == 1 and keep_outputs:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, index, block, batches, keep_outputs)

    SequentialCalibration.forward_block = forward_block
    model, data, out, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    sparse_expansion.expand(model, data=data, out=out, **settings)
""")


def _weights(path):
    return json.loads((path / "manifest.json").read_text())["weights"]["sha256"]


@pytest.fixture(scope="module")
def three_blocks(model_dir_factory):
    return model_dir_factory("llama", num_hidden_layers=3)


@pytest.mark.slow  # a child process killed mid-block
def test_python_expand_writes_the_cli_bytes_and_resumes_to_them(three_blocks, corpus_dir, tmp_path):
    expansion = {"experts": 2, "pca_reduction": 8, "sparsity": 0.5}
    assert main(["expand", "--experts", "2", "--pca-reduction", "8", "--sparsity", "0.5", "--model", str(three_blocks),
                 "--data", str(corpus_dir), *SMALL, "--out", str(tmp_path / "cli")]) == 0
    cli = _weights(tmp_path / "cli")

    # From a path (streamed, as the CLI) and from a model already in memory (changed in place and written).
    sparse_expansion.expand(str(three_blocks), data=str(corpus_dir), out=tmp_path / "path", **expansion, **SETTINGS)
    assert _weights(tmp_path / "path") == cli
    loaded = sparse_expansion.load(three_blocks)
    report = sparse_expansion.expand(loaded.model, loaded.tokenizer, data=str(corpus_dir), out=tmp_path / "memory",
                                     **expansion, **SETTINGS)
    assert _weights(tmp_path / "memory") == cli
    assert report.config.experts == 2 and len(report.layers) == 9  # 3 blocks x (gate, up, down)

    out = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", KILLER, str(three_blocks), str(corpus_dir), str(out),
                             json.dumps({**expansion, **SETTINGS})], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((tmp_path / "resumed.partial" / "state.json").read_text())
    assert [b["file"] for b in state["blocks"]] == ["block-00000.safetensors"]
    with pytest.raises(sparse_expansion.UsageError, match="resume"):
        sparse_expansion.expand(str(three_blocks), data=str(corpus_dir), out=out, **expansion, **SETTINGS)
    sparse_expansion.expand(str(three_blocks), data=str(corpus_dir), out=out, resume=True, **expansion, **SETTINGS)
    assert _weights(out) == cli
    assert not (tmp_path / "resumed.partial").exists()


def test_python_prune_without_out_changes_the_model_in_place(tokenizer, corpus_dir):
    from conftest import make_model

    model = make_model("llama")
    report = sparse_expansion.prune(model, tokenizer, sparsity=0.5, data=str(corpus_dir), **SETTINGS)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert report.method == "sparsegpt"
    assert abs((weight == 0).float().mean().item() - 0.5) < 0.01
