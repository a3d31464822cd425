"""Zero-shot tasks through lm-evaluation-harness: the packaged offline task on tiny dense and expanded
models, lm-eval's accuracy against log-likelihoods computed here, and the one-line errors."""

import json
import math
import sys

import pytest
import torch

import sparse_expansion
from conftest import make_model, random_windows, run_cli
from sparse_expansion import UsageError, load
from sparse_expansion.evaluation import zero_shot
from sparse_expansion.expansion import ExpansionConfig, ExpertLinear, expand_model
from sparse_expansion.models import discover
from sparse_expansion.pruning import SparsitySpec

TASK = zero_shot.LOCAL_TASK
# lm-eval indexes its thousands of task files once per process (about 12 s on two cores): the tests that open
# its task registry are slow, so that `make test-fast` pays none of it.
indexes_tasks = pytest.mark.slow
ROWS = [json.loads(line) for line in
        (zero_shot.PACKAGED_TASKS_DIR / "local_mc" / "local_mc.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def expanded_dir(tmp_path_factory, tokenizer):
    model = make_model("llama", seed=1)
    expand_model(model, discover(model), random_windows(), SparsitySpec(0.5),
                 ExpansionConfig(experts=3, pca_reduction=8), progress=False)
    path = tmp_path_factory.mktemp("expanded") / "se"
    sparse_expansion.save(model, tokenizer, path)
    return path


def test_the_packaged_task_is_well_formed():
    assert 20 <= len(ROWS) <= 40
    for row in ROWS:
        assert 2 <= len(row["choices"]) <= 4 and 0 <= row["answer"] < len(row["choices"])
        assert len(set(row["choices"])) == len(row["choices"])
    assert len({row["question"] for row in ROWS}) == len(ROWS)


@indexes_tasks
@pytest.mark.parametrize("kind", ["dense", "expanded"])
def test_cli_runs_the_packaged_task_in_memory(kind, llama_dir, expanded_dir, tmp_path, capsys):
    model_dir = llama_dir if kind == "dense" else expanded_dir
    out = tmp_path / "lm.json"
    code, stdout, err = run_cli(["lm-eval", "--model", str(model_dir), "--tasks", TASK, "--json", str(out),
                                 "--quiet"], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    metrics = result["results"][TASK]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert metrics["acc"] * len(ROWS) == pytest.approx(round(metrics["acc"] * len(ROWS)))
    assert metrics["samples"] == metrics["samples_total"] == len(ROWS)
    # The standard error of a mean of 0/1 scores (sample standard deviation over sqrt(n)).
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(metrics["acc"] * (1 - metrics["acc"]) / (len(ROWS) - 1)))
    assert metrics["num_fewshot"] == 0
    assert result["config"]["num_fewshot"] == 0 and result["config"]["limit"] is None
    assert result["model"] == str(model_dir)
    assert TASK in stdout and "acc_norm" in stdout
    assert not list(tmp_path.glob(".lm.json.*"))  # written atomically
    if kind == "expanded":  # the directory is only loadable by this package
        assert any(isinstance(m, ExpertLinear) for m in load(str(model_dir)).model.modules())
    code, _, err = run_cli(["lm-eval", "--model", str(model_dir), "--tasks", TASK, "--limit", "5", "--json",
                            str(out), "--quiet"], capsys)
    assert code == 0, err
    limited = json.loads(out.read_text())
    assert limited["results"][TASK]["samples"] == 5 and limited["config"]["limit"] == 5


def direct_loglikelihoods(model, tokenizer, row):
    """Summed log-probability of " choice" after "Question: ...\\nAnswer:", computed here without lm-eval."""
    context = f"Question: {row['question']}\nAnswer:"
    context_ids = tokenizer.encode(context)
    scores = []
    for choice in row["choices"]:
        ids = tokenizer.encode(f"{context} {choice}")
        assert ids[:len(context_ids)] == context_ids and len(ids) > len(context_ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        positions = torch.arange(len(context_ids) - 1, len(ids) - 1)
        scores.append(logprobs[positions, torch.tensor(ids[len(context_ids):])].sum().item())
    return scores


@indexes_tasks
@pytest.mark.parametrize("kind", ["dense", "expanded"])
def test_accuracy_is_the_argmax_of_the_choice_loglikelihoods(kind, llama_dir, expanded_dir):
    loaded = load(str(llama_dir if kind == "dense" else expanded_dir))
    summary = zero_shot.run_lm_eval(loaded, [TASK], batch_size=1, log_samples=True, quiet=True)
    samples = summary["samples"][TASK]
    assert [s["doc_id"] for s in samples] == list(range(len(ROWS)))
    correct = correct_norm = 0
    for row, sample in zip(ROWS, samples):
        scores = direct_loglikelihoods(loaded.model, loaded.tokenizer, row)
        assert sample["loglikelihoods"] == pytest.approx(scores, abs=1e-4)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        normalized = [s / len(c) for s, c in zip(scores, row["choices"])]
        best_norm = max(range(len(scores)), key=lambda i: (normalized[i], -i))
        correct += best == row["answer"]
        correct_norm += best_norm == row["answer"]
    metrics = summary["results"][TASK]
    assert metrics["acc"] == correct / len(ROWS)
    assert metrics["acc_norm"] == correct_norm / len(ROWS)


@indexes_tasks
def test_unknown_task_is_a_one_line_error(llama_dir, capsys):
    code, stdout, err = run_cli(["lm-eval", "--model", str(llama_dir), "--tasks", f"{TASK},boolqq", "--quiet"],
                                capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "unknown lm-eval task 'boolqq'" in err and "boolq" in err
    for bad in (["--tasks", " , "], ["--limit", "0"], ["--batch-size", "0"], ["--include-path", "/no/such/dir"]):
        code, _, err = run_cli(["lm-eval", "--model", str(llama_dir), *bad, "--quiet"], capsys)
        assert code == 2 and err.count("\n") == 1, err


@indexes_tasks
def test_default_tasks_are_the_sparsegpt_wanda_suite():
    """The zero-shot suite of the SparseGPT and Wanda papers' tables, each a task lm-eval knows."""
    from sparse_expansion.workflow.settings import LmEvalSettings

    suite = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    manager = zero_shot.task_manager()
    assert zero_shot.check_tasks(manager, LmEvalSettings().tasks) == suite


@indexes_tasks
def test_hub_task_offline_is_a_one_line_error(llama_dir, capsys, monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    # Offline, with empty caches, whatever the environment says.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, stdout, err = run_cli(["lm-eval", "--model", str(llama_dir), "--tasks", "boolq", "--limit", "2",
                                 "--quiet"], capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "could not download" in err and "offline?" in err


def test_missing_lm_eval_says_how_to_install_it(llama_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(UsageError, match=r"pip install 'sparse-expansion\[lm-eval\]'"):
        zero_shot.run_lm_eval(load(str(llama_dir)), [TASK])
    code, _, err = run_cli(["lm-eval", "--model", str(llama_dir), "--tasks", TASK, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "sparse-expansion[lm-eval]" in err
