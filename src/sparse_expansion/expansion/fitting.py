"""Fitting routers (layers/router.py): PCA projection + k-means, on one layer's calibration inputs.

Fitting uses either torch (default; on the tokens' device, reading one number back per Lloyd
iteration) or scikit-learn (`backend="sklearn"`, on the CPU); benchmarks/bench_router.py measures both
on the sizes that matter.
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from ..layers.router import Router
from ..settings import AtLeast, SettingError

BACKENDS = ("torch", "sklearn")
# The checks of the expert count and the PCA reduction (ExpansionConfig states them with these).
EXPERTS = AtLeast(1)
PCA_REDUCTION = AtLeast(1)


def pca_components(in_features: int, reduction: int | None) -> int | None:
    """Number of PCA dimensions for a PCA reduction of `reduction` (ExpansionConfig.pca_reduction); None means
    no PCA."""
    if reduction is None:
        return None
    PCA_REDUCTION("pca_reduction", reduction)
    components = in_features // reduction
    if components < 1:
        raise SettingError("pca_reduction", f"{{pca_reduction}} {reduction} leaves no PCA dimensions for a layer "
                                            f"with {in_features} inputs")
    return components


POWER_ITERATIONS = 4
OVERSAMPLING = 10
INITS = ("k-means++", "random")


def _pca_torch(x: torch.Tensor, components: int, seed: int = 0, project: bool = False, overwrite: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean, top principal directions (d_in x components, largest variance first) and, with `project`, the
    tokens projected on them (what `Router.project` gives, from the centred copy already made), on `x.device`.
    `overwrite`: the tokens are centred in place (no copy; `x` is then lost).

    Randomized range finding (Halko, Martinsson & Tropp 2011) with a seeded sketch and a few power
    iterations; when the sketch would be nearly as wide as the data, the exact eigendecomposition
    of the covariance is cheaper and is used instead. The sketch is drawn on the CPU (so a seed gives
    the same sketch on every device) and then moved to the data.
    """
    mean = x.mean(0)
    centred = x.sub_(mean) if overwrite else x - mean
    n, d = centred.shape
    rank = components + OVERSAMPLING
    if 2 * rank >= min(n, d):
        covariance = centred.t() @ centred / max(1, n - 1)
        _, vectors = torch.linalg.eigh(covariance.double())
        top = vectors[:, -components:].flip(1).float()
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        sketch = torch.randn(d, rank, generator=generator).to(centred.device)
        basis = torch.linalg.qr(centred @ sketch).Q
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(centred.t() @ basis).Q
            basis = torch.linalg.qr(centred @ basis).Q
        _, _, vh = torch.linalg.svd(basis.t() @ centred, full_matrices=False)
        top = vh[:components].t()
    # Fix each component's sign (the largest-magnitude entry positive) so fits are reproducible.
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1
    top = (top * signs).contiguous()
    return mean, top, centred @ top if project else None


def _kmeans_plus_plus(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + log k candidates per step), as scikit-learn does.

    Runs on z's device; the draws come from the CPU generator (the n probabilities visit the host once per
    step), so a seed gives the same centres on every device.
    """
    n = z.shape[0]
    trials = 2 + int(math.log(k))
    centres = [z[torch.randint(n, (1,), generator=generator).item()]]
    closest = (z - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        weights = closest.cpu()
        total = weights.sum()
        if total <= 0:  # every token already sits on a centre: any token is as good as another
            candidates = torch.randint(n, (trials,), generator=generator)
        else:
            candidates = torch.multinomial(weights / total, trials, replacement=True, generator=generator)
        candidates = candidates.to(z.device)
        dist = torch.cdist(z[candidates], z).pow(2)  # trials x n: small, on the device
        potentials = torch.minimum(closest.unsqueeze(0), dist).sum(1)
        best = potentials.argmin()
        closest = torch.minimum(closest, dist[best])
        centres.append(z[candidates[best]])
    return torch.stack(centres)


def _random_init(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct tokens, chosen uniformly at random."""
    return z[torch.randperm(z.shape[0], generator=generator)[:k].to(z.device)].clone()


def _lloyd(z: torch.Tensor, centres: torch.Tensor, max_iter: int, threshold: float
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd iterations until the centres move less than `threshold` (squared, summed) or `max_iter`.
    Returns the centres, every token's nearest centre and the inertia. One number is read back per
    iteration (the shift)."""
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
        if shift <= threshold:
            break
    nearest, labels = torch.cdist(z, centres).min(1)
    return centres, labels, nearest.pow(2).sum().item()


def _kmeans_torch(z: torch.Tensor, k: int, restarts: int, seed: int, max_iter: int = 300, tol: float = 1e-4,
                  init: str = "k-means++") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best of `restarts` k-means fits of `z` (tokens x dim, fp32) on its own device.

    Distances are `torch.cdist` on that device (on a GPU it never visits the host); random numbers come
    from a CPU generator seeded with `seed`: a seed gives the same fit every time. Returns the centres,
    every token's nearest centre and the inertia (sum of squared distances).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    threshold = z.var(0).mean().item() * tol  # as scikit-learn: tol relative to the mean variance
    best = None
    for _ in range(restarts):
        start = _kmeans_plus_plus(z, k, generator) if init == "k-means++" else _random_init(z, k, generator)
        fit = _lloyd(z, start, max_iter, threshold)
        if best is None or fit[2] < best[2]:
            best = fit
    return best


def sample_indices(count: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """Which of `count` tokens a router is fitted on: None for all of them (no more than `limit`), else `limit`
    indices drawn uniformly without replacement with `seed`, ascending."""
    if limit is None or count <= limit:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:limit].sort().values


def sample_tokens(x: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """At most `limit` rows of `x` (tokens, features): all of them when there are no more, else a uniform sample
    without replacement drawn with `seed`, kept in their original order."""
    chosen = sample_indices(x.shape[0], limit, seed)
    return x if chosen is None else x[chosen.to(x.device)]


def fit_router(x: torch.Tensor, experts: int, reduction: int | None = 32, restarts: int = 1, seed: int = 0,
               backend: str = "torch", max_iter: int = 300, tol: float = 1e-4, init: str = "k-means++",
               overwrite: bool = False) -> Router:
    """Fit PCA (optional) and k-means on calibration tokens `x` (n_tokens x d_in), in fp32.

    The torch backend fits on `x.device` (a GPU when the block runs there) and the Router's buffers
    live there; scikit-learn fits on the CPU and its Router is moved to `x.device`. `max_iter` Lloyd
    iterations at most, stopping once the centres move less than `tol` times the data's mean variance;
    `init` seeds each of the `restarts` runs with k-means++ or with k distinct random tokens. `overwrite`: `x`
    (fp32) may be overwritten, so that PCA centres it in place instead of copying it (the same numbers).
    """
    EXPERTS("experts", experts)
    if backend not in BACKENDS:
        raise UsageError(f"unknown router backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if restarts < 1:
        raise UsageError(f"k-means restarts must be at least 1, got {restarts}")
    if max_iter < 1:
        raise UsageError(f"k-means max_iter must be at least 1, got {max_iter}")
    if not tol >= 0:
        raise UsageError(f"k-means tol must be at least 0, got {tol}")
    if init not in INITS:
        raise UsageError(f"unknown k-means init {init!r}; choose one of {', '.join(INITS)}")
    x = x.reshape(-1, x.shape[-1]).detach().to(torch.float32)
    if x.shape[0] < experts:
        raise UsageError(f"{experts} experts but only {x.shape[0]} calibration tokens; use fewer experts "
                         "or more calibration data")
    in_features = x.shape[1]
    components = pca_components(in_features, reduction)
    router = Router(in_features, components, experts).to(x.device)
    if experts == 1:
        router.mean.copy_(x.mean(0))
        if components:
            router.projection.copy_(_pca_torch(x, components, seed)[1])
        return router
    if backend == "sklearn":
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        data = x.cpu().numpy()
        if components:
            pca = PCA(n_components=components, random_state=seed).fit(data)
            router.mean.copy_(torch.from_numpy(pca.mean_))
            router.projection.copy_(torch.from_numpy(pca.components_.T.copy()))
            z = pca.transform(data)
        else:
            router.mean.copy_(x.mean(0))
            z = (x - router.mean).cpu().numpy()
        kmeans = KMeans(n_clusters=experts, n_init=restarts, random_state=seed, max_iter=max_iter, tol=tol,
                        init=init).fit(z)
        router.centroids.copy_(torch.from_numpy(kmeans.cluster_centers_))
        return router
    if components:
        mean, projection, z = _pca_torch(x, components, seed, project=True, overwrite=overwrite)
        router.mean.copy_(mean)
        router.projection.copy_(projection)
    else:
        router.mean.copy_(x.mean(0))
        z = router.project(x)
    centres, _, _ = _kmeans_torch(z, experts, restarts, seed, max_iter, tol, init)
    router.centroids.copy_(centres)
    return router
