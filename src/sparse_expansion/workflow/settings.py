"""The settings of the jobs that the lower layers do not own: where a job writes, what compare runs, the
activation-sparsity and Sparsing Law studies, generation, benchmarks and lm-eval. Each field states its default,
help and check once (settings.py); the CLI's parser and the Python API are built from these and from the layers'
own settings (RunSettings, PruneSettings, PruneOptions, ExpansionConfig, NeuronOptions, TrainConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluation.zero_shot import BATCH_SIZE, DEFAULT_TASKS, LIMIT, NUM_FEWSHOT
from ..expansion import ExpansionConfig
from ..expansion.fitting import EXPERTS
from ..io.compressed import WEIGHT_FORMATS
from ..pruning.spec import SPARSITY
from ..settings import (
    AtLeast,
    Each,
    Interval,
    OneOf,
    Positive,
    SettingError,
    check_fields,
    floats,
    ints,
    names,
    not_empty,
    setting,
)
from ..training.trainer import ACTIVATIONS


@dataclass(frozen=True)
class OutputSettings:
    """Where and how a job writes its result."""

    out: str | None = setting(None, "output directory (written atomically)")
    overwrite: bool = setting(False, "replace an existing output directory")
    format: str = setting("auto", "weights: compressed sparse tensors (auto: when smaller) or a dense checkpoint "
                                  "that any Hugging Face tool reads", choices=WEIGHT_FORMATS)
    eval: bool = setting(False, "also measure perplexity and record it in the manifest")
    resume: str | None = setting(None, "continue an interrupted run from its state directory (OUT.partial; compare: "
                                       "JSON.partial); the result is the one an uninterrupted run gives",
                                 metavar="DIR")
    json: str | None = setting(None, "write the result as JSON")

    def __post_init__(self):
        check_fields(self)


SEEDS = setting(1, "runs, run i drawing its calibration windows (and k-means, token pairs, random choices) with "
                   "seed --seed + i; the test windows stay the same, so runs pair by seed; mean, std and 95% "
                   "intervals in the results", AtLeast(1))


@dataclass(frozen=True)
class SeedSettings:
    """How many calibration draws a job repeats over (its spread; evaluation/spread.py)."""

    seeds: int = SEEDS

    def __post_init__(self):
        check_fields(self)

    def of(self, first: int) -> list[int]:
        """The seeds of the runs: first, first + 1, ..."""
        return [first + i for i in range(self.seeds)]


@dataclass(frozen=True)
class CompareSettings:
    """What compare runs: every method at every sparsity (and expert count) on the same windows."""

    methods: tuple[str, ...] = setting(factory=lambda: ("dense", "magnitude", "wanda", "sparsegpt"),
                                       help="comma-separated: dense, magnitude, wanda, sparsegpt, sparse-expansion",
                                       parse=names, check=not_empty)
    sparsities: tuple[float, ...] = setting(factory=lambda: (0.5,), help="sparsities in [0, 1), e.g. 0.5,0.7",
                                            check=Each(SPARSITY), parse=floats, flag="--sparsity")
    experts: tuple[int, ...] = setting(factory=lambda: (ExpansionConfig.experts,),
                                       help="experts per FFN linear, one Sparse Expansion run each: e.g. 1,4,16",
                                       check=Each(EXPERTS), parse=ints)
    report: str | None = setting(None, "Markdown report (default: next to --json, .md)")
    seeds: int = SEEDS
    reference: str | None = setting(None, "the method each other is compared with, seed by seed (default: "
                                          "sparsegpt when compared, else dense)")

    def __post_init__(self):
        check_fields(self)
        not_empty("experts", self.experts)


PPL_INCREASE = setting(0.01, "perplexity rise over dense that sets the CETT (0.01: PPL-1%)", Positive())


@dataclass(frozen=True)
class ActivationSettings:
    """The activation-sparsity job: CETT thresholds at PPL-p%."""

    ppl_increase: float = PPL_INCREASE
    max_tokens: int = setting(4096, "calibration tokens per layer used to find its threshold", AtLeast(1))
    baselines: bool = setting(False, "also sweep perplexity against activation ratio for CETT, top-k per layer, one "
                                     "global threshold (FAT-epsilon) and exact zeros (a plot next to --json)")

    def __post_init__(self):
        check_fields(self)


def _width_depth(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        try:
            hidden, layers = (int(v) for v in item.split("x"))
        except ValueError:
            raise ValueError(f"expects HIDDENxLAYERS items, e.g. 64x16; got {item!r}") from None
        pairs.append((hidden, layers))
    return tuple(pairs)


def _positive_pairs(parameter: str, value) -> None:
    for hidden, layers in value:
        if hidden < 1 or layers < 1:
            raise SettingError(parameter, f"{{{parameter}}} {hidden}x{layers}: hidden size and layers must be at "
                                          "least 1")


@dataclass(frozen=True)
class LawSettings:
    """The Sparsing Law study around the trainer's runs (training/trainer.TrainConfig)."""

    activations: tuple[str, ...] = setting(factory=lambda: ("relu", "silu"),
                                           help="activations of the main runs", parse=names,
                                           check=Each(OneOf(tuple(ACTIVATIONS))))
    width_depth: tuple[tuple[int, int], ...] = setting(factory=lambda: ((64, 16), (128, 4), (256, 1)),
                                                       help="hidden x layers of the ReLU sweep, e.g. 64x16,128x4 "
                                                            "(empty: none)", parse=_width_depth,
                                                       check=_positive_pairs)
    sweep_steps: int = setting(200, "training steps of each width-depth run", AtLeast(1))
    ppl_increase: float = PPL_INCREASE
    valid_windows: int = setting(32, "validation windows of every checkpoint's measurement", AtLeast(1))

    def __post_init__(self):
        check_fields(self)
        not_empty("activations", self.activations)


# Evaluate the whole model when its weights take at most this share of the device's free memory (the rest is for
# the activations, the logits and what the process already holds); else block by block.
WHOLE_MODEL_SHARE = 0.6


@dataclass(frozen=True)
class EvalSettings:
    streamed: bool = setting(False, "hold one decoder block in memory, read from disk at its turn, in evaluation "
                                    "and in the calibration walks (chosen automatically when the model's weights "
                                    f"exceed {WHOLE_MODEL_SHARE:.0%} of the device's free memory)")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class InferenceSettings:
    kernels: str = setting("auto", "auto: pruned layers on the CPU (fp32, bf16, fp16, or a --bits grid) use the "
                                   "sparse kernels wherever they measured faster than dense; always: sparse kernels "
                                   "at every size; off: dense only",
                           choices=("auto", "always", "off"))

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class GenerateSettings:
    prompt: str = setting("", "prompt text")
    max_new_tokens: int = setting(64, "tokens to generate", AtLeast(1))
    chat: bool = setting(False, "wrap the prompt in the tokenizer's chat template")

    def __post_init__(self):
        check_fields(self)
        if not self.prompt.strip() and not self.chat:
            raise SettingError("prompt", "{prompt} is empty: give some text to continue")


KERNEL_SPARSITY = 0.7  # bench --kernel's weight sparsity when none is given
KERNEL_BITS = (4, 8)  # the grids the kernels hold as codes


@dataclass(frozen=True)
class BenchSettings:
    """Speed: a saved model against a dense baseline, or dense against sparse products on random weights."""

    kernel: bool = setting(False, "dense versus sparse products on random weights")
    model: str | None = setting(None, "model directory to measure against --baseline")
    baseline: str | None = setting(None, "dense baseline (default: the embedded model)")
    prompt_tokens: int = setting(128, "prompt tokens of the model benchmark", AtLeast(1))
    new_tokens: int = setting(32, "generated tokens of the model benchmark", AtLeast(1))
    repeats: int = setting(3, "repeats of the model benchmark (the median is kept)", AtLeast(1))
    rows: int = setting(11008, "--kernel: output rows of the weight", AtLeast(1))
    cols: int = setting(4096, "--kernel: input columns of the weight", AtLeast(1))
    sparsity: float | None = setting(None, f"--kernel: weight sparsity (default {KERNEL_SPARSITY})", SPARSITY)
    activation_sparsity: float | None = setting(
        None, "--kernel: a thresholded down projection (--rows outputs, --cols neurons) with this fraction of its "
              "inputs below threshold, instead of a pruned weight", Interval(0, 1, closed_low=True, open_high=True))
    batch: int = setting(128, "tokens in the batched case", AtLeast(1))
    bits: int | None = setting(None, "--kernel: the weight's kept values on a B-bit grid (as `prune --bits` stores "
                                     "them), held and multiplied as codes", metavar="B", choices=KERNEL_BITS)

    def __post_init__(self):
        check_fields(self)
        if self.bits is not None and (not self.kernel or self.activation_sparsity is not None):
            raise SettingError("bits", "{bits} applies to {kernel} with a pruned weight (a {model} is measured as it "
                                       "was saved)")
        if self.kernel == bool(self.model):
            raise SettingError("kernel", "bench needs exactly one of {kernel} or {model} DIR")
        if self.kernel and self.baseline is not None:
            raise SettingError("baseline", "{baseline} needs {model} DIR (it is the model's dense reference)")
        if self.kernel and self.activation_sparsity is not None and self.sparsity is not None:
            raise SettingError("sparsity", "give either {sparsity} (a pruned weight) or {activation_sparsity}, "
                                           "not both")
        if not self.kernel:
            for name in ("activation_sparsity", "sparsity"):
                if getattr(self, name) is not None:
                    raise SettingError(name, f"{{{name}}} needs {{kernel}} (a {{model}} is measured as it was saved)")

    def check_device(self, device: str) -> None:
        if device == "cpu":
            return
        if not self.kernel:
            raise SettingError("device", "{device} applies to {kernel}; bench {model} runs on the CPU")
        if self.activation_sparsity is not None:
            raise SettingError("device", "{activation_sparsity} measures the CPU kernel; drop {device}")
        if self.sparsity is not None or self.bits is not None:
            raise SettingError("device", f"{{device}} {device} measures 2:4 (50%) semi-structured products; "
                                         "drop {sparsity} and {bits}")

    @property
    def weight_sparsity(self) -> float:
        return KERNEL_SPARSITY if self.sparsity is None else self.sparsity


@dataclass(frozen=True)
class LmEvalSettings:
    """Zero-shot tasks through lm-evaluation-harness."""

    tasks: tuple[str, ...] = setting(factory=lambda: DEFAULT_TASKS,
                                     help="comma-separated lm-eval task names (default: the SparseGPT/Wanda "
                                          "zero-shot suite, online); sparse_expansion_local_mc works offline",
                                     parse=names, check=not_empty)
    include_path: tuple[str, ...] | None = setting(None, "directory of your own lm-eval task YAML files "
                                                         "(repeatable)", repeat=True)
    limit: int | None = setting(None, "at most N examples per task (quick checks only)", LIMIT)
    num_fewshot: int = setting(0, "few-shot examples per prompt", NUM_FEWSHOT)
    batch_size: int = setting(8, "requests per forward pass", BATCH_SIZE)

    def __post_init__(self):
        check_fields(self)
