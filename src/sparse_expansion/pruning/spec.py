"""What sparsity to reach: a fraction in [0, 1) or an N:M pattern."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError
from ..settings import Interval, SettingError


@dataclass(frozen=True)
class SparsitySpec:
    """Unstructured sparsity, or N:M (N weights zeroed in every group of M consecutive inputs).

    The N:M convention follows SparseGPT's `--prunen/--prunem` and Wanda's `--sparsity_type`:
    "2:4" zeroes 2 of every 4 weights (50%), "4:8" zeroes 4 of every 8.
    """

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    @classmethod
    def create(cls, sparsity: float | None = None, nm: str | None = None) -> SparsitySpec:
        if nm:
            n, m = parse_nm(nm)
            return cls(sparsity=n / m, n=n, m=m)
        if sparsity is None:
            raise SettingError("sparsity", "give {sparsity} S (0 <= S < 1) or {nm} N:M")
        SPARSITY("sparsity", sparsity)
        return cls(sparsity=float(sparsity))


SPARSITY = Interval(0, 1, closed_low=True, open_high=True)


def parse_nm(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"malformed N:M pattern {text!r}; expected e.g. 2:4 or 4:8")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UsageError(f"N:M pattern {text!r} needs 0 < N < M")
    return n, m
