"""Find decoder blocks and their linear layers in any causal LM, without per-family code.

Decoder blocks are the largest `nn.ModuleList` whose children share one class and hold linear layers
(`model.layers`, `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`, ...). Inside a block, a
linear layer whose path mentions attention ("attn", "attention") is an attention linear; every other
one is an FFN linear (`mlp.gate_proj`, OPT's `fc1`, GPT-2's `mlp.c_fc`, GPT-NeoX's
`mlp.dense_h_to_4h`, ...). FFN linears are split by shape into inputs (read the block's hidden state:
gate/up/fc1) and outputs (read the intermediate activation: down/fc2).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UsageError
from ..layers.protocol import is_linear, linear_shape, linear_weight, set_linear_weight

__all__ = ["SCOPES", "BlockLinear", "ModelLayout", "discover", "is_linear", "linear_shape", "linear_weight",
           "set_linear_weight"]

SCOPES = ("ffn", "all")
_ATTENTION_MARKERS = ("attn", "attention")


@dataclass(frozen=True)
class BlockLinear:
    name: str  # path inside the block, e.g. "mlp.gate_proj"
    kind: str  # "attention" or "ffn"
    role: str  # "attention", "ffn_in" (reads the block's hidden state) or "ffn_out"
    in_features: int
    out_features: int


@dataclass
class ModelLayout:
    blocks_path: str
    blocks: nn.ModuleList
    linears: list[BlockLinear]  # the same for every block (blocks share one class)
    hidden_size: int

    def select(self, scope: str) -> list[BlockLinear]:
        if scope not in SCOPES:
            raise UsageError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
        if scope == "all":
            return list(self.linears)
        return [lin for lin in self.linears if lin.kind == "ffn"]

    def modules(self, block_index: int, scope: str) -> dict[str, nn.Module]:
        block = self.blocks[block_index]
        return {lin.name: block.get_submodule(lin.name) for lin in self.select(scope)}

    def input_groups(self, scope: str = "ffn") -> dict[str, list[str]]:
        """The selected linears grouped by the tensor they read: the FFN inputs (gate and up, or fc1) read
        the same hidden state and form one group, "in"; every other linear is a group of its own (named
        "out" for a single FFN output). Statistics of a group's input are computed once."""
        selected = self.select(scope)
        groups: dict[str, list[str]] = {}
        inputs = [lin.name for lin in selected if lin.role == "ffn_in"]
        if inputs:
            groups["in"] = inputs
        outputs = [lin.name for lin in selected if lin.role == "ffn_out"]
        for i, name in enumerate(outputs):
            groups["out" if len(outputs) == 1 else f"out{i}"] = [name]
        for lin in selected:
            if lin.kind == "attention":
                groups[lin.name] = [lin.name]
        return groups


def _block_lists(model: nn.Module):
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        first_type = type(module[0])
        if not all(type(child) is first_type for child in module):
            continue
        if not any(is_linear(sub) for sub in module[0].modules()):
            continue
        yield name, module


def _hidden_size(model: nn.Module, linears: dict[str, nn.Module]) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    # Fall back to the most common input width among the block's linears.
    widths = [linear_shape(m)[1] for m in linears.values()]
    return max(set(widths), key=widths.count)


def discover(model: nn.Module) -> ModelLayout:
    """Locate the decoder blocks and classify their linear layers."""
    candidates = list(_block_lists(model))
    if not candidates:
        raise UsageError(f"no decoder blocks found in {type(model).__name__} (no list of identical blocks "
                         "holding linear layers)")

    def size(item):
        return sum(p.numel() for p in item[1].parameters())

    blocks_path, blocks = max(candidates, key=size)
    block_linears = {name: m for name, m in blocks[0].named_modules() if name and is_linear(m)}
    hidden = _hidden_size(model, block_linears)
    linears = []
    for name, module in block_linears.items():
        out_features, in_features = linear_shape(module)
        attention = any(marker in part.lower() for part in name.split(".") for marker in _ATTENTION_MARKERS)
        if attention:
            kind, role = "attention", "attention"
        else:
            kind = "ffn"
            role = "ffn_in" if in_features == hidden and out_features != hidden else "ffn_out"
            if in_features == hidden and out_features == hidden:
                # A square FFN layer is ambiguous by shape; its position decides (inputs come first).
                role = "ffn_out" if any(lin.role == "ffn_in" for lin in linears) else "ffn_in"
        linears.append(BlockLinear(name, kind, role, in_features, out_features))
    if not any(lin.kind == "ffn" for lin in linears):
        raise UsageError(f"no FFN linear layers found in the blocks at {blocks_path}")
    return ModelLayout(blocks_path=blocks_path, blocks=blocks, linears=linears, hidden_size=hidden)
