"""The law study's pieces: training resumes exactly, the fits recover known laws, bad output directories."""

import json

import numpy as np
import pytest
import torch

from sparse_expansion.cli import main
from sparse_expansion.errors import UsageError
from sparse_expansion.training.law import fit_law, relu_law, silu_law
from sparse_expansion.training.trainer import TrainConfig, checkpoints, compact_vocabulary, train


def _tokens():
    return torch.randint(0, 50, (4000,), generator=torch.Generator().manual_seed(0))


TINY = TrainConfig(hidden=16, layers=1, heads=2, vocab=50, seqlen=16, batch=4, steps=6, checkpoint_every=3)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight = train(tmp_path / "a", TINY, _tokens(), progress=False)
    assert [p.name for p in straight] == ["ckpt-000003", "ckpt-000006"]
    resumed_dir = tmp_path / "b"
    train(resumed_dir, TINY, _tokens(), progress=False)
    import shutil

    shutil.rmtree(resumed_dir / "ckpt-000006")  # as if killed after the first checkpoint
    resumed = train(resumed_dir, TINY, _tokens(), progress=False)
    from safetensors.torch import load_file

    a = load_file(straight[-1] / "model.safetensors")
    b = load_file(resumed[-1] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed[-1] / "state.json").read_text())["tokens"] == 6 * 4 * 16


def test_a_run_refuses_a_directory_that_is_not_one(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="not a training run"):
        train(other, TINY, _tokens(), progress=False)
    assert (other / "notes.txt").read_text() == "keep" and not checkpoints(other)


def test_compact_vocabulary_keeps_the_most_frequent_ids():
    ids = torch.tensor([5, 5, 5, 9, 9, 2, 7])
    mapping = compact_vocabulary(ids, 3)
    assert mapping[5] == 0 and mapping[9] == 1 and mapping[2] == 2 and mapping[7] == 2


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_fits_recover_a_known_law(activation):
    d = np.linspace(0.5, 40, 12)
    if activation == "relu":
        truth = {"c": 1.2, "alpha": 0.4, "b": -1.0, "A0": 0.07}
        a = relu_law(d, truth["c"], truth["alpha"], truth["b"], truth["A0"])
    else:
        truth = {"c": 0.1, "alpha": 0.6, "A0": 0.39}
        a = silu_law(d, truth["c"], truth["alpha"], truth["A0"])
    tokens = [0.0, *(d * 1e6)]
    fit = fit_law(activation, tokens, [float(a[0]), *a])  # the first point is warm-up and is dropped
    assert fit["rmse"] < 1e-4
    assert fit["A0"] == pytest.approx(truth["A0"], abs=2e-3)


def test_law_bad_output_directory(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    capsys.readouterr()
    code = main(["law", "--out", str(out), "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "not a law study" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["data.csv"]
