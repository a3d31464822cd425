"""Run by tests/test_distributed.py, as one process and under `torchrun --nproc_per_node 2` (gloo): prune with
SparseGPT and Wanda and build Sparse Expansion on a tiny model, each followed by a sharded perplexity; rank 0
writes the weights and the perplexities to OUT (argv: MODEL_DIR CORPUS_DIR OUT)."""

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
    results = {}
    for name in ("sparsegpt", "wanda", "sparse-expansion"):
        model = copy.deepcopy(session.model)
        if name == "sparse-expansion":
            expand_session_model(session, model, spec, PruneOptions(), ExpansionConfig(experts=4, pca_reduction=8))
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
            json.dump({"world": distributed.world(), "ppl": results}, handle)
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
