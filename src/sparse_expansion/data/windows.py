"""Token windows: random calibration windows and non-overlapping evaluation windows.

`bos` (a token id, or None) makes every window start with that token: the text is tokenized once
without special tokens, windows of `seqlen - 1` text tokens are cut from it by the same rules, and the
BOS id is put in front of each. `bos=None` keeps the SparseGPT/Wanda protocol as it is (one stream,
tokenized with the tokenizer's defaults, so only the first window can start with BOS).
"""

from __future__ import annotations

import random

import torch

from ..errors import UsageError
from ..settings import AtLeast, OneOf, SettingError
from .corpus import Corpus, sample_document_windows

C4_EVAL_WINDOWS = 256
BOS_MODES = ("auto", "always", "never")
# The checks of the window settings (RunSettings states them with these, so each is written once).
WINDOWS = AtLeast(1)  # calibration or test windows
SEQLEN = AtLeast(2)  # tokens per window: at least one input and its next-token target
BOS = OneOf(BOS_MODES)


def resolve_bos(tokenizer, bos: str = "auto") -> int | None:
    """The token id every window must start with under the `bos` mode, or None.

    `never`: None. `always`: the tokenizer's BOS id. `auto`: the BOS id only when the tokenizer adds it
    itself on encoding (Gemma's does; GPT-2/SmolLM2-style ones do not).
    """
    BOS("bos", bos)
    if bos == "never":
        return None
    token = getattr(tokenizer, "bos_token_id", None)
    if bos == "always":
        if token is None:
            raise SettingError("bos", "{bos} always: the tokenizer has no BOS token (use {bos} auto or never)")
        return token
    if token is None:
        return None
    ids = list(tokenizer("Hello world").input_ids)
    return token if ids and ids[0] == token else None


def tokenize(tokenizer, text: str, add_special_tokens: bool = True) -> torch.Tensor:
    """Tokenize a whole text once (as the SparseGPT/Wanda protocol does) into a 1-D id tensor."""
    import transformers

    previous = transformers.logging.get_verbosity()
    # Long texts trigger a "sequence longer than the model" warning that does not apply: we cut windows.
    transformers.logging.set_verbosity_error()
    try:
        if add_special_tokens:
            return tokenizer(text, return_tensors="pt").input_ids[0]
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    finally:
        transformers.logging.set_verbosity(previous)


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Put `bos` in front of each row of `windows` (unchanged when `bos` is None)."""
    if bos is None:
        return windows
    column = torch.full((windows.shape[0], 1), bos, dtype=windows.dtype)
    return torch.cat([column, windows], dim=1)


def calibration_windows(corpus: Corpus, tokenizer, n: int, seqlen: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:
    """`n` random windows of `seqlen` tokens from the train split, seeded (each starting with `bos` if given)."""
    WINDOWS("n", n)
    SEQLEN("seqlen", seqlen)
    if corpus.train_documents is not None:
        return sample_document_windows(corpus.train_documents, tokenizer, n, seqlen, seed, bos=bos)
    ids = tokenize(tokenizer, corpus.train_text, add_special_tokens=bos is None)
    width = seqlen if bos is None else seqlen - 1  # text tokens per window
    if ids.numel() < width:
        raise UsageError(f"calibration text has {ids.numel()} tokens, shorter than one window of {width}"
                         + ("" if bos is None else " text tokens after BOS"))
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - width) for _ in range(n)]
    return with_bos(torch.stack([ids[s:s + width] for s in starts]), bos)


def evaluation_windows(corpus: Corpus, tokenizer, seqlen: int, limit: int | None = None,
                       bos: int | None = None) -> torch.Tensor:
    """The test text tokenized once, cut into non-overlapping `seqlen` windows, tail dropped.

    With `bos`, the windows hold `seqlen - 1` text tokens after the BOS id."""
    SEQLEN("seqlen", seqlen)
    if limit is not None:
        WINDOWS("limit", limit)
    ids = tokenize(tokenizer, corpus.test_text, add_special_tokens=bos is None)
    width = seqlen if bos is None else seqlen - 1  # text tokens per window
    count = ids.numel() // width
    if corpus.name == "c4":
        count = min(count, C4_EVAL_WINDOWS)
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise UsageError(f"test text has {ids.numel()} tokens, shorter than one window of {width}"
                         + ("" if bos is None else " text tokens after BOS"))
    return with_bos(ids[: count * width].view(count, width), bos)
