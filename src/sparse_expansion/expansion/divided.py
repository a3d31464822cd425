"""Experts divided across the ranks of a torch.distributed run (torchrun): what each rank fits and holds
(`build.fit_group` calls these under torch.distributed and handles small clusters as in one process).

Each rank records only the tokens of its own calibration batches (a contiguous share, `distributed.shard`), and:
1. the router is fitted once, on rank 0, on the tokens (or the `router_tokens` sample) gathered there in rank
   order, which is the one-process order, and broadcast;
2. each rank routes its own tokens; every expert e belongs to rank e mod N (`distributed.owner`), which receives
   that cluster's tokens from the other ranks and accumulates its statistic batch by batch in rank order: the
   same updates in the same order as one process, so the same numbers bit for bit;
3. each rank prunes its own experts and holds only them while the block's statistics exist; once every group is
   pruned, every expert is broadcast from its owner (`distributed.assemble_owned`), because every rank propagates
   its calibration batches through the whole expanded block.
A rank thus holds the statistics of k / N clusters, k / N of the experts while it prunes, and does k / N of the
pruning; the tokens it holds are its own share plus its clusters' tokens from the others, about 2 / N of all of
them instead of all.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..layers import Router, by_expert
from .fitting import fit_router, pca_components, sample_indices


def tokens_dtype(batches: list[torch.Tensor]) -> torch.dtype:
    """The recorded tokens' dtype, from the ranks that recorded any (a rank may have no calibration batch)."""
    return next(d for d in distributed.gather_objects(batches[0].dtype if batches else None) if d is not None)


def _local(batches: list[torch.Tensor], in_features: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.cat(batches) if batches else torch.empty(0, in_features, dtype=dtype, device=device)


def fit_router_once(batches: list[torch.Tensor], in_features: int, dtype: torch.dtype, config,
                    device: torch.device) -> Router:
    """The router of `build.fit_group`, fitted on rank 0 on every rank's tokens (the seeded sample of them) and
    broadcast to the others. `dtype`: the tokens' (the same on every rank)."""
    local = _local(batches, in_features, dtype, device)
    counts = distributed.gather_objects(local.shape[0])
    offset = sum(counts[:distributed.rank()])
    chosen = sample_indices(sum(counts), config.router_tokens, config.seed)
    if chosen is not None:
        mine = chosen[(chosen >= offset) & (chosen < offset + local.shape[0])] - offset
        local = local[mine.to(local.device)]
    tokens = distributed.gather_to(local, 0)
    del local
    if distributed.is_main():
        router = fit_router(tokens, config.experts, config.pca_reduction, config.kmeans_restarts, config.seed,
                            config.backend, max_iter=config.kmeans_iterations, init=config.kmeans_init).to(device)
    else:
        router = Router(in_features, pca_components(in_features, config.pca_reduction), config.experts).to(device)
    del tokens
    for buffer in (router.mean, router.projection, router.centroids):
        distributed.broadcast_(buffer, 0)
    return router


def owned_cluster_statistics(batches: list[torch.Tensor], router: Router, dtype: torch.dtype, new_statistic,
                             device: torch.device) -> tuple[dict[int, object], list[int]]:
    """This rank's clusters' statistics (by expert index; `new_statistic(in_features)`), each fed batch by batch
    with that cluster's tokens from every rank in rank order, and every cluster's token count (batches are
    consumed; `dtype`: the tokens')."""
    experts, owner = router.experts, distributed.owner
    chunks = []  # per local batch: its tokens of each cluster, in the batch's order
    for index, batch in enumerate(batches):
        batch = batch.to(device)
        batches[index] = None  # its grouped copy replaces it: one batch held twice at a time, not all of them
        chunks.append(by_expert(batch, router.assign(batch), experts)[1])
    batches.clear()
    every = distributed.gather_objects([[chunk.shape[0] for chunk in row] for row in chunks])  # per rank
    sizes = [sum(row[e] for rows in every for row in rows) for e in range(experts)]
    statistics = {e: new_statistic(router.in_features) for e in distributed.owned(experts)}
    me = distributed.rank()
    for src, rows in enumerate(every):
        # In rank order, which is the one-process order: each cluster's batches from rank `src`.
        if src == me:
            for dst in range(distributed.world()):
                payload = [c for row in chunks for e, c in enumerate(row) if owner(e) == dst and len(c)]
                if dst != me and payload:
                    distributed.send(torch.cat(payload), dst)
            parts = [(e, c) for row in chunks for e, c in enumerate(row) if e in statistics and len(c)]
            chunks = []
        else:
            wanted = [(e, n) for row in rows for e, n in enumerate(row) if e in statistics and n]
            if not wanted:
                continue
            data = distributed.recv((sum(n for _, n in wanted), router.in_features), dtype, src, device)
            parts = list(zip([e for e, _ in wanted], data.split([n for _, n in wanted]), strict=True))
        for e, chunk in parts:
            statistics[e].update(chunk)
        del parts
    return statistics, sizes
