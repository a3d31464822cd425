"""Command-line interface: `sparse-expansion COMMAND`, one of prune, expand, compare, generate, eval, lm-eval,
bench, neurons, activations and law.

main.py: entry point (ranks, error mapping, dispatch); parser.py: the parser generated from the settings;
build_commands.py, model_commands.py, study_commands.py: each command's settings groups and its call into the
workflow; present.py: what each command prints."""

from .main import COMMANDS, main, parser

build_parser = parser

__all__ = ["COMMANDS", "build_parser", "main"]
