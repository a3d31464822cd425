"""One model directory format: every save path writes checksums; loading refuses damaged files by name."""

from __future__ import annotations

import json

import pytest
import torch

import sparse_expansion
from conftest import make_model, random_windows
from sparse_expansion import UsageError
from sparse_expansion.expansion import ExpansionConfig, expand_model
from sparse_expansion.io.model_dir import MANIFEST_FILE, file_sha256
from sparse_expansion.models import discover
from sparse_expansion.pruning import SparsitySpec, get_method, prune_model


def _model(kind: str):
    model = make_model("llama")
    if kind == "pruned":
        prune_model(model, discover(model), random_windows(), get_method("sparsegpt"), SparsitySpec(0.6),
                    progress=False)
    elif kind == "expanded":
        expand_model(model, discover(model), random_windows(), SparsitySpec(0.6),
                     ExpansionConfig(experts=3, pca_reduction=8), progress=False)
    return model


CASES = [("dense", "dense"), ("pruned", "dense"), ("pruned", "compressed"), ("expanded", "dense"),
         ("expanded", "compressed")]


@pytest.mark.parametrize("kind, weight_format", CASES)
def test_every_save_path_writes_checksums_and_reloads_exactly(kind, weight_format, tokenizer, tmp_path):
    model = _model(kind)
    out = sparse_expansion.save(model, tokenizer, tmp_path / "m", format=weight_format)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    weight_files = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert weight_files and sorted(manifest["weights"]["sha256"]) == weight_files
    for name, digest in manifest["weights"]["sha256"].items():
        assert file_sha256(out / name) == digest
    assert bool(manifest["custom_layers"]) == (kind == "expanded")
    loaded = sparse_expansion.load(out).model
    x = random_windows(2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


@pytest.mark.parametrize("kind, weight_format", CASES)
@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_weight_files_are_refused_by_name(kind, weight_format, damage, tokenizer, tmp_path):
    out = sparse_expansion.save(_model(kind), tokenizer, tmp_path / "m", format=weight_format)
    name = next(iter(json.loads((out / MANIFEST_FILE).read_text())["weights"]["sha256"]))
    target = out / name
    data = bytearray(target.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # same size, one byte in the tensor data flipped
        data[len(data) - 7] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=rf"{name}.*(corrupted|truncated)") as error:
        sparse_expansion.load(out)
    assert "\n" not in str(error.value)


def test_missing_weight_file_and_bad_manifest(tokenizer, tmp_path):
    out = sparse_expansion.save(_model("expanded"), tokenizer, tmp_path / "m")
    (out / "model.compressed.safetensors").unlink()
    with pytest.raises(UsageError, match="model.compressed.safetensors is missing"):
        sparse_expansion.load(out)
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        sparse_expansion.load(out)


def test_the_embedded_model_cache_is_written_with_checksums(tmp_path, monkeypatch):
    """The default model's cache goes through the same save path (a tiny stand-in for the GGUF conversion)."""
    from sparse_expansion.models import loading

    monkeypatch.setenv("SPARSE_EXPANSION_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: tmp_path / "stand-in.gguf")
    from conftest import make_tokenizer

    monkeypatch.setattr(loading, "_load_gguf", lambda path, dtype, quiet: (make_model("llama"), make_tokenizer()))
    target = loading.default_model_dir(quiet=True)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    assert manifest["weights"]["form"] == "hf" and manifest["weights"]["sha256"]
