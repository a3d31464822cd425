"""Per-linear statistics of calibration inputs, accumulated batch by batch (running means)."""

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


class Hessian:
    """H = (2/n) * sum_t x_t x_t^T over the n calibration tokens (the layer-wise OBS Hessian)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.matrix.device, torch.float32)
        total = self.tokens + x.shape[0]
        self.matrix.mul_(self.tokens / total)
        x = x * (2.0 / total) ** 0.5
        self.matrix.addmm_(x.t(), x)
        self.tokens = total
