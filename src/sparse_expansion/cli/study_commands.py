"""neurons, activations and law: the studies (entanglement, activation sparsity, the Sparsing Law)."""

from __future__ import annotations

import json
import os

from .. import workflow
from ..activation.plots import curves_figure
from ..io import atomic_write_text, check_output_path
from ..models.model_dir import save_model_dir
from ..training.trainer import TrainConfig
from ..workflow.activations import run_activations_over_seeds
from ..workflow.jobs import open_session_for
from ..workflow.law import run_law
from ..workflow.neurons import NeuronOptions, check_seeds, run_neurons
from ..workflow.session import RunSettings
from ..workflow.settings import ActivationSettings, EvalSettings, LawSettings, OutputSettings, SeedSettings
from . import present
from .parser import Command, Group, Parsed

DATA = "model and data"
STUDY_DATA = Group(RunSettings, DATA, exclude=("scope", "offload_dir"))
SPREAD = Group(SeedSettings, "spread over calibration draws")
STREAMED = Group(EvalSettings, "memory")


def run_neurons_command(parsed: Parsed) -> int:
    settings, output = parsed.get(RunSettings), parsed.get(OutputSettings)
    options = parsed.get(NeuronOptions, seed=settings.seed)
    options.load_expanded()
    seeds = parsed.get(SeedSettings).of(settings.seed)
    check_seeds(options, seeds)
    check_output_path(output.out, output.overwrite)
    session = open_session_for(settings, parsed.get(EvalSettings).streamed)
    options.blocks(len(session.layout.blocks))  # a bad --layers fails before any work
    present.neurons(run_neurons(session, output.out, options, overwrite=output.overwrite,
                                seeds=seeds), output.out)
    return 0


def run_activations_command(parsed: Parsed) -> int:
    settings, output, chosen = parsed.get(RunSettings), parsed.get(OutputSettings), parsed.get(ActivationSettings)
    if output.json:
        check_output_path(output.json, overwrite=True)
    if output.out:
        check_output_path(output.out, output.overwrite)
    session = open_session_for(settings, parsed.get(EvalSettings).streamed)
    result = run_activations_over_seeds(session, parsed.get(SeedSettings).of(settings.seed), chosen.ppl_increase,
                                        chosen.max_tokens, install=bool(output.out), baselines=chosen.baselines)
    present.activations(result, chosen.ppl_increase)
    if output.json:
        atomic_write_text(output.json, json.dumps(result, indent=2) + "\n")
        if result["curves"]:
            figure = os.path.splitext(output.json)[0] + ".png"
            curves_figure(result["curves"], result["dense_ppl"], figure, session.loaded.source.split(" (")[0])
            print(f"curves: {figure}")
    if output.out:
        record = {k: v for k, v in result.items() if k not in ("model", "settings", "data")}
        save_model_dir(session.model, session.tokenizer, output.out,
                       workflow.manifest(session, "activations", extra={"activation_sparsity": record}),
                       weight_format=output.format, overwrite=output.overwrite)
        print(f"model with thresholds -> {output.out}")
    return 0


def run_law_command(parsed: Parsed) -> int:
    base, study = parsed.get(TrainConfig), parsed.get(LawSettings)
    settings, output = parsed.get(RunSettings), parsed.get(OutputSettings)
    result = run_law(output.out, base, list(study.activations), list(study.width_depth), study.sweep_steps,
                     study.ppl_increase, study.valid_windows, progress=not settings.quiet, device=settings.device)
    present.law(result, output.out)
    return 0


COMMANDS = [
    Command("neurons", "neuron entanglement: Wasserstein distance of every FFN neuron to a Gaussian, mapping "
                       "difficulty, ablation, disentanglement", (
        Group(NeuronOptions, "neurons"), STUDY_DATA, SPREAD, STREAMED,
        Group(OutputSettings, "output", only=("out", "overwrite"), required=("out",))), run_neurons_command),
    Command("activations", "activation sparsity: per-layer CETT thresholds and the PPL-p% activation ratio "
                           "(Sparsing Law)", (
        Group(ActivationSettings, "activation sparsity"), STUDY_DATA, SPREAD, STREAMED,
        Group(OutputSettings, "output", only=("out", "overwrite", "format", "json"))), run_activations_command),
    Command("law", "Sparsing Law at small scale: train ReLU and SiLU models, activation ratio against tokens seen, "
                   "the paper's fits, a width-to-depth sweep (resumable: run again with the same options)", (
        Group(TrainConfig, "training"), Group(LawSettings, "study"),
        Group(RunSettings, "compute", only=("device", "quiet")),
        Group(OutputSettings, "output", only=("out",), required=("out",))), run_law_command),
]
