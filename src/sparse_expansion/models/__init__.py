"""Loading causal LMs and discovering their decoder blocks and linear layers."""

from .discovery import BlockLinear, ModelLayout, discover, linear_weight, set_linear_weight
from .loading import LoadedModel, load_model

__all__ = [
    "BlockLinear",
    "LoadedModel",
    "ModelLayout",
    "discover",
    "linear_weight",
    "load_model",
    "set_linear_weight",
]
