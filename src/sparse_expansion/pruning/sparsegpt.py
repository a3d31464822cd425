"""SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix to minimise ||WX - W'X||^2.

Works column block by column block on the inverse Hessian's Cholesky factor: choose the mask for a
block adaptively from w^2 / [H^-1]_jj^2, zero (and optionally quantize) one column at a time, and
spread each column's error over the not-yet-processed columns (the OBS update).
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
    weight: torch.Tensor  # the pruned (and maybe quantized) weight, same dtype/device as the input
    mask: torch.Tensor  # True where the weight was zeroed by the mask
    damping: float  # the dampening finally added to the Hessian diagonal


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
    """Prune `weight` (out_features x in_features) given the Hessian of its calibration inputs."""
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float().to(W.device)
    rows, cols = W.shape
    # Inputs that never fire carry no information: make H invertible there and drop their weights.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    quantizer = ChannelQuantizer(bits).fit(W) if bits else None
    Hinv, damp = inverse_hessian_factor(H, percdamp)
    if spec.is_nm:
        # Blocks must hold whole N:M groups.
        blocksize = max(spec.m, blocksize - blocksize % spec.m)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        count = end - start
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        scores = W1.pow(2) / torch.diag(Hinv1).reshape(1, -1).pow(2)
        if spec.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            # Adaptive mask: the lowest-saliency weights of the whole block, over all rows jointly.
            mask1 = lowest_mask(scores, spec, per_row=False)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if spec.is_nm and i % spec.m == 0:
                # Scores use the weights as updated by the columns processed so far.
                group = W1[:, i:i + spec.m].pow(2) / torch.diag(Hinv1)[i:i + spec.m].reshape(1, -1).pow(2)
                mask1[:, i:i + spec.m] = lowest_mask(group, spec, per_row=True)
            q = w.clone()
            q[mask1[:, i]] = 0
            if quantizer is not None:
                q = quantizer.quantize(q)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, start:end] = Q1
        mask[:, start:end] = mask1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    return SparseGPTResult(weight=W.to(weight.dtype), mask=mask | dead.unsqueeze(0).expand_as(mask), damping=damp)
