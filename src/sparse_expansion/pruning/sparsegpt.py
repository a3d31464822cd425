"""SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix to minimise ||WX - W'X||^2.

Works column block by column block on the inverse Hessian's Cholesky factor: choose the mask for a
block adaptively from w^2 / [H^-1]_jj^2, zero (and optionally quantize) one column at a time, and
spread each column's error over the not-yet-processed columns (the OBS update).

Several matrices can be pruned in one pass (`weight` of shape (E, rows, cols) with one Hessian each):
Sparse Expansion prunes all experts of a layer this way, so k experts cost one column loop over
bigger tensors instead of k loops. A single matrix is the case E = 1, through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..errors import UsageError
from ..kernels.linalg import invert_lower_triangular_
from ..runtime import free_bytes, one_thread_each
from .masks import lowest_mask
from .quantization import ChannelQuantizer
from .spec import SparsitySpec

MAX_DAMPING_TRIES = 12
FACTOR_MEMORY_SHARE = 0.2  # of the host's free memory, for the fast factorizations' work copies at once
UPDATE_BLOCK = 32  # columns updated one by one before a lazy matrix-product update of the rest


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # the pruned (and maybe quantized) weight, same shape/dtype/device as the input
    mask: torch.Tensor  # True where the weight was zeroed by the mask (or its input was dead)
    damping: list[float]  # the dampening finally added to each Hessian's diagonal


def _damped(hessian: torch.Tensor, damp: float, reverse: bool = False) -> torch.Tensor:
    """A copy of `hessian` (rows and columns reversed with `reverse`) with `damp` added to its diagonal."""
    damped = hessian.flip(-1, -2) if reverse else hessian.clone()
    damped.diagonal().add_(damp)
    return damped


def _reference_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, int]:
    """SparseGPT's own arithmetic: Cholesky of H + damp I, its inverse, Cholesky of that (upper)."""
    lower, info = torch.linalg.cholesky_ex(_damped(hessian, damp))
    if info.item() != 0:
        return None, 1
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper, int(info.item())


def _lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 of a lower-triangular L (overwritten): LAPACK's trtri in place on the CPU (kernels.linalg; torch has no
    triangular inverse, and its triangular solve against the identity does three times the work: 141 ms against
    37 ms at 1,536 columns, one thread), a triangular solve on other devices."""
    if invert_lower_triangular_(lower):
        return lower
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False)


def _fast_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, int]:
    """The same factor with one Cholesky and one triangular inverse (about half the work): with J the reversal,
    J H J = L L^T gives H = R R^T for the upper R = J L J, so H^-1 = U^T U with U = R^-1 = J L^-1 J. (J H J + damp I
    = J (H + damp I) J: the reversed copy is damped in place.)"""
    lower, info = torch.linalg.cholesky_ex(_damped(hessian, damp, reverse=True))
    if info.item() != 0:
        return None, 1
    return _lower_inverse(lower).flip(-1, -2), 0


# How the damped Hessian is factored (PruneOptions.factorization; None: the reference).
FACTORIZATIONS = {"reference": _reference_factor, "fast": _fast_factor}


def _factor_into(out: torch.Tensor, hessian: torch.Tensor, percdamp: float, factor) -> float:
    """Factor one Hessian into `out`: damp starts at `percdamp` x mean(diag H) and is raised tenfold until the
    factorization succeeds. Returns the damp used."""
    damp = percdamp * hessian.diagonal().mean().item()
    if damp <= 0:
        damp = percdamp
    for _ in range(MAX_DAMPING_TRIES):
        upper, info = factor(hessian, damp)
        # A NaN or infinity anywhere makes the sum one: one reduction instead of a mask of the whole factor.
        if info == 0 and torch.isfinite(upper.sum()):
            out.copy_(upper)
            return damp
        damp *= 10
    raise UsageError("SparseGPT: the Hessian stays singular after raising the dampening; use more calibration data")


def inverse_hessian_factors(hessians: torch.Tensor, percdamp: float, factorization: str | None = None
                            ) -> tuple[torch.Tensor, list[float]]:
    """Upper Cholesky factors U of (H + damp*I)^-1 = U^T U for a batch of Hessians (E, c, c).

    damp starts at `percdamp` x mean(diag H) and is raised tenfold, per matrix, until the
    factorization succeeds. `factorization`: "reference" (default) is SparseGPT's own arithmetic, one matrix
    after another on torch's threads; "fast" does half the work, one matrix per thread on the CPU
    (`one_thread_each`: 6.3x and 2.1x faster than one after another on two threads for 16 Hessians of 576 and 1,536
    columns, and the same numbers on any thread count), and differs from the reference by rounding, which changes
    masks (docs/BENCHMARKS.md judges it over calibration seeds).
    """
    name = factorization or "reference"
    factors = torch.empty_like(hessians)

    def solve(e: int) -> float:
        return _factor_into(factors[e], hessians[e], percdamp, FACTORIZATIONS[name])

    if name == "fast" and hessians.device.type == "cpu":
        # Each factorization holds about three more matrices while it runs: as many at once as memory allows.
        at_once = int(FACTOR_MEMORY_SHARE * free_bytes("cpu")) // (3 * hessians[0].nbytes)
        damping = one_thread_each(solve, range(hessians.shape[0]), workers=max(1, at_once))
    else:
        damping = [solve(e) for e in range(hessians.shape[0])]
    return factors, damping


def hessian_factors(hessians: torch.Tensor, percdamp: float = 0.01, factorization: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """What SparseGPT needs from a batch of Hessians (E, c, c): the dead-input masks (E, c), the
    inverse factors U and the dampening used. Layers that read the same input (gate and up) share it.
    """
    H = hessians.detach().float()
    idx = torch.arange(H.shape[-1], device=H.device)
    # Inputs that never fire carry no information: make H invertible there (their weights are dropped), in a copy.
    dead = H[:, idx, idx] == 0
    if dead.any():
        H = H.clone()
        H[:, idx, idx] = torch.where(dead, torch.ones_like(H[:, idx, idx]), H[:, idx, idx])
    Hinv, damping = inverse_hessian_factors(H, percdamp, factorization)
    return dead, Hinv, damping


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: SparsitySpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    bits: int | None = None,
    factors: tuple[torch.Tensor, torch.Tensor, list[float]] | None = None,
    block_updates: bool = False,
) -> SparseGPTResult:
    """Prune `weight` ((E,) out_features x in_features) given the Hessian(s) of its calibration inputs.

    `factors` (from `hessian_factors`) may be passed to reuse one factorization across layers that read
    the same input. `block_updates` (the fast arithmetic, PruneOptions.factorization "fast"): the columns after
    a block are updated once per block, as the authors' lazy batches do, instead of once per 32-column
    sub-block (a quarter of the traffic over the weights), and on the CPU a stack of matrices is divided among
    torch's threads, one thread each (`one_thread_each`); the same result up to rounding.
    """
    single = weight.dim() == 2
    W = weight.detach()
    if single:
        W = W.unsqueeze(0)
    experts, rows, cols = W.shape
    dead, Hinv, damping = factors if factors is not None else hessian_factors(
        (hessian.unsqueeze(0) if single else hessian).to(W.device), percdamp)
    # The column loop runs on W^T (E, cols, rows): a column is then a contiguous (E, rows) slice and every
    # per-column update reads and writes contiguous memory. The same operations on the same numbers as on W
    # (masks are chosen as in W's own layout, so that ties break by the same positions): the same result,
    # 1.3-1.6x faster on the experts' gate/up shape (docs/BENCHMARKS.md). One copy of the weights, made here.
    Wt = torch.empty(experts, cols, rows, dtype=torch.float32, device=W.device).copy_(W.transpose(1, 2))
    del W
    Wt.masked_fill_(dead.unsqueeze(-1), 0)
    quantizer = ChannelQuantizer(bits).fit(Wt.transpose(1, 2).reshape(-1, cols)) if bits else None
    if spec.is_nm:
        # Blocks must hold whole N:M groups.
        blocksize = max(spec.m, blocksize - blocksize % spec.m)
    mask_t = torch.zeros(Wt.shape, dtype=torch.bool, device=Wt.device)
    loop = partial(_column_loop, spec=spec, blocksize=blocksize, quantizer=quantizer, block_updates=block_updates)
    if block_updates and quantizer is None and experts > 1 and Wt.device.type == "cpu":
        # Every matrix's loop is independent of the others': a share of them per thread.
        shares = [slice(int(s[0]), int(s[-1]) + 1)
                  for s in torch.arange(experts).tensor_split(min(experts, torch.get_num_threads()))]
        one_thread_each(lambda args: loop(*args), [(Wt[s], mask_t[s], Hinv[s]) for s in shares])
    else:
        loop(Wt, mask_t, Hinv)
    W = Wt.transpose(1, 2).contiguous()
    del Wt
    mask = mask_t.transpose(1, 2) | dead.unsqueeze(1)  # (no caller in the pipeline reads it: left unordered)
    if single:
        W, mask = W[0], mask[0]
    return SparseGPTResult(weight=W.to(weight.dtype), mask=mask, damping=damping)


def _column_loop(Wt: torch.Tensor, mask_t: torch.Tensor, Hinv: torch.Tensor, spec: SparsitySpec, blocksize: int,
                 quantizer: ChannelQuantizer | None, block_updates: bool) -> None:
    """SparseGPT's pass over the columns of W^T (E, cols, rows), in place: the pruned (and maybe quantized)
    weights into `Wt`, the mask into `mask_t`."""
    experts, cols, rows = Wt.shape
    group = spec.m if spec.is_nm else 1
    step = max(group, UPDATE_BLOCK - UPDATE_BLOCK % group)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if not spec.is_nm:
            # Adaptive mask: the lowest-saliency weights of the whole block, over all rows jointly,
            # from the weights as updated by every column before the block.
            diag = torch.diagonal(Hinv[:, start:end, start:end], dim1=-2, dim2=-1).unsqueeze(-1)
            scores = Wt[:, start:end].pow(2) / diag.pow(2)  # (E, block, rows): W's block, transposed
            mask_t[:, start:end] = lowest_mask(scores.transpose(1, 2), spec, per_row=False).transpose(1, 2)
        Err = torch.empty(experts, end - start, rows, dtype=Wt.dtype, device=Wt.device)
        # Columns are processed in small sub-blocks: rank-one OBS updates inside a sub-block, one matrix product
        # for the columns after it (up to the block's end with `block_updates`, then one product per block for
        # the rest). The arithmetic is that of updating the whole block column by column, with less traffic.
        for sub in range(start, end, step):
            sub_end = min(sub + step, end)
            W1 = Wt[:, sub:sub_end]  # (E, count, rows), updated in place
            Q1 = torch.empty_like(W1) if quantizer is not None else None
            Err1 = Err[:, sub - start:sub_end - start]
            Hinv1 = Hinv[:, sub:sub_end, sub:sub_end]
            diag1 = torch.diagonal(Hinv1, dim1=-2, dim2=-1).unsqueeze(-1)  # (E, count, 1)
            mask1 = mask_t[:, sub:sub_end]
            for i in range(sub_end - sub):
                w = W1[:, i]  # (E, rows)
                if spec.is_nm and i % spec.m == 0:
                    # Scores use the weights as updated by the columns processed so far.
                    scores = (W1[:, i:i + spec.m].pow(2) / diag1[:, i:i + spec.m].pow(2)).transpose(1, 2)
                    mask1[:, i:i + spec.m] = lowest_mask(scores, spec, per_row=True).transpose(1, 2)
                if quantizer is None:
                    # (w - q) / d with q = w masked: w where masked, exactly 0 elsewhere (the same numbers).
                    err = torch.where(mask1[:, i], w, 0).div_(diag1[:, i])
                else:
                    q = quantizer.quantize(w.masked_fill(mask1[:, i], 0).reshape(-1)).reshape(experts, rows)
                    Q1[:, i] = q
                    err = (w - q) / diag1[:, i]
                W1[:, i:].addcmul_(err.unsqueeze(1), Hinv1[:, i, i:].unsqueeze(-1), value=-1)
                Err1[:, i] = err
            # A column's own update leaves its kept weights exactly as they were (err 0 there) and its pruned
            # ones near 0: zeroing those gives q (the quantized column instead where quantizing).
            if quantizer is None:
                W1.masked_fill_(mask1, 0)
            else:
                W1.copy_(Q1)
            if not block_updates:
                Wt[:, sub_end:] -= Hinv[:, sub:sub_end, sub_end:].transpose(1, 2) @ Err1
            elif sub_end < end:
                Wt[:, sub_end:end].baddbmm_(Hinv[:, sub:sub_end, sub_end:end].transpose(1, 2), Err1, alpha=-1)
        if block_updates and end < cols:
            Wt[:, end:].baddbmm_(Hinv[:, start:end, end:].transpose(1, 2), Err, alpha=-1)
