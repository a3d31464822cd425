"""Fitting routers (layers/router.py): PCA projection + k-means, on one layer's calibration inputs.

Fitting uses either torch (default) or scikit-learn (`backend="sklearn"`); benchmarks/bench_router.py
measures both on the sizes that matter. Routing at inference is always torch, on the model's device.
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from ..layers.router import Router

BACKENDS = ("torch", "sklearn")


def pca_components(in_features: int, reduction: int | None) -> int | None:
    """Number of PCA dimensions for `--pca-reduction`; None means no PCA."""
    if reduction is None:
        return None
    if reduction < 1:
        raise UsageError(f"--pca-reduction must be at least 1, got {reduction}")
    components = in_features // reduction
    if components < 1:
        raise UsageError(f"--pca-reduction {reduction} leaves no PCA dimensions for a layer with "
                         f"{in_features} inputs")
    return components


POWER_ITERATIONS = 4
OVERSAMPLING = 10


def _pca_torch(x: torch.Tensor, components: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top principal directions (d_in x components), largest variance first.

    Randomized range finding (Halko, Martinsson & Tropp 2011) with a seeded sketch and a few power
    iterations; when the sketch would be nearly as wide as the data, the exact eigendecomposition
    of the covariance is cheaper and is used instead.
    """
    mean = x.mean(0)
    centred = x - mean
    n, d = centred.shape
    rank = components + OVERSAMPLING
    if 2 * rank >= min(n, d):
        covariance = centred.t() @ centred / max(1, n - 1)
        _, vectors = torch.linalg.eigh(covariance.double())
        top = vectors[:, -components:].flip(1).float()
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        basis = torch.linalg.qr(centred @ torch.randn(d, rank, generator=generator)).Q
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(centred.t() @ basis).Q
            basis = torch.linalg.qr(centred @ basis).Q
        _, _, vh = torch.linalg.svd(basis.t() @ centred, full_matrices=False)
        top = vh[:components].t()
    # Fix each component's sign (the largest-magnitude entry positive) so fits are reproducible.
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1
    return mean, top * signs


def _kmeans_plus_plus(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + log k candidates per step), as scikit-learn does."""
    n = z.shape[0]
    trials = 2 + int(math.log(k))
    centres = [z[torch.randint(n, (1,), generator=generator).item()]]
    closest = (z - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            candidates = torch.randint(n, (trials,), generator=generator)
        else:
            candidates = torch.multinomial(closest / total, trials, replacement=True, generator=generator)
        dist = torch.cdist(z[candidates], z).pow(2)  # trials x n
        potentials = torch.minimum(closest.unsqueeze(0), dist).sum(1)
        best = potentials.argmin()
        closest = torch.minimum(closest, dist[best])
        centres.append(z[candidates[best]])
    return torch.stack(centres)


def _lloyd(z: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, float]:
    variance_scale = z.var(0).mean().item() * tol
    for _ in range(max_iter):
        labels = torch.cdist(z, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=centres.shape[0]).to(z.dtype)
        new = sums / counts.clamp(min=1).unsqueeze(1)
        empty = counts == 0
        if empty.any():
            # Re-seed an empty cluster at the token farthest from its centre.
            far = torch.cdist(z, centres).min(1).values.topk(int(empty.sum())).indices
            new[empty] = z[far]
        shift = (new - centres).pow(2).sum().item()
        centres = new
        if shift <= variance_scale:
            break
    inertia = torch.cdist(z, centres).min(1).values.pow(2).sum().item()
    return centres, inertia


def _kmeans_torch(z: torch.Tensor, k: int, restarts: int, seed: int, max_iter: int = 300,
                  tol: float = 1e-4) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres, inertia = _lloyd(z, _kmeans_plus_plus(z, k, generator), max_iter, tol)
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best


def fit_router(x: torch.Tensor, experts: int, reduction: int | None = 32, restarts: int = 1, seed: int = 0,
               backend: str = "torch") -> Router:
    """Fit PCA (optional) and k-means on calibration tokens `x` (n_tokens x d_in), on the CPU in fp32."""
    if experts < 1:
        raise UsageError(f"--experts must be at least 1, got {experts}")
    if backend not in BACKENDS:
        raise UsageError(f"unknown router backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    x = x.reshape(-1, x.shape[-1]).detach().to("cpu", torch.float32)
    if x.shape[0] < experts:
        raise UsageError(f"{experts} experts but only {x.shape[0]} calibration tokens; use fewer experts "
                         "or more calibration data")
    in_features = x.shape[1]
    components = pca_components(in_features, reduction)
    router = Router(in_features, components, experts)
    if experts == 1:
        router.mean.copy_(x.mean(0))
        if components:
            router.projection.copy_(_pca_torch(x, components, seed)[1])
        return router
    if backend == "sklearn":
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        data = x.numpy()
        if components:
            pca = PCA(n_components=components, random_state=seed).fit(data)
            router.mean.copy_(torch.from_numpy(pca.mean_))
            router.projection.copy_(torch.from_numpy(pca.components_.T.copy()))
            z = pca.transform(data)
        else:
            router.mean.copy_(x.mean(0))
            z = (x - router.mean).numpy()
        kmeans = KMeans(n_clusters=experts, n_init=restarts, random_state=seed).fit(z)
        router.centroids.copy_(torch.from_numpy(kmeans.cluster_centers_))
        return router
    if components:
        mean, projection = _pca_torch(x, components, seed)
        router.mean.copy_(mean)
        router.projection.copy_(projection)
    else:
        router.mean.copy_(x.mean(0))
    router.centroids.copy_(_kmeans_torch(router.project(x), experts, restarts, seed))
    return router
