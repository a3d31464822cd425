"""Data-parallel calibration on torch.distributed (gloo, two CPU processes through torchrun): the same masks
and perplexities as one process, one report from rank 0, and a clear error for ranks started differently."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_args

# Every test starts Python processes (torchrun and its ranks, a model each): `make test-fast` skips them.
pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("distributed_job.py")
# The sizes distributed_job.py runs at: 10 calibration and 7 evaluation windows, shared out in batches of two.
SMALL = small_args(calib_samples=10, eval_samples=7, batch_size=2)


def _env():
    # One thread per process (two processes share the machine's cores) and no waiting threads spinning.
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}


def _torchrun(*args, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def one_and_two(llama_dir, corpus_dir, tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    done = subprocess.run([sys.executable, str(JOB), str(llama_dir), str(corpus_dir), str(one)], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    done = _torchrun(str(JOB), str(llama_dir), str(corpus_dir), str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    return one, two


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "sparse-expansion", "sparse-expansion-x16"])
def test_two_processes_give_the_masks_and_perplexity_of_one(one_and_two, method):
    one, two = one_and_two
    ppl1, ppl2 = (json.loads((d / "ppl.json").read_text()) for d in (one, two))
    assert (ppl1["world"], ppl2["world"]) == (1, 2)
    if method.startswith("sparse-expansion"):
        # Experts divided across the ranks: each holds the statistics of half the clusters (x4: none falls
        # back; x16: both ranks also hold the whole statistic its small clusters share)...
        (alone,), (first, second) = ppl1["statistic_bytes"][method], ppl2["statistic_bytes"][method]
        fallbacks = ppl1["ppl"][f"{method} fallback experts"]
        if method == "sparse-expansion":
            assert fallbacks == 0 and first == second == alone // 2
        else:
            assert 0 < fallbacks < 16 * 3 * 2 and max(first, second) < alone  # some clusters small, not all
        # ...and the routers and cluster sizes are the one-process ones: the same experts fall back.
        assert ppl2["ppl"][f"{method} fallback experts"] == fallbacks
    # One thread per process in both runs: the same arithmetic, so the same numbers bit for bit (the
    # acceptance asks for 1e-5; a sum of per-rank Hessians instead of the one-process order flips masks).
    assert ppl2["ppl"][method] == ppl1["ppl"][method]
    a, b = load_file(one / f"{method}.safetensors"), load_file(two / f"{method}.safetensors")
    assert a.keys() == b.keys()
    pruned = [k for k in a if "mlp" in k and k.endswith("weight")]
    assert pruned  # the FFN linears (and, expanded, their experts)
    for key in a:
        if key in pruned:
            assert torch.equal(a[key] == 0, b[key] == 0), f"{method}: mask of {key} differs"
        assert torch.equal(a[key], b[key]), f"{method}: {key} differs"
    # The run really pruned: half of each FFN weight (of each expert) is zero.
    assert all(abs((a[k] == 0).float().mean().item() - 0.5) < 0.02 for k in pruned)


def test_compare_under_torchrun_writes_one_report_with_the_one_process_figures(llama_dir, corpus_dir, tmp_path):
    # --streamed in both runs: each rank builds from a meta copy and evaluates from the job store rank 0 writes
    # (whole-model compare under torchrun is the same code as one process; tests/test_streamed_eval.py checks that
    # streamed and whole compare agree).
    args = ["-m", "sparse_expansion.cli", "compare", "--model", str(llama_dir), "--data", str(corpus_dir),
            "--methods", "dense,sparsegpt,sparse-expansion", "--sparsity", "0.5", "--experts", "2",
            "--pca-reduction", "8", "--streamed", *SMALL]
    single = subprocess.run([sys.executable, *args, "--json", str(tmp_path / "one.json")], capture_output=True,
                            text=True, timeout=300, env=_env())
    assert single.returncode == 0, single.stderr[-3000:]
    done = _torchrun(*args, "--json", str(tmp_path / "two.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 prints (its row in the table of runs and in the table over seeds), the other rank is quiet
    assert done.stdout.count("| sparsegpt |") == 2 and done.stdout.count("report: ") == 1
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("one", "two"))
    assert [r["method"] for r in two] == ["dense", "sparsegpt", "sparse-expansion"]
    for a, b in zip(one, two):
        assert b["ppl"] == a["ppl"]
        assert b["eval_tokens"] == a["eval_tokens"] and b["measured_sparsity"] == a["measured_sparsity"]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["one.json", "one.md", "one.png", "two.json", "two.md", "two.png"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_with_different_arguments_fail_with_one_line(llama_dir, corpus_dir, tmp_path):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = [sys.executable, "-m", "sparse_expansion.cli", "eval", "--model", str(llama_dir), "--data",
                   str(corpus_dir), "--seed", str(rank), *SMALL, "--json", str(tmp_path / "out.json")]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "different arguments" in lines[0] and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "out.json").exists()


def test_commands_that_do_not_shard_refuse_torchrun(llama_dir, tmp_path):
    done = _torchrun("-m", "sparse_expansion.cli", "generate", "--model", str(llama_dir), "--prompt", "hello")
    assert done.returncode != 0
    assert "generate does not run under torchrun" in done.stderr
