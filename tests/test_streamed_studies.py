"""neurons and activations with one block in memory (`--streamed`): the calibration walks read each block from disk
at its turn, every evaluation runs block by block, the ablation's pruned copies are built into a scratch store;
the figures are the whole-model run's."""

import json

import pytest

from conftest import SMALL
from sparse_expansion.cli import main


def _run(command: list[str], streamed: bool) -> int:
    return main([*command, *(["--streamed"] if streamed else [])])


def test_neurons_ablation_streamed_gives_the_whole_models_figures(llama_dir, corpus_dir, tmp_path):
    common = ["neurons", "--model", str(llama_dir), "--data", str(corpus_dir), "--layers", "1", "--ablate",
              "--ablate-sparsity", "0.9", "--top-percent", "10", "--no-plots", *SMALL]
    found = {}
    for streamed in (False, True):
        out = tmp_path / f"n{int(streamed)}"
        assert _run([*common, "--out", str(out)], streamed) == 0
        found[streamed] = (json.loads((out / "summary.json").read_text()),
                           json.loads((out / "ablation.json").read_text())["results"])
    (whole, whole_rows), (streamed, streamed_rows) = found[False], found[True]
    assert streamed["streamed"] is True and whole["streamed"] is False
    for a, b in zip(whole["layers"], streamed["layers"], strict=True):
        assert b["wd"] == pytest.approx(a["wd"]), a["layer"]
    assert len(streamed_rows) == len(whole_rows) == 11  # dense + 5 criteria x (rows pruned, negatives zeroed)
    for a, b in zip(whole_rows, streamed_rows, strict=True):
        assert (a["variant"], a["criterion"], a["sparsity"]) == (b["variant"], b["criterion"], b["sparsity"])
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-6)
        assert b.get("measured_row_sparsity") == pytest.approx(a.get("measured_row_sparsity"))


def test_activations_streamed_gives_the_whole_models_figures(llama_dir, corpus_dir, tmp_path):
    common = ["activations", "--model", str(llama_dir), "--data", str(corpus_dir), "--ppl-increase", "0.01",
              "--baselines", *SMALL]
    found = {}
    for streamed in (False, True):
        path = tmp_path / f"a{int(streamed)}.json"
        assert _run([*common, "--json", str(path)], streamed) == 0
        found[streamed] = json.loads(path.read_text())
    whole, streamed = found[False], found[True]
    assert streamed["streamed"] is True and whole["streamed"] is False
    for key in ("dense_ppl", "sparse_ppl", "cett", "activation_ratio"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-6), key
    for name, points in whole["curves"].items():
        assert [p["ppl"] for p in streamed["curves"][name]] == pytest.approx([p["ppl"] for p in points], rel=1e-6)
    for name, point in whole["at_cett_ratio"].items():
        assert streamed["at_cett_ratio"][name]["ppl"] == pytest.approx(point["ppl"], rel=1e-6)


@pytest.mark.parametrize("command", [
    ["activations", "--ppl-increase", "0.05", "--out", "{tmp}/thresholded", "--model", "{dense}"],
    ["neurons", "--out", "{tmp}/n", "--expanded", "{expanded}", "--model", "{dense}"],
    # an expanded directory rebuilds its layers at each block's turn: the studies' hooks would be lost
    ["activations", "--ppl-increase", "0.05", "--json", "{tmp}/n/a.json", "--model", "{expanded}"],
    ["neurons", "--out", "{tmp}/n", "--model", "{expanded}"],
])
def test_what_needs_the_whole_model_is_refused_when_streamed(command, llama_dir, corpus_dir, tmp_path, capsys):
    expanded = tmp_path / "expanded"
    if "{expanded}" in command:
        assert main(["expand", "--model", str(llama_dir), "--data", str(corpus_dir), "--experts", "2",
                     "--sparsity", "0.5", "--out", str(expanded), *SMALL]) == 0
        capsys.readouterr()
    args = [a.format(tmp=tmp_path, expanded=expanded, dense=llama_dir) for a in command]
    code = main([*args, "--data", str(corpus_dir), "--streamed", *SMALL])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "stream" in err and "Traceback" not in err
    assert not (tmp_path / "thresholded").exists() and not (tmp_path / "n").exists()
