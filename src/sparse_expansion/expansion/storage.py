"""Save and load expanded models.

An expanded model directory holds:
- `config.json` and the tokenizer files of the original model (Hugging Face format);
- `expansion.json`: the format tag, the sha256 of the weights file (checked on load) and, for every
  expanded block, its routers (input width, PCA dimensions, experts) and expanded linears (router,
  experts, bias);
- `model.compressed.safetensors` (or `model.safetensors` with `--format dense`): the whole state
  dict, expert stacks `(k, out, in)` and router buffers (`mean`, `projection`, `centroids`) included;
  tied tensors are stored once; sparse tensors as bitmask or CSR (io/compressed.py);
- `manifest.json`: what was done (settings, data, measured sparsity, cluster sizes, costs).
Loading rebuilds the architecture from the config, swaps in the expanded layers and routers, and
loads the state dict strictly, so a reload reproduces the logits bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from ..errors import UsageError
from ..io import atomic_output_dir, load_compressed, save_compressed
from ..io.compressed import COMPRESSED_WEIGHTS_FILE, resolve_weight_format
from ..models.discovery import discover
from ..models.loading import save_config_files
from .modules import ROUTERS_ATTR, ExpertLinear
from .router import Router

FORMAT = "sparse-expansion/expanded-model"
FORMAT_VERSION = 1
STRUCTURE_FILE = "expansion.json"
WEIGHTS_FILE = "model.safetensors"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_expanded_dir(path: str | Path) -> bool:
    return (Path(path) / STRUCTURE_FILE).is_file()


def describe_structure(model, blocks_path: str, blocks) -> dict:
    layers = {}
    for index, block in enumerate(blocks):
        routers = getattr(block, ROUTERS_ATTR, None)
        if routers is None:
            continue
        router_names = {id(r): name for name, r in routers.items()}
        linears = {}
        for name, module in block.named_modules():
            if isinstance(module, ExpertLinear):
                linears[name] = {"router": router_names[id(module.router)], "experts": module.experts,
                                 "in_features": module.in_features, "out_features": module.out_features,
                                 "bias": module.bias is not None}
        layers[str(index)] = {
            "routers": {name: {"in_features": r.in_features, "components": r.components, "experts": r.experts}
                        for name, r in routers.items()},
            "linears": linears,
        }
    return {"format": FORMAT, "version": FORMAT_VERSION, "blocks_path": blocks_path, "blocks": layers}


def save_expanded(model, tokenizer, out: str | Path, manifest: dict, overwrite: bool = False,
                  weight_format: str = "auto") -> Path:
    """`weight_format`: `dense` (every expert stored with its zeros), `compressed` (bitmask/CSR per
    tensor, see io/compressed.py) or `auto` (compressed whenever that is smaller)."""
    state = model.state_dict()
    weight_format = resolve_weight_format(state, weight_format)
    layout = discover(model)
    structure = describe_structure(model, layout.blocks_path, layout.blocks)
    if not structure["blocks"]:
        raise UsageError("the model has no expanded layers to save")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_config_files(model, tmp)
        tokenizer.save_pretrained(tmp)
        if weight_format == "dense":
            weights_file = WEIGHTS_FILE
            save_safetensors_model(model, str(tmp / weights_file), metadata={"format": "pt", "producer": FORMAT})
        else:
            weights_file = COMPRESSED_WEIGHTS_FILE
            save_compressed(state, tmp / weights_file, metadata={"producer": FORMAT})
        structure["weights_file"] = weights_file
        structure["sha256"] = {weights_file: file_sha256(tmp / weights_file)}
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, indent=2) + "\n", encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def _rebuild(model, structure: dict) -> None:
    blocks = model.get_submodule(structure["blocks_path"])
    for index, spec in structure["blocks"].items():
        block = blocks[int(index)]
        routers = torch.nn.ModuleDict({
            name: Router(r["in_features"], r["components"], r["experts"]) for name, r in spec["routers"].items()
        })
        dtype = next(block.parameters()).dtype
        for name, lin in spec["linears"].items():
            # Placeholders, never written: the load below assigns the stored tensors in their place, so
            # untouched pages cost no memory (an expanded model is k times its dense size).
            weight = torch.empty(lin["experts"], lin["out_features"], lin["in_features"], dtype=dtype)
            bias = torch.empty(lin["out_features"], dtype=dtype) if lin["bias"] else None
            block.set_submodule(name, ExpertLinear(routers[lin["router"]], weight, bias))
        setattr(block, ROUTERS_ATTR, routers)


def load_expanded(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Rebuild an expanded model from its directory (CPU); returns (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    structure_file = path / STRUCTURE_FILE
    if not structure_file.is_file():
        raise UsageError(f"{path} is not an expanded model directory (no {STRUCTURE_FILE})")
    try:
        structure = json.loads(structure_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{structure_file} is not valid JSON: {exc}") from None
    if structure.get("format") != FORMAT or structure.get("version") != FORMAT_VERSION:
        raise UsageError(f"{structure_file} is not a {FORMAT} v{FORMAT_VERSION} description")
    weights_file = structure.get("weights_file", WEIGHTS_FILE)
    weights = path / weights_file
    if not weights.is_file():
        raise UsageError(f"{path} has no {weights_file}")
    expected = structure.get("sha256", {}).get(weights_file)
    if expected and file_sha256(weights) != expected:
        raise UsageError(f"{weights} is corrupted or truncated (sha256 differs from {STRUCTURE_FILE})")
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if dtype is not None:
        model.to(dtype)
    try:
        _rebuild(model, structure)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise UsageError(f"{structure_file} does not match the model in config.json: {exc}") from None
    try:
        if weights_file == COMPRESSED_WEIGHTS_FILE:
            model.load_state_dict(load_compressed(weights), strict=True, assign=True)
            if dtype is not None:
                model.to(dtype)
        else:
            load_safetensors_model(model, str(weights), strict=True)
    except SafetensorError as exc:
        raise UsageError(f"{weights} is corrupted or truncated: {str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:
        raise UsageError(f"{weights} does not match {STRUCTURE_FILE}: {str(exc).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer
