"""Layer kinds and the protocol they share (protocol.py). Importing this package registers every kind."""

from . import expert_linear, linear, router, selective_linear, semi_structured, sparse_linear, thresholded_linear  # noqa: F401  (registration)
from .expert_linear import ROUTERS_ATTR, ExpertLinear, clear_router_memos
from .protocol import (
               AccelerateContext,
               Converter,
               LayerKind,
               converters,
               is_linear,
               kind_named,
               kind_of,
               kinds,
               linear_weight,
               register,
               register_converter,
               set_linear_weight,
)
from .router import Router, by_expert
from .selective_linear import SelectiveExpertLinear
from .sparse_linear import CSRWeight, SparseLinear
from .switch import SwitchCache
from .thresholded_linear import ThresholdedLinear

__all__ = ["AccelerateContext", "CSRWeight", "Converter", "ExpertLinear", "LayerKind", "ROUTERS_ATTR", "Router",
           "SelectiveExpertLinear", "SparseLinear", "SwitchCache", "ThresholdedLinear", "by_expert",
           "clear_router_memos", "converters", "is_linear", "kind_named", "kind_of", "kinds", "linear_weight",
           "register", "register_converter", "set_linear_weight"]
