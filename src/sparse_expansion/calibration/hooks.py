"""Forward hooks that feed each linear layer's inputs to a statistic."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def record_inputs(modules: dict[str, nn.Module], statistics: dict[str, object]) -> Iterator[None]:
    """While active, every forward of `modules[name]` calls `statistics[name].update(input)`."""
    handles = []
    for name, module in modules.items():
        statistic = statistics[name]

        def hook(_module, args, _output, statistic=statistic):
            statistic.update(args[0].detach())

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
