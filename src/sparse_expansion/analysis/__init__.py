"""Neuron entanglement analysis: Wasserstein distance of each FFN neuron's outputs to a Gaussian, mapping
difficulty, the sparsification ablation and Sparse Expansion's disentanglement.

wasserstein  - the per-neuron statistics (torch only): `wasserstein_to_gaussian`, `mapping_difficulty`
neurons      - stream a model block by block and measure every FFN linear's neurons
ablation     - choose neurons by a criterion; prune only them, or zero their negative pre-activations
disentangle  - cluster-weighted statistics of an expanded model's clusters
records, plots - what is written (JSON, CSV) and drawn
"""

from .wasserstein import disjoint_pairs, mapping_difficulty, top_fraction, wasserstein_to_gaussian

__all__ = ["disjoint_pairs", "mapping_difficulty", "top_fraction", "wasserstein_to_gaussian"]
