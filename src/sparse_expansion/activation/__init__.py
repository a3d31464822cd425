"""Activation sparsity (the Sparsing Law study): CETT, per-layer thresholds, the PPL-p% search, and applying
the thresholds to a model's FFN intermediate activations.

cett       - the per-layer math (torch only): neuron contributions, CETT, the threshold for a target CETT
thresholds - apply per-neuron thresholds to a model (and count what they zero); the PPL-p% search
"""

from .cett import cett, contributions, down_column_norms, threshold_for_cett

__all__ = ["cett", "contributions", "down_column_norms", "threshold_for_cett"]
