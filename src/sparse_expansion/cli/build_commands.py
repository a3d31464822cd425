"""prune, expand and compare: parse, call the workflow's one build path (workflow/build.py) or compare, print."""

from __future__ import annotations

import shlex
import sys

from ..expansion import ExpansionConfig
from ..pruning import PruneOptions
from ..pruning.methods import PruneSettings
from ..workflow import build, format_table
from ..workflow.compare import report_path, run_compare
from ..workflow.report import format_summary
from ..workflow.session import RunSettings
from ..workflow.settings import CompareSettings, EvalSettings, OutputSettings, SeedSettings
from . import present
from .parser import Command, Group, Parsed

PRUNING = "pruning"
EXPANSION = "sparse expansion"
DATA = "model and data (shared by every command that reads data)"
OUTPUT = "output"
BUILD_OUTPUT = Group(OutputSettings, OUTPUT, exclude=("json",), required=("out",))
SPREAD = Group(SeedSettings, "spread over calibration draws (with --eval)")


def _expansion(parsed: Parsed, settings: RunSettings, **override) -> ExpansionConfig:
    return parsed.get(ExpansionConfig, seed=settings.seed, **override)


def run_prune(parsed: Parsed) -> int:
    settings, output = parsed.get(RunSettings), parsed.get(OutputSettings)
    job = build.BuildJob(parsed.get(PruneSettings), parsed.get(PruneOptions))
    present.built(build.run_over_seeds(settings, job, output, parsed.get(SeedSettings)), output.out)
    return 0


def run_expand(parsed: Parsed) -> int:
    settings, output = parsed.get(RunSettings), parsed.get(OutputSettings)
    job = build.BuildJob(parsed.get(PruneSettings), parsed.get(PruneOptions), _expansion(parsed, settings))
    present.built(build.run_over_seeds(settings, job, output, parsed.get(SeedSettings)), output.out)
    return 0


def run_compare_command(parsed: Parsed) -> int:
    settings, output, chosen = parsed.get(RunSettings), parsed.get(OutputSettings), parsed.get(CompareSettings)
    expansion = _expansion(parsed, settings, experts=chosen.experts[0])
    command_line = "sparse-expansion " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_compare(settings, chosen, parsed.get(PruneSettings), parsed.get(PruneOptions), expansion, output,
                         command_line, parsed.get(EvalSettings))
    print(format_table(result.rows))
    print()
    print(format_summary(result.summary))
    if output.json or output.resume:
        markdown = report_path(chosen, output)
        print(f"report: {markdown}" + (f"; json: {output.json}; figure: {result.figure}" if output.json else ""))
    return 0


COMMANDS = [
    Command("prune", "prune a model and save it", (
        Group(PruneSettings, PRUNING), Group(PruneOptions, PRUNING), Group(RunSettings, DATA), BUILD_OUTPUT, SPREAD),
        run_prune),
    Command("expand", "build a Sparse Expansion model (mixture of sparse FFN experts) and save it", (
        Group(PruneSettings, PRUNING, exclude=("method",)), Group(PruneOptions, PRUNING),
        Group(ExpansionConfig, EXPANSION), Group(RunSettings, DATA, exclude=("scope",)), BUILD_OUTPUT, SPREAD),
        run_expand),
    Command("compare", "several methods on the same calibration and test windows", (
        Group(CompareSettings, "compare"), Group(PruneSettings, PRUNING, only=("nm",)), Group(PruneOptions, PRUNING),
        Group(ExpansionConfig, EXPANSION, exclude=("experts",)), Group(RunSettings, DATA),
        Group(EvalSettings, "evaluation"), Group(OutputSettings, OUTPUT, only=("json", "resume"))),
        run_compare_command),
]
