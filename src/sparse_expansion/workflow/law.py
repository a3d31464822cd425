"""The `law` job: train small ReLU and SiLU models on the embedded corpus, measure the CETT-PPL-p% activation
ratio at every checkpoint, fit the Sparsing Law, and sweep the width-to-depth ratio. Resumable: run it again
with the same options and it continues where it stopped."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..data import load_corpus
from ..data.windows import tokenize
from ..errors import UsageError
from ..io import atomic_write_text
from ..io.state_dir import StateDir
from ..training.law import fit_law, run_law_measurements
from ..training.trainer import TrainConfig, compact_vocabulary, train

STUDY_FILE = "study.json"


def _open_study(out: Path, settings: dict) -> StateDir:
    """Create the study directory, or reopen one that holds these very settings."""
    return StateDir(out, settings, resume=None, file=STUDY_FILE, what="law study")


def _data(config: TrainConfig, valid_windows: int, calib_windows: int, seed: int):
    from transformers import AutoTokenizer

    from ..models.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(quiet=True))
    corpus = load_corpus(None)
    train_ids = tokenize(tokenizer, corpus.train_text, add_special_tokens=False)
    test_ids = tokenize(tokenizer, corpus.test_text, add_special_tokens=False)
    mapping = compact_vocabulary(train_ids, config.vocab)
    train_tokens = mapping[train_ids]
    test_tokens = mapping[test_ids.clamp_max(mapping.numel() - 1)]
    need = valid_windows * config.seqlen
    if test_tokens.numel() < need:
        raise UsageError(f"the test split has {test_tokens.numel()} tokens, fewer than {valid_windows} windows")
    valid = test_tokens[:need].view(valid_windows, config.seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(train_tokens.numel() - config.seqlen, (calib_windows,), generator=generator)
    calib = torch.stack([train_tokens[s:s + config.seqlen] for s in starts.tolist()])
    return train_tokens, calib, valid


def run_law(out: str, base: TrainConfig, activations: list[str], width_depth: list[tuple[int, int]],
            sweep_steps: int, increase: float = 0.01, valid_windows: int = 32, calib_windows: int = 16,
            progress: bool = True, device: str = "cpu") -> dict:
    """The study under `out`; `sweep_steps`, `increase` and `valid_windows` come checked from LawSettings
    (workflow/settings.py)."""
    from ..runtime import resolve_device

    device = resolve_device(device)
    configs = {f"{a}-h{base.hidden}-l{base.layers}": replace(base, activation=a) for a in activations}
    sweep = {f"relu-h{h}-l{n}-sweep": replace(base, activation="relu", hidden=h, layers=n, heads=max(1, h // 32),
                                                steps=sweep_steps, checkpoint_every=sweep_steps)
             for h, n in width_depth}  # each config checked on construction
    root = Path(out)
    _open_study(root, {"runs": {k: asdict(v) for k, v in {**configs, **sweep}.items()}, "ppl_increase": increase,
                       "valid_windows": valid_windows, "calib_windows": calib_windows})
    train_tokens, calib, valid = _data(base, valid_windows, calib_windows, base.seed)
    result = {"ppl_increase": increase, "train_tokens_available": int(train_tokens.numel()),
              "valid_tokens": int(valid.numel()), "runs": {}, "width_depth": []}
    for name, config in configs.items():
        train(root / name, config, train_tokens, progress, device)
        measured = run_law_measurements(config, root / name, calib, valid, increase, device)
        rows = measured["checkpoints"]
        measured["fit"] = fit_law(config.activation, [r["tokens"] for r in rows], [r["activation_ratio"] for r in rows])
        measured["config"] = asdict(config)
        measured["non_embedding_parameters"] = config.non_embedding_parameters()
        result["runs"][name] = measured
    for name, config in sweep.items():
        train(root / name, config, train_tokens, progress, device)
        measured = run_law_measurements(config, root / name, calib, valid, increase, device)
        final = measured["checkpoints"][-1]
        result["width_depth"].append({"run": name, "hidden": config.hidden, "layers": config.layers,
                                      "width_depth_ratio": config.hidden / config.layers,
                                      "non_embedding_parameters": config.non_embedding_parameters(),
                                      "tokens": final["tokens"], "activation_ratio": final["activation_ratio"],
                                      "dense_ppl": final["dense_ppl"], "cett": measured["cett"]})
    atomic_write_text(root / "law.json", json.dumps(result, indent=2) + "\n")
    from ..training.plots import law_figure, width_depth_figure

    law_figure(result, root / "law.png")
    if result["width_depth"]:
        width_depth_figure(result["width_depth"], root / "width_depth.png")
    return result
