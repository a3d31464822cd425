"""sparse-expansion: one-shot pruning and Sparse Expansion of Hugging Face causal LMs.

The Python API (api.py) works on any in-memory model and tokenizer: `prune`, `expand`, `evaluate`, `save`,
`load`. It is imported on first use, so `import sparse_expansion` stays light.
"""

from .errors import UsageError
from .runtime import __version__

_API = ("prune", "expand", "evaluate", "save", "load")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sparse_expansion' has no attribute {name!r}")


__all__ = ["UsageError", "__version__", *_API]
