"""The `generate` job: a greedy continuation of a prompt that fits the model's context, streamed as it comes.

Checked before any token is generated: the prompt (after the chat template) and `max_new_tokens` together fit the
context the model's config declares, and a half-precision `dtype` on a CPU without native support for it is
measured against float32 and named in a notice (it still runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

import torch

from ..errors import UsageError
from ..inference import accelerate
from ..models import load_model
from ..models.loading import context_length
from ..runtime import cpu_flags, parse_dtype
from ..settings import SettingError
from .session import RunSettings
from .settings import GenerateSettings, InferenceSettings

# The CPU flags that give each half-precision dtype native matrix products (x86, as Linux names them).
NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
SLOWER = 1.1  # a measured ratio above this is reported as "slower"
UNKNOWN_FLAGS_SLOWER = 1.5  # with the flags unreadable, only a clear measured slowdown gets a notice


@dataclass
class Generation:
    text: str  # the generated continuation, decoded without special tokens
    prompt_tokens: int  # after the chat template, when there is one
    new_tokens: int  # generated (greedy decoding may stop at end-of-sequence before max_new_tokens)
    context: int | None  # the model's context from its config, when it declares one
    streamed: str | None = None  # what was written to the stream, token by token (None: not streamed)
    notice: str | None = None  # the dtype notice, when there was one


def native_support(dtype: torch.dtype, flags: frozenset[str] | set[str] | None) -> bool | None:
    """Whether a CPU with these feature flags multiplies `dtype` natively; None when the flags are unknown."""
    wanted = NATIVE_FLAGS.get(dtype)
    if wanted is None:  # float32
        return True
    if flags is None:
        return None
    return any(flag in flags for flag in wanted)


def matmul_slowdown(dtype: torch.dtype, tokens: int = 64, width: int = 256, budget_s: float = 0.02) -> float:
    """How many times longer a (tokens x width) by (width x width) matmul takes in `dtype` than in float32 here:
    the best of alternating timings, at least two each, more while `budget_s` lasts (a few ms in all where the
    dtype is native; about 30 ms where a product is 70x slower, as float16 measured on an AVX-512 CPU without
    avx512_fp16)."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, width, generator=generator), torch.randn(width, width, generator=generator)
    operands = {dt: (x.to(dt), w.to(dt)) for dt in (torch.float32, dtype)}
    for a, b in operands.values():
        torch.matmul(a, b)  # warm-up: first-call dispatch and allocation
    best = dict.fromkeys(operands, float("inf"))
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 2 or (rounds < 50 and time.perf_counter() < deadline):
        for dt, (a, b) in operands.items():
            start = time.perf_counter()
            torch.matmul(a, b)
            best[dt] = min(best[dt], time.perf_counter() - start)
        rounds += 1
    return best[dtype] / max(best[torch.float32], 1e-9)


def half_precision_notice(dtype: torch.dtype, flags: frozenset[str] | set[str] | None, ratio: float) -> str | None:
    """The one-line notice for `dtype` on a CPU with `flags`, given the measured time ratio to float32; None when
    the CPU supports the dtype natively (or, with the flags unknown, when it measured no clear slowdown)."""
    supported = native_support(dtype, flags)
    if supported:
        return None
    name = str(dtype).removeprefix("torch.")
    if supported is None:
        if ratio < UNKNOWN_FLAGS_SLOWER:
            return None
        return f"{name}: a matmul measured {ratio:.1f}x slower than float32 on this CPU; consider --dtype float32"
    missing = "/".join(NATIVE_FLAGS[dtype])
    if ratio > SLOWER:
        return (f"{name} has no native support on this CPU (no {missing}): a matmul measured {ratio:.1f}x slower "
                f"than float32 here; consider --dtype float32")
    return (f"{name} has no native support on this CPU (no {missing}), though a matmul measured {ratio:.2f}x "
            f"the float32 time here")


def dtype_notice(dtype: str | torch.dtype, device: str = "cpu") -> str | None:
    """The notice for running `dtype` on `device` (CPU only), measured on this machine."""
    dt = parse_dtype(dtype)
    if not str(device).startswith("cpu") or dt not in NATIVE_FLAGS:
        return None
    flags = cpu_flags()
    if native_support(dt, flags):
        return None
    return half_precision_notice(dt, flags, matmul_slowdown(dt))


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int | None, chat: bool = False) -> None:
    """Refuse a prompt, or a prompt and `max_new_tokens` (at least 1: GenerateSettings checks it), that the
    model's context cannot hold."""
    if context is None:
        return
    prompt = f"the prompt is {prompt_tokens:,} tokens" + (" after the chat template" if chat else "")
    if prompt_tokens >= context:
        room = "longer than" if prompt_tokens > context else "as long as"
        raise UsageError(f"{prompt}, {room} the model's context of {context:,} tokens: shorten the prompt")
    room = context - prompt_tokens
    if max_new_tokens > room:
        raise SettingError("max_new_tokens", f"{{max_new_tokens}} {max_new_tokens:,} does not fit: {prompt} and the "
                                             f"model's context is {context:,}, so at most {room:,} new tokens fit")


def _streamer(tokenizer, file: TextIO):
    """transformers' TextStreamer (skip_prompt=True) writing to `file`; `.pieces` keeps what it wrote."""
    from transformers import TextStreamer

    class Stream(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pieces: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.pieces.append(text)
            file.write(text + ("\n" if stream_end else ""))
            file.flush()

    return Stream()


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """The prompt's token ids, shape (1, n): wrapped in the tokenizer's chat template with `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SettingError("chat", "{chat}: this tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True,
                                             tokenizer_kwargs={"verbose": False})["input_ids"]
    # verbose=False: the tokenizer's own too-long warning would be a second line; check_fits says it in one
    return tokenizer(prompt, return_tensors="pt", verbose=False).input_ids


def run_generate(model: str | None, prompt: str, max_new_tokens: int = GenerateSettings.max_new_tokens, *,
                 chat: bool = GenerateSettings.chat, dtype: str = RunSettings.dtype, device: str = RunSettings.device,
                 kernels: str = InferenceSettings.kernels, trust_remote_code: bool = RunSettings.trust_remote_code,
                 stream: TextIO | None = None, warn: TextIO | None = None) -> Generation:
    """Greedy generation from the model at `model` (None: the embedded one). With `stream`, the prompt and then
    each token as it is decoded are written there (and a final newline); `warn` receives the dtype notice."""
    GenerateSettings(prompt=prompt, max_new_tokens=max_new_tokens, chat=chat)  # its checks, before the model loads
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=True,
                        compact=True)
    tokenizer = loaded.tokenizer
    ids = prompt_ids(tokenizer, prompt, chat)
    context = context_length(loaded.model)
    check_fits(ids.shape[1], max_new_tokens, context, chat)
    notice = dtype_notice(dtype, device)  # after the checks above, so that a refusal stays one line
    if notice and warn is not None:
        warn.write(notice + "\n")
        warn.flush()
    ids = ids.to(device)
    accelerate(loaded.model, kernels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = None
    if stream is not None:
        stream.write(prompt)
        stream.flush()
        streamer = _streamer(tokenizer, stream)
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, use_cache=True, pad_token_id=pad, streamer=streamer)
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text=text, prompt_tokens=ids.shape[1], new_tokens=int(new.numel()), context=context,
                      streamed=None if streamer is None else "".join(streamer.pieces), notice=notice)
