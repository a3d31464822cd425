"""Loading causal LMs, discovering their decoder blocks and linear layers, and costing them."""

from .costs import ffn_costs, weight_bytes_per_token
from .discovery import BlockLinear, ModelLayout, discover, linear_weight, set_linear_weight
from .loading import LoadedModel, load_model

__all__ = [
    "BlockLinear",
    "LoadedModel",
    "ModelLayout",
    "discover",
    "ffn_costs",
    "linear_weight",
    "load_model",
    "set_linear_weight",
    "weight_bytes_per_token",
]
