"""generate, eval, lm-eval and bench: commands that run a model (or kernels) and report on it."""

from __future__ import annotations

import json
import sys

from .. import distributed, workflow
from ..bench.kernel import activation_benchmark, kernel_benchmark, semi_structured_benchmark
from ..bench.model import model_benchmark
from ..evaluation import zero_shot
from ..io import atomic_write_text, check_output_path
from ..models import load_model
from ..models.loading import check_model_spec
from ..workflow.generate import run_generate
from ..workflow.jobs import open_session_for
from ..workflow.report import machine_environment
from ..workflow.session import RunSettings
from ..workflow.settings import (
    BenchSettings,
    EvalSettings,
    GenerateSettings,
    InferenceSettings,
    LmEvalSettings,
    OutputSettings,
)
from . import present
from .parser import Command, Group, Parsed

MODEL = "model"
MODEL_ONLY = ("model", "device", "dtype", "trust_remote_code", "quiet")
JSON = Group(OutputSettings, "output", only=("json",))


def run_generate_command(parsed: Parsed) -> int:
    model, chosen = parsed.get(RunSettings), parsed.get(GenerateSettings)
    kernels = parsed.get(InferenceSettings).kernels
    result = run_generate(model.model, chosen.prompt, chosen.max_new_tokens, chat=chosen.chat, dtype=model.dtype,
                          device=model.device, kernels=kernels, trust_remote_code=model.trust_remote_code,
                          stream=None if model.quiet else sys.stdout, warn=sys.stderr)
    if model.quiet:  # otherwise the prompt and every token were streamed to stdout as they came
        print(result.text)
    return 0


def run_eval(parsed: Parsed) -> int:
    settings, output = parsed.get(RunSettings), parsed.get(OutputSettings)
    if output.json:
        check_output_path(output.json, overwrite=True)
    session = open_session_for(settings, parsed.get(EvalSettings).streamed, compact=settings.device == "cpu")
    result = workflow.evaluate(session, session.model)
    result.update({"model": session.loaded.source, "seqlen": settings.seqlen, "data": session.data_summary()})
    present.perplexity(result, settings.seqlen)
    if output.json:
        distributed.on_main(atomic_write_text, output.json, json.dumps(result, indent=2) + "\n")
    return 0


def run_lm_eval(parsed: Parsed) -> int:
    model, chosen, output = parsed.get(RunSettings), parsed.get(LmEvalSettings), parsed.get(OutputSettings)
    if output.json:
        check_output_path(output.json, overwrite=True)
    check_model_spec(model.model)  # a missing model fails before lm-eval indexes its tasks (half a minute)
    manager = zero_shot.task_manager(chosen.include_path)  # unknown tasks fail before the model loads
    tasks = zero_shot.check_tasks(manager, chosen.tasks)
    loaded = load_model(model.model, dtype=model.dtype, device=model.device, trust_remote_code=model.trust_remote_code,
                        quiet=model.quiet, compact=True)
    result = zero_shot.run_lm_eval(loaded, tasks, include_path=chosen.include_path, limit=chosen.limit,
                                   batch_size=chosen.batch_size, num_fewshot=chosen.num_fewshot, device=model.device,
                                   manager=manager, quiet=model.quiet)
    result["model"] = loaded.source
    print(zero_shot.format_results(result))
    if output.json:
        atomic_write_text(output.json, json.dumps(result, indent=2) + "\n")
    return 0


def run_bench(parsed: Parsed) -> int:
    bench, device = parsed.get(BenchSettings), parsed.get(RunSettings).device
    output, kernels = parsed.get(OutputSettings), parsed.get(InferenceSettings).kernels
    bench.check_device(device)
    if output.json:
        check_output_path(output.json, overwrite=True)
    dtype = parsed.get(RunSettings).dtype
    if bench.model:
        result = model_benchmark(bench.model, bench.baseline, bench.prompt_tokens, bench.new_tokens, bench.repeats,
                                 kernels=kernels, dtype=dtype)
        present.model_bench(result)
    elif bench.activation_sparsity is not None:
        result = activation_benchmark(bench.rows, bench.cols, bench.activation_sparsity, batch=bench.batch)
        present.activation_bench(result, bench)
    elif device.startswith("cuda"):
        result = semi_structured_benchmark(bench.rows, bench.cols, batch=bench.batch)
        present.semi_structured_bench(result, bench)
    else:
        result = kernel_benchmark(bench.rows, bench.cols, bench.weight_sparsity, batch=bench.batch, dtype=dtype,
                                  bits=bench.bits)
        present.kernel_bench(result, bench)
    result["environment"] = machine_environment()
    if output.json:
        atomic_write_text(output.json, json.dumps(result, indent=2) + "\n")
    return 0


COMMANDS = [
    Command("generate", "generate text with a dense, pruned or expanded model (KV cache on)", (
        Group(GenerateSettings, "generation", required=("prompt",)), Group(RunSettings, MODEL, only=MODEL_ONLY),
        Group(InferenceSettings, MODEL)), run_generate_command),
    Command("bench", "speed: a model against a dense baseline (--model), or kernels (--kernel)", (
        Group(BenchSettings, "benchmark"), Group(RunSettings, MODEL, only=("device", "dtype", "quiet")),
        Group(InferenceSettings, MODEL), JSON), run_bench),
    Command("eval", "perplexity of a model", (
        Group(EvalSettings, "evaluation"), Group(RunSettings, "model and data", exclude=("scope",)), JSON), run_eval),
    Command("lm-eval", "zero-shot tasks (BoolQ, RTE, HellaSwag, ...) through lm-evaluation-harness", (
        Group(LmEvalSettings, "lm-eval"), Group(RunSettings, MODEL, only=MODEL_ONLY), JSON), run_lm_eval),
]
