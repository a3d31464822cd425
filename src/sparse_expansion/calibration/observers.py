"""Statistics of calibration tensors, accumulated batch by batch: `update(tensor)` adds a batch, and
`merge(other)` combines two partial statistics (other batches, another cluster, another process) into
exactly what one statistic fed with both would hold, up to rounding.

They know nothing of models or algorithms: the engine feeds them a module's inputs or outputs.
"""

from __future__ import annotations

import torch


class InputSquaredNorm:
    """Mean over tokens of x_j^2 for each input feature j (Wanda's ||X_j||^2 up to a constant)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.mean_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.mean_sq.device, torch.float32)
        total = self.tokens + x.shape[0]
        self.mean_sq.mul_(self.tokens / total).add_(x.pow(2).sum(0), alpha=1.0 / total)
        self.tokens = total

    def merge(self, other: "InputSquaredNorm") -> "InputSquaredNorm":
        total = self.tokens + other.tokens
        if total:
            self.mean_sq.mul_(self.tokens / total).add_(other.mean_sq.to(self.mean_sq.device),
                                                        alpha=other.tokens / total)
        self.tokens = total
        return self

    @classmethod
    def stack(cls, statistics: list["InputSquaredNorm"]) -> "InputSquaredNorm":
        """Several statistics as one batched statistic (one row each), e.g. one per expert."""
        stacked = cls.__new__(cls)
        stacked.mean_sq = torch.stack([s.mean_sq for s in statistics])
        stacked.tokens = [s.tokens for s in statistics]
        return stacked


class Hessian:
    """H = (2/n) * sum_t x_t x_t^T over the n calibration tokens (the layer-wise OBS Hessian).

    `derived` is a cache for what algorithms compute from the matrix (SparseGPT's factorization), so layers
    that read the same input (gate and up) share it; updates and merges clear it.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.derived: dict = {}

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.matrix.device, torch.float32)
        total = self.tokens + x.shape[0]
        self.matrix.mul_(self.tokens / total)
        x = x * (2.0 / total) ** 0.5
        self.matrix.addmm_(x.t(), x)
        self.tokens = total
        self.derived.clear()

    def merge(self, other: "Hessian") -> "Hessian":
        total = self.tokens + other.tokens
        if total:
            self.matrix.mul_(self.tokens / total).add_(other.matrix.to(self.matrix.device),
                                                       alpha=other.tokens / total)
        self.tokens = total
        self.derived.clear()
        return self

    @classmethod
    def stack(cls, statistics: list["Hessian"]) -> "Hessian":
        """Several Hessians as one batched statistic (E, d, d), e.g. one per expert."""
        stacked = cls.__new__(cls)
        stacked.matrix = torch.stack([s.matrix for s in statistics])
        stacked.tokens = [s.tokens for s in statistics]
        stacked.derived = {}
        return stacked


class TokenRecorder:
    """Keeps every token it sees (as (tokens, features) rows, on the device they came from)."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    @property
    def tokens(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def update(self, tensor: torch.Tensor) -> None:
        self.batches.append(tensor.detach().reshape(-1, tensor.shape[-1]))

    def merge(self, other: "TokenRecorder") -> "TokenRecorder":
        self.batches.extend(other.batches)
        return self

    def all(self) -> torch.Tensor:
        return torch.cat(self.batches)
