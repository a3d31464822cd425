"""The one state-directory implementation (io/state_dir.py): create or resume, the fingerprint check, atomic
state writes, checksummed files, discard, and rank 0 first under torch.distributed."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sparse_expansion.errors import UsageError
from sparse_expansion.io.block_store import BlockStore
from sparse_expansion.io.state_dir import StateDir, first_difference

SETTINGS = {"method": "sparsegpt", "seed": 0, "sparsity": 0.5}


def test_a_new_directory_resumes_with_what_it_saved(tmp_path):
    path = tmp_path / "run.partial"
    new = StateDir(path, SETTINGS, initial={"rows": []})
    assert json.loads((path / "state.json").read_text()) == {"fingerprint": SETTINGS, "rows": []}
    new.state["rows"].append({"ppl": 12.5})
    new.save()
    resumed = StateDir(path, dict(reversed(SETTINGS.items())), resume=True, initial={"rows": []})
    assert resumed.state["rows"] == [{"ppl": 12.5}]
    assert StateDir(path, SETTINGS, resume=None, initial={"rows": []}).state["rows"] == [{"ppl": 12.5}]


def test_a_fingerprint_mismatch_names_the_first_differing_setting(tmp_path):
    StateDir(tmp_path / "s", SETTINGS)
    with pytest.raises(UsageError) as caught:
        StateDir(tmp_path / "s", {**SETTINGS, "seed": 1, "sparsity": 0.6}, resume=True)
    message = str(caught.value)
    assert message == (f"resume {tmp_path / 's'}: the interrupted run had seed=0, this one 1; resume with the "
                       "same options")
    StateDir(tmp_path / "study", {"runs": {"relu": {"steps": 10}}}, resume=None, what="law study")
    with pytest.raises(UsageError, match=r"holds a law study with other settings \(it had runs.relu.steps=10, "
                                         r"this one 20\)") as caught:
        StateDir(tmp_path / "study", {"runs": {"relu": {"steps": 20}}}, resume=None, what="law study")
    assert len(str(caught.value).splitlines()) == 1
    assert first_difference({"a": 1}, {"a": 1, "b": None}) is None
    assert first_difference({"a": 1}, {}) == ("a", 1, None)


def test_directories_that_are_not_states_are_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="exists and is not a law study"):
        StateDir(other, SETTINGS, resume=None, file="study.json", what="law study")
    with pytest.raises(UsageError, match="no interrupted compare there"):
        StateDir(other, SETTINGS, resume=True, file="rows.json", what="compare")
    (tmp_path / "a-file").write_text("keep")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        StateDir(tmp_path / "a-file", SETTINGS)
    StateDir(tmp_path / "taken", SETTINGS)
    with pytest.raises(UsageError, match="already holds an interrupted run's state; pass resume"):
        StateDir(tmp_path / "taken", SETTINGS)
    (tmp_path / "taken" / "state.json").write_text("{half")
    with pytest.raises(UsageError, match="is not valid JSON"):
        StateDir(tmp_path / "taken", SETTINGS, resume=True)
    (tmp_path / "taken" / "state.json").write_text('{"fingerprint": {}, "rows": 3}')
    with pytest.raises(UsageError, match="is not the state of a sparse-expansion run"):
        StateDir(tmp_path / "taken", {}, resume=True, initial={"rows": []})
    assert (other / "notes.txt").read_text() == "keep" and (tmp_path / "a-file").read_text() == "keep"


# Saves a state, then is killed (SIGKILL: no cleanup) halfway through writing the next one.
KILLED_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from sparse_expansion.io import atomic
    from sparse_expansion.io.state_dir import StateDir

    state = StateDir(sys.argv[1], {"seed": 0}, initial={"step": 0})
    state.state["step"] = 1
    state.save()
    real_fdopen = os.fdopen

    class Dying:
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    atomic.os.fdopen = lambda *args, **kwargs: Dying(real_fdopen(*args, **kwargs))
    state.state["step"] = 2
    state.save()
""")


def test_a_kill_in_the_middle_of_a_state_write_leaves_the_previous_state(tmp_path):
    path = tmp_path / "state"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(path)], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert any(p.name.endswith(".tmp") for p in path.iterdir())  # the half-written one, never renamed
    assert StateDir(path, {"seed": 0}, resume=True, initial={"step": 0}).state["step"] == 1


class Checksummed(StateDir):
    def verify_files(self):
        for name, digest in self.state["files"].items():
            self.verify(name, digest)


def test_a_file_whose_checksum_changed_is_refused(tmp_path):
    path = tmp_path / "s"
    state = Checksummed(path, SETTINGS, initial={"files": {}})
    state.state["files"]["data.bin"] = state.write_file("data.bin", lambda tmp: open(tmp, "wb").write(b"12345"))
    state.save()
    assert (path / "data.bin").read_bytes() == b"12345" and not any(p.name.endswith(".tmp") for p in path.iterdir())
    Checksummed(path, SETTINGS, resume=True, initial={"files": {}})
    (path / "data.bin").write_bytes(b"12346")
    with pytest.raises(UsageError, match=r"data.bin is missing or corrupted \(its sha256 differs from state.json\)"):
        Checksummed(path, SETTINGS, resume=True, initial={"files": {}})


def test_a_block_store_refuses_a_corrupted_block_and_discards(tmp_path):
    path = tmp_path / "out.partial"
    store = BlockStore(path, SETTINGS)
    store.save_block(0, {"model.layers.0.mlp.weight": torch.ones(4, 4)}, {}, {"layers": {}}, "dense")
    resumed = BlockStore(path, SETTINGS, resume=True)
    assert resumed.done == 1 and torch.equal(resumed.load_block(0)["model.layers.0.mlp.weight"], torch.ones(4, 4))
    block = path / "block-00000.safetensors"
    block.write_bytes(block.read_bytes()[:-4])
    with pytest.raises(UsageError, match="block-00000.safetensors is missing or corrupted"):
        BlockStore(path, SETTINGS, resume=True)
    resumed.discard()
    assert not path.exists()


def _two_ranks(rank: int, init: str, path: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        outcome = {"rows": StateDir(path, SETTINGS, initial={"rows": []}).state["rows"]}
        try:
            StateDir(path, {**SETTINGS, "seed": 1}, resume=True)  # rank 0 refuses it: so must rank 1, not hang
        except UsageError as exc:
            outcome["refused"] = str(exc)
        with open(os.path.join(results, f"rank{rank}.json"), "w") as handle:
            json.dump(outcome, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two torchrun-style processes
def test_rank_0_creates_first_and_its_refusal_reaches_every_rank(tmp_path):
    path = tmp_path / "state"
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_two_ranks, args=(init, str(path), str(tmp_path)), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["rows"] == [] and "had seed=0, this one 1" in outcomes[0]["refused"]
