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

import torch

from ..errors import UsageError
from .masks import lowest_mask
from .quantization import ChannelQuantizer
from .spec import SparsitySpec

MAX_DAMPING_TRIES = 12


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # the pruned (and maybe quantized) weight, same shape/dtype/device as the input
    mask: torch.Tensor  # True where the weight was zeroed by the mask (or its input was dead)
    damping: list[float]  # the dampening finally added to each Hessian's diagonal


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*I)^-1, raising damp tenfold until the factorization succeeds."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    damp = percdamp * torch.mean(torch.diag(hessian)).item()
    if damp <= 0:
        damp = percdamp
    for _ in range(MAX_DAMPING_TRIES):
        damped = hessian.clone()
        damped[diag, diag] += damp
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    raise UsageError("SparseGPT: the Hessian stays singular after raising the dampening; use more calibration data")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: SparsitySpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    bits: int | None = None,
) -> SparseGPTResult:
    """Prune `weight` ((E,) out_features x in_features) given the Hessian(s) of its calibration inputs."""
    single = weight.dim() == 2
    W = weight.detach().float().clone()
    H = hessian.detach().float().to(W.device).clone()
    if single:
        W, H = W.unsqueeze(0), H.unsqueeze(0)
    experts, rows, cols = W.shape
    idx = torch.arange(cols, device=W.device)
    # Inputs that never fire carry no information: make H invertible there and drop their weights.
    dead = H[:, idx, idx] == 0  # (E, cols)
    H[:, idx, idx] = torch.where(dead, torch.ones_like(H[:, idx, idx]), H[:, idx, idx])
    W.masked_fill_(dead.unsqueeze(1), 0)
    quantizer = ChannelQuantizer(bits).fit(W.reshape(-1, cols)) if bits else None
    factors = [inverse_hessian_factor(H[e], percdamp) for e in range(experts)]
    Hinv = torch.stack([f[0] for f in factors])
    if spec.is_nm:
        # Blocks must hold whole N:M groups.
        blocksize = max(spec.m, blocksize - blocksize % spec.m)
    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        W1 = W[..., start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, start:end, start:end]
        diag1 = torch.diagonal(Hinv1, dim1=-2, dim2=-1).unsqueeze(1)  # (E, 1, count)
        if spec.is_nm:
            mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W.device)
        else:
            # Adaptive mask: the lowest-saliency weights of the whole block, over all rows jointly.
            mask1 = lowest_mask(W1.pow(2) / diag1.pow(2), spec, per_row=False)
        for i in range(end - start):
            w = W1[..., i]  # (E, rows)
            if spec.is_nm and i % spec.m == 0:
                # Scores use the weights as updated by the columns processed so far.
                group = W1[..., i:i + spec.m].pow(2) / diag1[..., i:i + spec.m].pow(2)
                mask1[..., i:i + spec.m] = lowest_mask(group, spec, per_row=True)
            q = w.masked_fill(mask1[..., i], 0)
            if quantizer is not None:
                q = quantizer.quantize(q.reshape(-1)).reshape(experts, rows)
            Q1[..., i] = q
            err = (w - q) / diag1[..., i]
            W1[..., i:] -= err.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)
            Err1[..., i] = err
        W[..., start:end] = Q1
        mask[..., start:end] = mask1
        W[..., end:] -= Err1 @ Hinv[:, start:end, end:]
    mask |= dead.unsqueeze(1)
    if single:
        W, mask = W[0], mask[0]
    return SparseGPTResult(weight=W.to(weight.dtype), mask=mask, damping=[f[1] for f in factors])
