"""`generate`: the prompt and --max-new-tokens must fit the model's context, tokens stream as they come, and a
half-precision --dtype without native CPU support gets a measured notice. Tiny models: context 256 tokens."""

from __future__ import annotations

import io
import shutil

import pytest
import torch

from sparse_expansion.cli import main
from sparse_expansion.runtime import cpu_flags
from sparse_expansion.workflow import generate as gen

CONTEXT = 256  # max_position_embeddings of the tiny models (conftest.py)
PREFIX = "sparse-expansion: error:"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def cli(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "Traceback" not in err, err
    return lines[0]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


def prompt_of(tokenizer, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens with the tiny tokenizer."""
    text = "The quick brown fox"
    while n_tokens(tokenizer, text) < tokens:
        text += "."  # ".." was never merged: each dot is one more token
    assert n_tokens(tokenizer, text) == tokens
    return text


@pytest.fixture(scope="module")
def chat_dir(llama_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    path = shutil.copytree(llama_dir, tmp_path_factory.mktemp("chat") / "model")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


# --- 1. a prompt longer than the context is refused -------------------------------------------------------------


def test_prompt_longer_than_the_context_is_refused_naming_both_lengths(llama_dir, tokenizer, capsys):
    prompt = "fox " * 300
    n = n_tokens(tokenizer, prompt)
    assert n > CONTEXT
    code, out, err = cli(["generate", "--model", str(llama_dir), "--prompt", prompt, "--max-new-tokens", "1"], capsys)
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert f"the prompt is {n:,} tokens" in line and f"context of {CONTEXT} tokens" in line, line


def test_a_prompt_filling_the_whole_context_is_refused(llama_dir, tokenizer, capsys):
    prompt = prompt_of(tokenizer, CONTEXT)
    code, _, err = cli(["generate", "--model", str(llama_dir), "--prompt", prompt, "--max-new-tokens", "1",
                        "--quiet"], capsys)
    line = one_error_line(err)
    assert code == 2 and f"the prompt is {CONTEXT} tokens, as long as the model's context of {CONTEXT}" in line


def test_the_prompt_length_is_counted_after_the_chat_template(chat_dir, tokenizer, capsys):
    from transformers import AutoTokenizer

    prompt = "fox " * 300
    chat = gen.prompt_ids(AutoTokenizer.from_pretrained(chat_dir), prompt, chat=True).shape[1]
    assert chat > n_tokens(tokenizer, prompt) > CONTEXT
    code, _, err = cli(["generate", "--model", str(chat_dir), "--prompt", prompt, "--chat", "--quiet"], capsys)
    line = one_error_line(err)
    assert code == 2 and f"the prompt is {chat:,} tokens after the chat template" in line, line


def test_a_chat_prompt_that_fits_generates(chat_dir, capsys):
    code, out, err = cli(["generate", "--model", str(chat_dir), "--prompt", "The quick", "--chat",
                          "--max-new-tokens", "3", "--quiet"], capsys)
    assert code == 0, err
    assert out.endswith("\n")


# --- 2. --max-new-tokens beyond what the context leaves is refused ----------------------------------------------


def test_max_new_tokens_beyond_the_context_is_refused_naming_the_numbers(llama_dir, tokenizer, capsys):
    prompt = "The quick brown fox"
    n = n_tokens(tokenizer, prompt)
    code, out, err = cli(["generate", "--model", str(llama_dir), "--prompt", prompt, "--max-new-tokens", "100000",
                          "--quiet"], capsys)
    line = one_error_line(err)
    assert code == 2 and out == ""
    for fragment in ("--max-new-tokens 100,000 does not fit", f"the prompt is {n} tokens",
                     f"the model's context is {CONTEXT}", f"at most {CONTEXT - n} new tokens fit"):
        assert fragment in line, line


def test_max_new_tokens_up_to_the_context_is_accepted_and_one_more_is_not(llama_dir, tokenizer, capsys):
    prompt = prompt_of(tokenizer, CONTEXT - 4)
    argv = ["generate", "--model", str(llama_dir), "--prompt", prompt, "--quiet", "--max-new-tokens"]
    code, _, err = cli([*argv, "4"], capsys)
    assert code == 0, err
    code, _, err = cli([*argv, "5"], capsys)
    assert code == 2 and "at most 4 new tokens fit" in one_error_line(err)


def test_check_fits():
    gen.check_fits(10, 246, 256)
    gen.check_fits(10_000, 10**6, None)  # no context in the config: nothing to check against
    with pytest.raises(gen.UsageError, match="at most 246 new tokens fit"):
        gen.check_fits(10, 247, 256)
    with pytest.raises(gen.UsageError, match=r"12,001 tokens, longer than the model's context of 8,192"):
        gen.check_fits(12_001, 1, 8192)
    with pytest.raises(gen.UsageError, match="max_new_tokens must be at least 1"):
        gen.run_generate(None, "The quick", 0)  # GenerateSettings' check, before any model loads


# --- 3. tokens stream to stdout unless --quiet; the streamed text is the final text ----------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_streamed_text_equals_the_quiet_text(model_dir_factory, family, capsys):
    argv = ["generate", "--model", str(model_dir_factory(family)), "--prompt", "The quick brown",
            "--max-new-tokens", "40", "--kernels", "off"]
    code, quiet, err = cli([*argv, "--quiet"], capsys)
    assert code == 0, err
    code, streamed, err = cli(argv, capsys)
    assert code == 0, err
    assert quiet.strip()
    assert streamed == "The quick brown" + quiet


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


@pytest.mark.parametrize("prompt", ["The quick brown", "Pruning removes", "A journey of"])
def test_tokens_are_written_as_they_are_produced(llama_dir, prompt):
    out = Recorder()
    result = gen.run_generate(str(llama_dir), prompt, 30, kernels="off", stream=out)
    assert result.streamed == result.text
    assert out.getvalue() == prompt + result.text + "\n"
    assert len([w for w in out.writes if w]) > 2  # the prompt, then the text in several pieces, not at once
    assert result.prompt_tokens == len(gen.prompt_ids(gen.load_model(str(llama_dir)).tokenizer, prompt)[0])
    assert result.context == CONTEXT and 1 <= result.new_tokens <= 30


def test_quiet_streams_nothing(llama_dir, capsys):
    result = gen.run_generate(str(llama_dir), "The quick", 5, kernels="off", stream=None)
    assert result.streamed is None and capsys.readouterr().out == ""


# --- 4. half precision without native CPU support: a measured notice, not a refusal -----------------------------

NO_HALF = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"})


def test_native_support_from_flags():
    assert gen.native_support(torch.bfloat16, NO_HALF | {"avx512_bf16"})
    assert gen.native_support(torch.bfloat16, NO_HALF | {"amx_bf16"})
    assert gen.native_support(torch.float16, NO_HALF | {"avx512_fp16"})
    assert gen.native_support(torch.float16, NO_HALF | {"amx_fp16"})
    assert gen.native_support(torch.bfloat16, NO_HALF) is False
    assert gen.native_support(torch.float16, NO_HALF | {"avx512_bf16"}) is False
    assert gen.native_support(torch.float32, NO_HALF)
    assert gen.native_support(torch.bfloat16, None) is None


def test_notice_appears_when_unsupported():
    notice = gen.half_precision_notice(torch.bfloat16, NO_HALF, 4.83)
    assert notice == ("bfloat16 has no native support on this CPU (no avx512_bf16/amx_bf16): a matmul measured "
                      "4.8x slower than float32 here; consider --dtype float32")
    fp16 = gen.half_precision_notice(torch.float16, NO_HALF | {"avx512_bf16"}, 30.0)
    assert "float16 has no native support" in fp16 and "avx512_fp16/amx_fp16" in fp16 and "30.0x slower" in fp16
    # measured no slower: still named, without claiming a slowdown
    even = gen.half_precision_notice(torch.bfloat16, NO_HALF, 0.9)
    assert "no native support" in even and "slower" not in even and "0.90x" in even
    for text in (notice, fp16, even):
        assert "\n" not in text


def test_no_notice_when_supported():
    assert gen.half_precision_notice(torch.bfloat16, NO_HALF | {"avx512_bf16"}, 4.8) is None
    assert gen.half_precision_notice(torch.float16, NO_HALF | {"amx_fp16"}, 4.8) is None
    assert gen.half_precision_notice(torch.float32, NO_HALF, 1.0) is None


def test_unreadable_flags_notice_only_a_clear_measured_slowdown():
    assert gen.half_precision_notice(torch.bfloat16, None, 1.2) is None
    assert "3.0x slower" in gen.half_precision_notice(torch.bfloat16, None, 3.0)


def test_dtype_notice_measures_only_where_the_flags_lack_support(monkeypatch):
    calls = []

    def slowdown(dtype):
        calls.append(dtype)
        return 5.0

    monkeypatch.setattr(gen, "matmul_slowdown", slowdown)
    monkeypatch.setattr(gen, "cpu_flags", lambda: NO_HALF | {"avx512_bf16"})
    assert gen.dtype_notice("bfloat16") is None and calls == []
    assert "5.0x slower" in gen.dtype_notice("float16") and calls == [torch.float16]
    assert gen.dtype_notice("float32") is None and gen.dtype_notice("fp16", device="cuda") is None
    assert calls == [torch.float16]


def test_cpu_flags_parses_proc_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512_bf16\n")
    assert cpu_flags(x86) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    (tmp_path / "none").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "none") is None
    assert cpu_flags(tmp_path / "missing") is None


def test_cli_prints_the_measured_notice_and_still_generates(llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(gen, "cpu_flags", lambda: NO_HALF)  # the figure itself is measured here
    code, out, err = cli(["generate", "--model", str(llama_dir), "--prompt", "The quick", "--max-new-tokens", "3",
                          "--dtype", "bfloat16", "--quiet"], capsys)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bfloat16 has no native support on this CPU"), err
    assert "x " in lines[0] and out.strip()


def test_cli_prints_no_notice_where_supported(llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(gen, "cpu_flags", lambda: NO_HALF | {"avx512_bf16", "amx_bf16"})
    code, out, err = cli(["generate", "--model", str(llama_dir), "--prompt", "The quick", "--max-new-tokens", "3",
                          "--dtype", "bfloat16", "--quiet"], capsys)
    assert code == 0 and err == "" and out.strip()


def test_a_refusal_is_one_line_even_with_an_unsupported_dtype(llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(gen, "cpu_flags", lambda: NO_HALF)
    code, _, err = cli(["generate", "--model", str(llama_dir), "--prompt", "The quick", "--max-new-tokens", "5000",
                        "--dtype", "bfloat16"], capsys)
    assert code == 2 and "does not fit" in one_error_line(err)
