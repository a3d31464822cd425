"""A session: one loaded model with its layout, and the calibration and test windows of one command,
each tokenized once and shared by every job of the command."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..data import Corpus, calibration_windows, evaluation_windows, load_corpus, resolve_bos
from ..data.windows import BOS, BOS_MODES, SEQLEN, WINDOWS
from ..models import ModelLayout, discover, load_model
from ..models.loading import LoadedModel, context_length, open_model_streamed
from ..runtime import release_memory, resolve_device
from ..settings import AtLeast, SettingError, check_fields, setting


@dataclass
class RunSettings:
    """The model, the data and the compute of a command (checked on construction)."""

    model: str | None = setting(None, "local HF directory, .gguf file or hub id (default: the embedded "
                                      "SmolLM2-135M-Instruct)")
    data: str | None = setting(None, "embedded (default), a .txt file or directory, wikitext2 or c4 (online)")
    calib_samples: int = setting(128, "calibration windows", WINDOWS)
    seqlen: int = setting(2048, "tokens per window", SEQLEN)
    eval_samples: int | None = setting(None, "limit the number of test windows", WINDOWS)
    seed: int = setting(0, "seed for the calibration windows (and the routers' k-means)")
    device: str = setting("cpu", "compute device: cpu or cuda")
    dtype: str = setting("float32", "float32, float16 or bfloat16")
    scope: str = setting("ffn", "ffn: FFN linears only (as in Sparse Expansion); all: every linear in the blocks",
                         choices=("ffn", "all"))
    batch_size: int = setting(8, "calibration windows per forward pass", AtLeast(1))
    threads: int | None = setting(None, "torch threads for the run (default: torch's choice, the cores); the same "
                                        "threads give the same rounding, so a run repeats exactly", AtLeast(1))
    bos: str = setting("auto", "start every calibration and test window with the BOS token: auto (when the "
                               "tokenizer adds one on encoding, e.g. Gemma), always, or never (the SparseGPT/Wanda "
                               "protocol: windows cut from one token stream)", BOS, choices=BOS_MODES)
    quiet: bool = setting(False, "no progress bars")
    trust_remote_code: bool = setting(False, "allow custom model code from the hub")
    offload_dir: str | None = setting(None, "keep the calibration activations in files under DIR instead of memory "
                                            "(for models whose activations do not fit)", metavar="DIR")

    def __post_init__(self):
        check_fields(self)
        resolve_device(self.device)

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("model", "data", "calib_samples", "seqlen", "eval_samples", "seed",
                                              "device", "dtype", "scope", "bos", "batch_size", "threads")}


@dataclass
class Session:
    """A loaded model with its layout and the data windows, shared by the steps of one command."""

    settings: RunSettings
    loaded: LoadedModel
    layout: ModelLayout
    corpus: Corpus | None = None
    calib: torch.Tensor | None = field(default=None, repr=False)  # set to use windows of your own
    _eval: torch.Tensor | None = field(default=None, repr=False)
    _bos: int | None | bool = field(default=False, repr=False)  # False: not resolved yet
    warned: set = field(default_factory=set, repr=False)  # calibration-size warnings already printed

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def bos_token_id(self) -> int | None:
        """The token every window starts with (None: windows are cut from the stream as they fall)."""
        if self._bos is False:
            self._bos = resolve_bos(self.tokenizer, self.settings.bos)
        return self._bos

    def _corpus(self) -> Corpus:
        if self.corpus is None:
            self.corpus = load_corpus(self.settings.data)
        return self.corpus

    def calibration(self) -> torch.Tensor:
        if self.calib is None:
            s = self.settings
            self.calib = calibration_windows(self._corpus(), self.tokenizer, s.calib_samples, s.seqlen, s.seed,
                                             bos=self.bos_token_id)
            release_memory()  # tokenizing a corpus leaves hundreds of MB of freed heap behind
        return self.calib

    def use_seed(self, seed: int) -> None:
        """Draw the calibration windows with `seed` from now on (the test windows stay the ones already cut)."""
        if self.settings.seed != seed:
            self.settings = dataclasses.replace(self.settings, seed=seed)
            self.calib = None

    def evaluation(self) -> torch.Tensor:
        if self._eval is None:
            s = self.settings
            self._eval = evaluation_windows(self._corpus(), self.tokenizer, s.seqlen, s.eval_samples,
                                            bos=self.bos_token_id)
            release_memory()
        return self._eval

    def data_summary(self) -> dict | None:
        """The corpus and the windows used, for reports and manifests."""
        summary = dict(self.corpus.summary()) if self.corpus else {}
        summary["bos"] = self.settings.bos
        summary["bos_token_id"] = None if self._bos is False else self._bos
        if self.calib is not None:
            summary["calib_windows"] = int(self.calib.shape[0])
            summary["calib_tokens"] = int(self.calib.numel())
        return summary


def open_session(settings: RunSettings, stream: bool = False, compact: bool = False) -> Session:
    """Validate cheap options, load the model (on the CPU; blocks visit the device one at a time). `stream`:
    leave the blocks on disk until their turn where the model directory allows it; `compact` (evaluation
    only): an expanded model's experts held as CSR copies, not k dense copies of every FFN matrix."""
    loaded = load_model(settings.model, dtype=settings.dtype, device="cpu",
                        trust_remote_code=settings.trust_remote_code, quiet=settings.quiet, stream=stream,
                        compact=compact)
    return session_for(loaded, settings)


def open_streamed_session(settings: RunSettings) -> Session:
    """A session whose model keeps its decoder blocks on disk until their turn (streamed evaluation)."""
    return session_for(open_model_streamed(settings.model, dtype=settings.dtype, device=settings.device,
                                           trust_remote_code=settings.trust_remote_code, quiet=settings.quiet),
                       settings)


def session_for(loaded: LoadedModel, settings: RunSettings) -> Session:
    """A session around a model already in memory."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    limit = context_length(loaded.model)
    if limit is not None and settings.seqlen > limit:
        raise SettingError("seqlen", f"{{seqlen}} {settings.seqlen} is longer than the model's context of {limit} "
                                     "tokens")
    return Session(settings=settings, loaded=loaded, layout=discover(loaded.model))
