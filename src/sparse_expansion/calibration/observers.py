"""Statistics of calibration tensors (float32 unless told otherwise), accumulated batch by batch:
`update(tensor)` adds a batch, and `merge(other)` combines two partial statistics (other batches, another
cluster, another process) into exactly what one statistic fed with both would hold, up to rounding;
`all_reduce()` does the same across the processes of a torch.distributed run (every rank then holds the
statistic of all ranks' tokens).

They know nothing of models or algorithms: the engine feeds them a module's inputs or outputs.
"""

from __future__ import annotations

import torch

from .. import distributed


class _RunningMean:
    """A mean over tokens, kept in the tensor attribute named by FIELD, with the number of tokens seen."""

    FIELD = ""
    tokens: int | list[int]

    def merge(self, other: _RunningMean) -> _RunningMean:
        mine, theirs = getattr(self, self.FIELD), getattr(other, self.FIELD)
        total = self.tokens + other.tokens
        if total:
            mine.mul_(self.tokens / total).add_(theirs.to(mine.device), alpha=other.tokens / total)
        self.tokens = total
        self.derived.clear()
        return self

    def update(self, inputs: torch.Tensor) -> None:
        self._accumulate(inputs)

    def defer(self, inputs: torch.Tensor) -> None:
        """Keep a batch for `all_reduce`, which applies every rank's batches in the one-process order (the
        engine feeds watched statistics this way under torch.distributed)."""
        self.__dict__.setdefault("pending", []).append(inputs.detach())

    def all_reduce(self) -> _RunningMean:
        """The statistic of every rank's batches, on every rank (identity in one process).

        The ranks' batches are applied in rank order, which is the order one process sees them in (each rank
        holds a contiguous share): rank 0 applies its own and broadcasts the statistic, rank 1 continues from
        it, and so on. The same sequence of operations as one process, so the same numbers bit for bit (a sum
        of per-rank partial statistics would differ in the last bits, and SparseGPT's masks flip on such
        differences: 0.8% in perplexity on the embedded model)."""
        if distributed.active():
            field = getattr(self, self.FIELD)
            for src in range(distributed.world()):
                if src == distributed.rank():
                    for batch in self.__dict__.pop("pending", []):
                        self._accumulate(batch)
                counts = torch.tensor([float(self.tokens)], dtype=torch.float64)
                distributed.broadcast_(counts, src)
                distributed.broadcast_(field, src)
                self.tokens = int(counts.item())
            self.derived.clear()
        return self

    @classmethod
    def combine(cls, statistics: list) -> _RunningMean:
        """One statistic of all the tokens the given ones saw: their token-weighted mean (several at once;
        `merge` is the same for two)."""
        total = sum(s.tokens for s in statistics)
        combined = cls.__new__(cls)
        setattr(combined, cls.FIELD, sum(getattr(s, cls.FIELD) * (s.tokens / total) for s in statistics))
        combined.tokens = total
        combined.derived = {}
        return combined

    @classmethod
    def combine_owned(cls, owned: dict, tokens: list[int], in_features: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> _RunningMean:
        """`combine` of statistics 0..n-1 each held by its owner rank (`distributed.owner(i)`; `owned`: this
        rank's, by index; `tokens`: every statistic's count), on every rank: the same terms summed in the same
        order, so the same numbers as `combine` in one process."""
        total = sum(tokens)
        combined = cls(in_features, device, dtype)
        buffer = torch.empty_like(getattr(combined, cls.FIELD))
        acc = 0
        for index, count in enumerate(tokens):
            term = getattr(owned[index], cls.FIELD) * (count / total) if distributed.mine(index) else buffer
            acc = acc + distributed.broadcast_(term, distributed.owner(index))
        setattr(combined, cls.FIELD, acc)
        combined.tokens = total
        return combined

    @classmethod
    def stack(cls, statistics: list) -> _RunningMean:
        """Several statistics as one batched statistic (one leading index each), e.g. one per expert."""
        stacked = cls.__new__(cls)
        setattr(stacked, cls.FIELD, torch.stack([getattr(s, cls.FIELD) for s in statistics]))
        stacked.tokens = [s.tokens for s in statistics]
        stacked.derived = {}
        return stacked


class InputSquaredNorm(_RunningMean):
    """Mean over tokens of x_j^2 for each input feature j (Wanda's ||X_j||^2 up to a constant)."""

    FIELD = "mean_sq"

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.mean_sq = torch.zeros(in_features, dtype=dtype, device=device)
        self.tokens = 0
        self.derived: dict = {}

    def _accumulate(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.mean_sq.device, self.mean_sq.dtype)
        total = self.tokens + x.shape[0]
        self.mean_sq.mul_(self.tokens / total).add_(x.pow(2).sum(0), alpha=1.0 / total)
        self.tokens = total


class Hessian(_RunningMean):
    """H = (2/n) * sum_t x_t x_t^T over the n calibration tokens (the layer-wise OBS Hessian).

    `derived` is a cache for what algorithms compute from the matrix (SparseGPT's factorization), so layers
    that read the same input (gate and up) share it; updates and merges clear it.
    """

    FIELD = "matrix"

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.matrix = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.tokens = 0
        self.derived: dict = {}

    def _accumulate(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.matrix.device, self.matrix.dtype)
        total = self.tokens + x.shape[0]
        self.matrix.mul_(self.tokens / total)
        x = x * (2.0 / total) ** 0.5
        self.matrix.addmm_(x.t(), x)
        self.tokens = total
        self.derived.clear()


class TokenRecorder:
    """Keeps every token it sees (as (tokens, features) rows, on the device they came from, one entry per batch).

    `gather=False`: under torch.distributed each rank keeps only the tokens of its own batches (`all_reduce` is
    then the identity); the consumer exchanges what it needs (expansion/divided.py)."""

    def __init__(self, gather: bool = True):
        self.batches: list[torch.Tensor] = []
        self.gather = gather

    @property
    def tokens(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def update(self, tensor: torch.Tensor) -> None:
        self.batches.append(tensor.detach().reshape(-1, tensor.shape[-1]))

    def merge(self, other: TokenRecorder) -> TokenRecorder:
        self.batches.extend(other.batches)
        return self

    def all_reduce(self) -> TokenRecorder:
        """Every rank's tokens, in rank order (the order of one process walking all the batches)."""
        if self.gather:
            self.batches = distributed.gather_tensors(self.batches)
        return self

    def all(self) -> torch.Tensor:
        return torch.cat(self.batches)
