"""Per-output-channel asymmetric min-max quantization (the GPTQ/SparseGPT grid)."""

from __future__ import annotations

import torch

from ..settings import Interval

BITS = Interval(2, 8, closed_low=True, what="a bit width")



class ChannelQuantizer:
    """A uniform grid per output row: scale and integer zero point found from the row's min and max.

    The range always includes 0, so a pruned weight stays exactly zero after quantization.
    """

    def __init__(self, bits: int):
        BITS("bits", bits)
        self.bits = bits
        self.maxq = 2**bits - 1
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None

    def fit(self, weight: torch.Tensor) -> ChannelQuantizer:
        w = weight.float()
        low = torch.clamp(w.min(dim=1).values, max=0)
        high = torch.clamp(w.max(dim=1).values, min=0)
        flat = (low == 0) & (high == 0)
        low = torch.where(flat, torch.full_like(low, -1), low)
        high = torch.where(flat, torch.full_like(high, 1), high)
        self.scale = (high - low) / self.maxq
        self.zero = torch.round(-low / self.scale)
        return self

    def quantize(self, column: torch.Tensor) -> torch.Tensor:
        """Round one column (one value per output row) to the grid and map it back to floats."""
        scale, zero = self.scale, self.zero
        q = torch.clamp(torch.round(column / scale) + zero, 0, self.maxq)
        return scale * (q - zero)
