"""The layer protocol: every kind of layer the toolkit creates declares, in one place,

- how it is saved (`describe`: a small JSON-ready spec, or None when the model's own class rebuilds it) and
  rebuilt (`rebuild`: an empty module of the right shapes whose tensors the state dict then fills);
- what one token costs: `flops_per_token` (2 per multiply-add actually computed: non-zero weights only, as an
  ideal sparse kernel does) and `bytes_per_token` (weight bytes read to process one token);
- how it switches to a faster kernel (`accelerate`: returns the module to use instead, or the module itself;
  a kind may try the converters registered for it, in priority order) and which accelerated copies it then
  holds (`fast_paths`: each with its measured switch);
- for linear kinds, its weight as an (out_features, in_features) matrix (or a stack of them).

Discovery, costs, storage, inference and the benchmarks ask the registry (`kind_of`) instead of checking
types, so a new layer kind is one new module that registers its `LayerKind`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AccelerateContext:
    """What `LayerKind.accelerate` needs: the mode and the shared switch measurements."""

    mode: str = "auto"  # auto: measured per shape and token count; always: the fast path everywhere; off
    switches: object = None  # a SwitchCache (layers/switch.py), shared by the layers of one model
    cpu_kernels: bool = False  # the native CSR kernels are built and loaded


class LayerKind:
    name: str = ""
    types: tuple[type, ...] = ()
    linear: bool = False  # a linear map that discovery treats as a linear layer (prunable, costed)
    router: bool = False  # routing overhead of the FFN (costed with it)
    routed: bool = False  # a stack of expert matrices, one of which each token goes through
    priority: int = 0  # kinds with a higher priority are matched first (subclasses before their bases)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.types)

    # -- linear kinds -------------------------------------------------------------------------------------
    def weight(self, module: nn.Module) -> torch.Tensor:
        """(out_features, in_features), or (experts, out_features, in_features) for expert stacks."""
        return module.weight

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """(out_features, in_features), without materialising anything."""
        out_features, in_features = self.weight(module).shape[-2:]
        return out_features, in_features

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.dtype))

    # -- storage ------------------------------------------------------------------------------------------
    def describe(self, module: nn.Module, name_of: Callable[[nn.Module], str]) -> dict | None:
        """A JSON-ready spec to rebuild the module, or None when the model's own code builds it."""
        return None

    def rebuild(self, spec: dict, resolve: Callable[[str], nn.Module], dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError(f"{self.name} layers are built by the model itself")

    # -- costs --------------------------------------------------------------------------------------------
    def flops_per_token(self, module: nn.Module) -> float:
        return 0.0

    def bytes_per_token(self, module: nn.Module) -> float:
        return float(sum(t.numel() * t.element_size() for t in (*module.parameters(recurse=False),
                                                               *module.buffers(recurse=False))))

    # -- inference ----------------------------------------------------------------------------------------
    def accelerate(self, module: nn.Module, context: AccelerateContext) -> nn.Module:
        return module

    def fast_paths(self, module: nn.Module) -> list:
        """The accelerated copies the layer holds (each a `Switched`, layers/switch.py: it decides per token
        count between the copy and the dense product): what `accelerate` switched. Default: none."""
        return []

    def compact(self, module: nn.Module) -> nn.Module:
        """Hold the layer in its compressed form only (inference; no dense copy kept). Default: as it is."""
        return module

    def release(self, module: nn.Module) -> None:
        """Drop the copies the layer holds beside its parameters and buffers (compressed or accelerated forms),
        for a block whose tensors are being freed (back to meta): it keeps nothing and runs only once its
        tensors are loaded and the layer rebuilt. Default: it holds none."""

    def packed_parameter(self, module: nn.Module) -> str | None:
        """The parameter that loading for inference may hand over as sparse forms instead of a dense tensor
        (`hold_packed`), or None. Default: none."""
        return None

    def hold_packed(self, module: nn.Module, kernels: list) -> nn.Module:
        """The layer holding `kernels` (one sparse form per matrix of `packed_parameter`, layers/packed.py) as all
        there is of that parameter: the module itself, or the one to use instead."""
        raise NotImplementedError(f"{self.name} layers hold no sparse forms")


@dataclass(frozen=True)
class Converter:
    """A faster form of the layers of one kind: `convert(module, context)` returns the module to use instead,
    or None where it does not apply. A kind tries its converters from the highest priority down."""

    name: str
    source: str  # the name of the kind whose layers it converts
    priority: int
    convert: Callable[[nn.Module, AccelerateContext], nn.Module | None]


_REGISTRY: dict[str, LayerKind] = {}
_CONVERTERS: dict[str, Converter] = {}
_HOLDERS: dict[str, Callable[[nn.Module, list], nn.Module]] = {}


def register_holder(source: str, hold: Callable[[nn.Module, list], nn.Module]) -> None:
    """The layer that holds a `source` layer's weight in its sparse form only (a kind whose compact form is another
    kind's, as a plain linear layer's is `SparseLinear`)."""
    if source in _HOLDERS:
        raise ValueError(f"a holder for {source!r} layers registered twice")
    _HOLDERS[source] = hold


def holder(source: str) -> Callable[[nn.Module, list], nn.Module] | None:
    return _HOLDERS.get(source)


def register(kind: LayerKind) -> LayerKind:
    if kind.name in _REGISTRY:
        raise ValueError(f"layer kind {kind.name!r} registered twice")
    _REGISTRY[kind.name] = kind
    return kind


def kinds() -> list[LayerKind]:
    return sorted(_REGISTRY.values(), key=lambda k: -k.priority)


def register_converter(source: str, name: str, convert: Callable[[nn.Module, AccelerateContext], nn.Module | None],
                       priority: int) -> Converter:
    """Register a faster form for `source` layers. Priorities are explicit and distinct per source, so the
    order in which converters are tried never depends on the order in which their modules were imported."""
    if name in _CONVERTERS:
        raise ValueError(f"converter {name!r} registered twice")
    for other in _CONVERTERS.values():
        if other.source == source and other.priority == priority:
            raise ValueError(f"converters {other.name!r} and {name!r} of {source!r} layers both have priority "
                             f"{priority}: give them distinct priorities")
    converter = Converter(name, source, priority, convert)
    _CONVERTERS[name] = converter
    return converter


def converters(source: str) -> list[Converter]:
    """The converters of `source` layers, highest priority first (the order a kind tries them in)."""
    return sorted((c for c in _CONVERTERS.values() if c.source == source), key=lambda c: -c.priority)


def kind_named(name: str) -> LayerKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown layer kind {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def kind_of(module: nn.Module) -> LayerKind | None:
    for kind in kinds():
        if kind.matches(module):
            return kind
    return None


def is_linear(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.linear


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an (out_features, in_features) tensor (a view where the layer stores it transposed);
    (experts, out_features, in_features) for an expert stack."""
    return kind_of(module).weight(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer of any kind."""
    return kind_of(module).shape(module)


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out_features, in_features) weight back, in the module's own layout and dtype."""
    kind_of(module).set_weight(module, weight)


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def unique_tensor_bytes(tensors) -> int:
    """Bytes of the tensors with shared storage counted once (tied embeddings)."""
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}
    return tensor_bytes(*unique.values())
