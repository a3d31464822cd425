"""Run by tests/test_distributed.py, as one process and under `torchrun --nproc_per_node 2` (gloo): prune with
SparseGPT and Wanda and build Sparse Expansion (x4, and x16 with small clusters and a router sample) on a tiny
model, each followed by a sharded perplexity; rank 0 writes the weights, the perplexities and every rank's bytes
of cluster statistics to OUT (argv: MODEL_DIR CORPUS_DIR OUT)."""

import copy
import json
import sys

import torch
from safetensors.torch import save_file

from sparse_expansion import distributed
from sparse_expansion.evaluation import perplexity
from sparse_expansion.expansion import ExpansionConfig
from sparse_expansion.pruning import PruneOptions, SparsitySpec
from sparse_expansion.workflow import RunSettings, expand_session_model, open_session, prune_session_model


def main(model_dir: str, corpus_dir: str, out: str) -> None:
    distributed.init_from_env("cpu")
    settings = RunSettings(model=model_dir, data=corpus_dir, calib_samples=10, seqlen=32, eval_samples=7,
                           batch_size=2, quiet=True)
    session = open_session(settings)
    spec = SparsitySpec.create(sparsity=0.5)
    results, statistic_bytes = {}, {}
    # x4 (every cluster used); x16 with 320 calibration tokens leaves clusters under min_cluster_tokens (pruned on
    # the whole statistic, combined across the ranks) and fits its routers on a 200-token sample from both ranks.
    configs = {"sparse-expansion": ExpansionConfig(experts=4, pca_reduction=8, min_cluster_tokens=1),
               "sparse-expansion-x16": ExpansionConfig(experts=16, pca_reduction=8, min_cluster_tokens=16,
                                                       router_tokens=200)}
    for name in ("sparsegpt", "wanda", *configs):
        model = copy.deepcopy(session.model)
        if name in configs:
            report = expand_session_model(session, model, spec, PruneOptions(), configs[name])
            statistic_bytes[name] = distributed.gather_objects(report.statistic_bytes)
            results[f"{name} fallback experts"] = report.fallbacks()
        else:
            prune_session_model(session, model, name, spec, PruneOptions())
        # Two windows per batch: 4 batches, shared out between the ranks.
        results[name] = perplexity(model, session.evaluation(), batch_size=2, progress=False).ppl
        if distributed.is_main():
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            state.pop("lm_head.weight", None)  # tied to the embeddings
            save_file(state, f"{out}/{name}.safetensors")
    if distributed.is_main():
        with open(f"{out}/ppl.json", "w") as handle:
            json.dump({"world": distributed.world(), "ppl": results, "statistic_bytes": statistic_bytes}, handle)
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
