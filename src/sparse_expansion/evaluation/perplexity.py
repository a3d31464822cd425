"""Perplexity by the SparseGPT/Wanda protocol.

The test text is tokenized once and cut into non-overlapping windows of `seqlen` tokens (the tail is
dropped; see `data.windows.evaluation_windows`). Each window is scored independently: the mean
cross-entropy of predicting tokens 2..L from their prefixes. PPL = exp(mean over windows of that
loss), which equals the protocol's exp(sum(loss_w * L) / (n_windows * L)).

With BOS windows (`data.windows`, `bos=<id>`) each window is the BOS id followed by L-1 text tokens: the
BOS is never a target and every text token is, so the same score covers exactly the text tokens.

Under torch.distributed each rank scores a contiguous share of the batches and the per-window losses are
gathered in window order, so every rank reports the one-process perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed

# Logits for a batch take batch * seqlen * vocab floats; keep a batch near this many tokens.
TOKENS_PER_BATCH = 2048


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    windows: int
    seqlen: int
    bos: int | None = None  # the BOS id every window starts with, when it was prepended (not text)

    @property
    def eval_tokens(self) -> int:
        """Tokens in the evaluated windows (a prepended BOS included)."""
        return self.windows * self.seqlen

    @property
    def text_tokens(self) -> int:
        """Tokens of the evaluated text in the windows (a prepended BOS is not text)."""
        return self.windows * (self.seqlen - (0 if self.bos is None else 1))

    @property
    def predicted_tokens(self) -> int:
        """Tokens whose likelihood enters the score (the first of each window has no prefix)."""
        return self.windows * (self.seqlen - 1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", batch_size: int | None = None,
               progress: bool = True, desc: str = "perplexity", bos: int | None = None) -> PerplexityResult:
    """`bos`: the id that `windows` were built to start with (`data.windows`), recorded in the result."""
    count, seqlen = windows.shape
    if bos is not None and not bool((windows[:, 0] == bos).all()):
        raise ValueError(f"windows were said to start with BOS {bos} but do not")
    batch_size = batch_size or max(1, TOKENS_PER_BATCH // seqlen)
    losses = [torch.zeros(0, dtype=torch.float64)]
    starts = list(range(0, count, batch_size))
    starts = [starts[i] for i in distributed.shard(len(starts))]  # this rank's batches (all, in one process)
    for start in tqdm(starts, desc=desc, disable=not progress or not distributed.is_main(), leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                    reduction="none").view(batch.shape[0], -1)
        losses.append(per_token.mean(dim=1).cpu().double())
    # Every rank's per-window losses in window order: the mean is the one-process mean.
    mean_nll = torch.cat(distributed.gather_tensors([torch.cat(losses)])).mean().item()
    return PerplexityResult(ppl=math.exp(mean_nll), mean_nll=mean_nll, windows=count, seqlen=seqlen, bos=bos)
