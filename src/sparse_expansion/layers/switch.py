"""Measured switches between an accelerated product and the dense one.

An accelerated path (the CPU CSR kernel, the GPU 2:4 product) is used only for the token counts where it
measured faster than dense on the layer's own shape: `measure_switch` times both at n = 1, 2, 4, ... tokens,
and for n tokens a layer takes the decision measured at the smallest size >= n. Layers that share a shape
(and density) share one measurement through a `SwitchCache`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels.timing import paired_medians_ms

SWITCH_BATCH_SIZES = tuple(2 ** i for i in range(12))  # 1 .. 2048 tokens
ALWAYS = [(2 ** 62, True)]  # the accelerated path at every size (for checks)


class Switched:
    """Holds the measured decisions `[(tokens, accelerated is faster), ...]` and answers per token count."""

    def __init__(self) -> None:
        self.switch = []

    @property
    def switch(self) -> list[tuple[int, bool]]:
        return self._switch

    @switch.setter
    def switch(self, decisions: list[tuple[int, bool]]) -> None:
        self._switch = list(decisions)
        self._sizes = [size for size, _ in self._switch]
        # Decoding asks about one token ~100 times per generated token: answer that from a field.
        self.fast_at_one_token = self._lookup(1)

    def _lookup(self, tokens: int) -> bool:
        if not self._switch:
            return False
        return self._switch[min(bisect.bisect_left(self._sizes, tokens), len(self._sizes) - 1)][1]

    def use_fast(self, tokens: int) -> bool:
        return self.fast_at_one_token if tokens == 1 else self._lookup(tokens)

    def fast_sizes(self) -> list[int]:
        return [tokens for tokens, faster in self._switch if faster]


def measure_switch(fast: Callable[[torch.Tensor], object], dense: Callable[[torch.Tensor], object], cols: int,
                   batch_sizes=SWITCH_BATCH_SIZES, repeats: int = 7, seed: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> list[tuple[int, bool, float, float]]:
    """Time both products for each batch size: (tokens, fast is faster, dense s, fast s).

    The two alternate, one call each per round, and each keeps its median, so a busy machine slows both
    alike. On CUDA every call is synchronised so that the kernel's time is measured, not its launch.
    """
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rows = []
    for tokens in batch_sizes:
        x = torch.randn(tokens, cols, generator=generator).to(device, dtype)

        def timed(fn, x=x):
            def call():
                fn(x)
                if sync is not None:
                    sync()
            return call

        medians = paired_medians_ms({"dense": timed(dense), "fast": timed(fast)}, min_run_time=0.0,
                                    block_seconds=0.0, min_rounds=repeats)
        dense_s, fast_s = medians["dense"] * 1e-3, medians["fast"] * 1e-3
        rows.append((tokens, fast_s < dense_s, dense_s, fast_s))
    return rows


@dataclass
class SwitchCache:
    """One measurement per key (path, shape, density to 1%, dtype, device, threads)."""

    batch_sizes: tuple[int, ...] = SWITCH_BATCH_SIZES
    repeats: int = 7
    measured: dict = field(default_factory=dict)

    def decide(self, target: Switched, key: tuple, fast, dense, cols: int, device="cpu",
               dtype: torch.dtype = torch.float32) -> None:
        key = (*key, str(dtype), str(device), torch.get_num_threads())
        if key not in self.measured:
            self.measured[key] = measure_switch(fast, dense, cols, self.batch_sizes, self.repeats,
                                                device=device, dtype=dtype)
        target.switch = [(tokens, faster) for tokens, faster, _, _ in self.measured[key]]

    def summary(self) -> dict:
        """Per measured key: the token counts where the accelerated path won, and both times."""
        out = {}
        for key, rows in self.measured.items():
            out["/".join(str(part) for part in key[:-3])] = {
                "fast_at_tokens": [t for t, faster, _, _ in rows if faster],
                "dense_ms": [round(d * 1e3, 4) for _, _, d, _ in rows],
                "fast_ms": [round(s * 1e3, 4) for _, _, _, s in rows],
            }
        return out
