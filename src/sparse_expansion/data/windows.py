"""Token windows: random calibration windows and non-overlapping evaluation windows."""

from __future__ import annotations

import random

import torch

from ..errors import UsageError
from .corpus import Corpus, sample_document_windows

C4_EVAL_WINDOWS = 256


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once (as the SparseGPT/Wanda protocol does) into a 1-D id tensor."""
    import transformers

    previous = transformers.logging.get_verbosity()
    # Long texts trigger a "sequence longer than the model" warning that does not apply: we cut windows.
    transformers.logging.set_verbosity_error()
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        transformers.logging.set_verbosity(previous)


def calibration_windows(corpus: Corpus, tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n` random windows of `seqlen` tokens from the train split, seeded."""
    if n < 1:
        raise UsageError("--calib-samples must be at least 1")
    if seqlen < 2:
        raise UsageError("--seqlen must be at least 2")
    if corpus.train_documents is not None:
        return sample_document_windows(corpus.train_documents, tokenizer, n, seqlen, seed)
    ids = tokenize(tokenizer, corpus.train_text)
    if ids.numel() < seqlen:
        raise UsageError(f"calibration text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen) for _ in range(n)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def evaluation_windows(corpus: Corpus, tokenizer, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """The test text tokenized once, cut into non-overlapping `seqlen` windows, tail dropped."""
    if seqlen < 2:
        raise UsageError("--seqlen must be at least 2")
    ids = tokenize(tokenizer, corpus.test_text)
    count = ids.numel() // seqlen
    if corpus.name == "c4":
        count = min(count, C4_EVAL_WINDOWS)
    if limit is not None:
        if limit < 1:
            raise UsageError("--eval-samples must be at least 1")
        count = min(count, limit)
    if count == 0:
        raise UsageError(f"test text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)
