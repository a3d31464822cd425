"""CETT (cumulative errors of tail truncation; Zhang et al. 2024, used by the Sparsing Law paper).

For one FFN with intermediate activation x (tokens, d_f) (act(gate)·up for a gated MLP, act(fc1) otherwise) and
down projection W (d_out, d_f), neuron i contributes n_i = W[:, i]·x_i to the output, with norm
|x_i|·||W[:, i]||. For a threshold t the weak neurons are D = {i : |x_i|·||W[:, i]|| < t} and

    CETT(t) = mean over tokens of ||W x_D|| / ||W x||,

the relative error of dropping them (tokens whose output is exactly zero are left out). CETT grows with t, so
each layer finds by bisection the largest threshold whose CETT stays within a target shared by all layers; at
inference neuron i is zeroed when |x_i| < t / ||W[:, i]||.

An expanded down projection has one W per expert, (k, d_out, d_f): each token uses the W of the expert its
router picks (`labels`), for its contributions and its output alike.
"""

from __future__ import annotations

import torch

CANDIDATES = 4096  # thresholds tried per layer: quantiles of the contributions


def down_column_norms(down_weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]|| for every intermediate neuron i of W (d_out, d_f); (k, d_f) for k experts."""
    return torch.linalg.vector_norm(down_weight.detach().float(), dim=-2)


def contributions(x: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """|x_i|·||W[:, i]|| for every token and neuron: x (tokens, d_f) -> (tokens, d_f)."""
    return x.abs().float() * (norms if labels is None else norms[labels])


def _outputs(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        return x @ weight.t()
    out = x.new_empty(x.shape[0], weight.shape[-2])
    for expert in range(weight.shape[0]):
        members = labels == expert
        if bool(members.any()):
            out[members] = x[members] @ weight[expert].t()
    return out


def cett(x: torch.Tensor, down_weight: torch.Tensor, threshold: float, norms: torch.Tensor | None = None,
         full: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> float:
    """CETT of dropping the neurons whose contribution is below `threshold`, over the tokens of x. (`norms`
    and `full`, the per-token ||W x||, may be passed when they are reused.)"""
    x = x.reshape(-1, x.shape[-1]).float()
    weight = down_weight.detach().float()
    norms = down_column_norms(weight) if norms is None else norms
    weak = contributions(x, norms, labels) < threshold
    full = torch.linalg.vector_norm(_outputs(x, weight, labels), dim=1) if full is None else full
    tail = torch.linalg.vector_norm(_outputs(x * weak, weight, labels), dim=1)
    keep = full > 0
    if not bool(keep.any()):
        return 0.0
    return float((tail[keep] / full[keep]).mean())


class ThresholdSearch:
    """One layer's threshold search: the quantile grid of its contributions and the CETT at each grid point tried,
    computed once and remembered, so that the searches for several targets (the PPL-p% search and its sweeps try
    about 20 on every layer) share their work. Each answer is what a search of its own would give, bit for bit."""

    def __init__(self, x: torch.Tensor, down_weight: torch.Tensor, candidates: int = CANDIDATES,
                 labels: torch.Tensor | None = None):
        self.x = x.reshape(-1, x.shape[-1]).float()
        self.weight = down_weight.detach().float()
        self.labels = labels
        self.norms = down_column_norms(self.weight)
        self.full = torch.linalg.vector_norm(_outputs(self.x, self.weight, labels), dim=1)
        values = contributions(self.x, self.norms, labels).flatten()
        if values.numel() > 1 << 24:  # quantile() has a size limit; a seeded subsample is as good for a grid
            generator = torch.Generator().manual_seed(0)
            values = values[torch.randint(values.numel(), (1 << 24,), generator=generator).to(values.device)]
        self.grid = torch.quantile(values, torch.linspace(0, 1, candidates, device=values.device)).tolist()
        self._cett: dict[int, float] = {}

    def cett_at(self, index: int) -> float:
        if index not in self._cett:
            self._cett[index] = cett(self.x, self.weight, self.grid[index], self.norms, self.full, self.labels)
        return self._cett[index]

    def threshold(self, target: float) -> float:
        """The largest grid threshold whose CETT is at most `target` (0 when even the smallest one exceeds it:
        nothing is dropped)."""
        lo, hi = -1, len(self.grid) - 1  # invariant: grid[lo] is within the target (lo = -1: none), grid[hi+1] not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cett_at(mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return 0.0 if lo < 0 else self.grid[lo]


def threshold_for_cett(x: torch.Tensor, down_weight: torch.Tensor, target: float, candidates: int = CANDIDATES,
                       labels: torch.Tensor | None = None) -> float:
    """The largest threshold, among quantiles of the contributions, whose CETT is at most `target` (0 when even
    the smallest one exceeds it: nothing is dropped)."""
    return ThresholdSearch(x, down_weight, candidates, labels).threshold(target)
