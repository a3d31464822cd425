"""sparse-expansion: one-shot pruning and Sparse Expansion of Hugging Face causal LMs."""

from .errors import UsageError

__version__ = "0.1.0"


def load(path=None, dtype="float32", device="cpu", trust_remote_code=False):
    """Load a dense, pruned or expanded model directory (the embedded default when `path` is None).

    Returns a `LoadedModel` with `.model` (eval mode, on `device`) and `.tokenizer`.
    """
    from .models.loading import load_model  # torch/transformers load only when needed

    return load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=True)


__all__ = ["UsageError", "__version__", "load"]
