"""Timing several candidates fairly: alternating blocks of calls, a median per candidate."""

from __future__ import annotations

import statistics
import time


def paired_medians_ms(fns: dict, min_run_time: float, block_seconds: float = 0.01, min_rounds: int = 7) -> dict:
    """Median time per call of each function, timed in alternating blocks.

    Every round runs one block of each candidate (in rotating order), so a machine that slows down or
    speeds up during the measurement affects all candidates alike: ratios stay honest.
    """
    names = list(fns)
    calls = {}
    for name in names:  # warm up and size the blocks
        fns[name]()
        start = time.perf_counter()
        fns[name]()
        calls[name] = max(1, int(block_seconds / max(time.perf_counter() - start, 1e-9)))
    samples = {name: [] for name in names}
    deadline = time.perf_counter() + min_run_time * len(names)
    rounds = 0
    while rounds < min_rounds or time.perf_counter() < deadline:
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
        rounds += 1
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}
