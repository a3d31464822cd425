"""Resumable builds: a prune or expand killed with SIGKILL in the middle of a block and resumed with --resume
writes exactly the output of an uninterrupted run; the state directory is checked before it is trusted."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import small_args
from sparse_expansion.cli import main

# Three calibration batches of two windows; evaluation at the command's default where a job evaluates.
SMALL = small_args(calib_samples=6, eval_samples=None, batch_size=2)
JOBS = {
    "prune": ["prune", "--method", "sparsegpt", "--sparsity", "0.5"],
    "expand": ["expand", "--experts", "2", "--pca-reduction", "8", "--sparsity", "0.5"],
}

# Runs the CLI in a child process that kills itself (SIGKILL: no handler, no cleanup) while block KILL_AT
# propagates its calibration batches, i.e. after the block was changed and before it was saved.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from sparse_expansion.calibration.engine import SequentialCalibration
    from sparse_expansion.cli import main

    kill_at = int(os.environ["KILL_AT"])
    original = SequentialCalibration.forward_block

    def forward_block(self, index, block, batches, keep_outputs):
        if index == kill_at and keep_outputs:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, index, block, batches, keep_outputs)

    SequentialCalibration.forward_block = forward_block
    sys.exit(main(sys.argv[1:]))
""")


def _weights(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return manifest["weights"]["sha256"], manifest


@pytest.fixture(scope="module")
def three_blocks(model_dir_factory):
    return model_dir_factory("llama", num_hidden_layers=3)


@pytest.mark.slow  # a child process per case
@pytest.mark.parametrize("job", sorted(JOBS))
def test_killed_in_the_middle_of_a_block_and_resumed_gives_the_uninterrupted_output(job, three_blocks, corpus_dir,
                                                                                   tmp_path, capsys):
    common = [*JOBS[job], "--model", str(three_blocks), "--data", str(corpus_dir), *SMALL]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "resumed"
    env = {**os.environ, "KILL_AT": "1"}  # the same threads as this process: the same rounding
    killed = subprocess.run([sys.executable, "-c", KILLER, *common, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state_dir = tmp_path / "resumed.partial"
    assert not out.exists()  # nothing half-written where the output goes
    state = json.loads((state_dir / "state.json").read_text())
    assert [b["file"] for b in state["blocks"]] == ["block-00000.safetensors"]  # block 0 saved, block 1 lost

    # A new run does not silently start over on top of it.
    capsys.readouterr()
    assert main([*common, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # Resuming with other settings is refused.
    assert main([*common, "--seed", "1", "--out", str(out), "--resume", str(state_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed" in err

    assert main([*common, "--out", str(out), "--resume", str(state_dir)]) == 0
    assert not state_dir.exists()
    whole, whole_manifest = _weights(tmp_path / "whole")
    resumed, resumed_manifest = _weights(out)
    assert resumed == whole  # every weight file byte for byte
    assert resumed_manifest["layers"] == whole_manifest["layers"]
    assert resumed_manifest["custom_layers"] == whole_manifest["custom_layers"]
    assert resumed_manifest.get("routers") == whole_manifest.get("routers")


@pytest.mark.slow  # a child process
def test_a_corrupted_state_directory_is_refused(three_blocks, corpus_dir, tmp_path, capsys):
    common = [*JOBS["prune"], "--model", str(three_blocks), "--data", str(corpus_dir), *SMALL]
    out = tmp_path / "out"
    env = {**os.environ, "KILL_AT": "2"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *common, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    state_dir = tmp_path / "out.partial"
    block = state_dir / "block-00001.safetensors"
    block.write_bytes(block.read_bytes()[:-10])
    before = sorted(p.name for p in state_dir.iterdir())
    capsys.readouterr()
    assert main([*common, "--out", str(out), "--resume", str(state_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "block-00001.safetensors" in err and "corrupted" in err
    assert sorted(p.name for p in state_dir.iterdir()) == before and not out.exists()
    assert main([*common, "--out", str(out), "--resume", str(tmp_path / "nothing")]) == 2
    assert "no interrupted run" in capsys.readouterr().err


@pytest.mark.slow  # a child process
def test_compare_killed_in_a_job_and_resumed_gives_the_uninterrupted_rows(three_blocks, corpus_dir, tmp_path):
    common = ["compare", "--model", str(three_blocks), "--data", str(corpus_dir), "--methods",
              "dense,sparsegpt,sparse-expansion", "--sparsity", "0.5", "--experts", "2", "--pca-reduction", "8",
              "--eval-samples", "3", *SMALL]
    assert main([*common, "--json", str(tmp_path / "whole.json")]) == 0
    assert not (tmp_path / "whole.json.partial").exists()  # the state goes once the report is written

    out = tmp_path / "resumed.json"
    # Killed in the middle of block 1 of the first job that walks the blocks (SparseGPT): the dense row is saved.
    killed = subprocess.run([sys.executable, "-c", KILLER, *common, "--json", str(out)],
                            env={**os.environ, "KILL_AT": "1"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state_dir = tmp_path / "resumed.json.partial"
    rows = json.loads((state_dir / "rows.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense"] and not out.exists()
    state = json.loads((state_dir / "job-001" / "state.json").read_text())
    assert state["blocks"][0]["file"] == "block-00000.safetensors"

    assert main([*common, "--json", str(out), "--resume", str(state_dir)]) == 0
    assert not state_dir.exists()
    whole = json.loads((tmp_path / "whole.json").read_text())["results"]
    resumed = json.loads(out.read_text())["results"]
    assert [r["method"] for r in resumed] == ["dense", "sparsegpt", "sparse-expansion"]
    for a, b in zip(whole, resumed):
        assert b["ppl"] == a["ppl"] and b["measured_sparsity"] == a["measured_sparsity"]


def test_activations_offloaded_to_disk_give_the_same_model(three_blocks, corpus_dir, tmp_path, monkeypatch):
    from sparse_expansion.calibration import engine

    written = []
    original = engine.OnDisk.__init__

    def spy(self, tensor, path):
        written.append(path)
        original(self, tensor, path)

    monkeypatch.setattr(engine.OnDisk, "__init__", spy)
    common = [*JOBS["expand"], "--model", str(three_blocks), "--data", str(corpus_dir), *SMALL]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0
    assert not written
    offload = tmp_path / "activations"
    assert main([*common, "--out", str(tmp_path / "disk"), "--offload-dir", str(offload)]) == 0
    # Three batches captured, then three per block, in files under the offload directory, all removed after.
    assert len(written) == 3 * 4 and all(offload in p.parents for p in written)
    assert list(offload.iterdir()) == []
    assert _weights(tmp_path / "disk")[0] == _weights(tmp_path / "memory")[0]
