"""Tiny random models of several families, built from configs, and a tiny tokenizer: fast and offline."""

from __future__ import annotations

import os

import pytest
import torch

# The hub is unreachable from the test machines: fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 320
TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Pruning removes weights from a neural network while keeping its accuracy. Language models predict the "
    "next token from the previous ones. Sparse experts route each token to one cluster of similar inputs. "
)


def small_args(calib_samples: int = 4, seqlen: int = 32, eval_samples: int | None = 2,
               batch_size: int | None = None) -> list[str]:
    """Command-line sizes for the tiny model and corpus: calibration and evaluation windows of `seqlen` tokens;
    None leaves an option at the command's default."""
    args = ["--calib-samples", str(calib_samples), "--seqlen", str(seqlen)]
    if eval_samples is not None:
        args += ["--eval-samples", str(eval_samples)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    return [*args, "--quiet"]


# The sizes most command-line tests run at: 4 calibration and 2 evaluation windows of 32 tokens.
SMALL = small_args()


def random_windows(n: int = 6, length: int = 24, seed: int = 0, high: int = 300) -> torch.Tensor:
    """`n` windows of `length` random token ids below `high`, the same for the same seed."""
    return torch.randint(0, high, (n, length), generator=torch.Generator().manual_seed(seed))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the command line in this process: (exit code, stdout, stderr), without what fixtures printed before."""
    from sparse_expansion.cli import main

    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, **common)
    if family == "gemma":
        return tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, **common)
    if family in ("gemma2", "gemma3"):
        # Both layer types, and a sliding window shorter than the test sequences: their masks and (Gemma-3)
        # rotary tables differ per layer.
        cls = tf.Gemma2Config if family == "gemma2" else tf.Gemma3TextConfig
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=16, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"], **common)
    if family == "phi":
        return tf.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(family)


# family -> (FFN inputs, FFN outputs) as discovery must name them
FAMILIES = {
    "llama": (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]),
    "qwen2": (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]),
    "mistral": (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]),
    "gemma": (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]),
    "gemma2": (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]),
    "gemma3": (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]),
    "phi": (["mlp.fc1"], ["mlp.fc2"]),
    "gpt_neox": (["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]),
    "opt": (["fc1"], ["fc2"]),
    "gpt2": (["mlp.c_fc"], ["mlp.c_proj"]),
}


def make_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    config = _config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small local corpus: train.txt and test.txt."""
    path = tmp_path_factory.mktemp("corpus")
    (path / "train.txt").write_text(TEXT * 40)
    (path / "test.txt").write_text(TEXT[::-1].swapcase() * 4 + TEXT * 12)
    return path


@pytest.fixture(scope="session")
def model_dir_factory(tmp_path_factory, tokenizer):
    cache = {}

    def build(family: str = "llama", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"model-{family}")
            make_model(family, **overrides).save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return build


@pytest.fixture(scope="session")
def llama_dir(model_dir_factory):
    return model_dir_factory("llama")


def generate_from_both_formats(tmp_path, capsys, prune_args, prompt, new_tokens, kernels):
    """Prune into a compressed directory and write the same weights as a plain dense checkpoint (test_cli checks
    that `prune --format dense` writes these very weights), then generate greedily from each: the compressed
    one with `kernels`, the dense checkpoint without. Returns {format: text}."""
    import sparse_expansion
    from sparse_expansion.cli import main

    assert main(["prune", *prune_args, "--format", "compressed", "--out", str(tmp_path / "compressed")]) == 0
    pruned = sparse_expansion.load(str(tmp_path / "compressed"))
    sparse_expansion.save(pruned.model, pruned.tokenizer, tmp_path / "dense", format="dense")
    del pruned
    capsys.readouterr()
    texts = {}
    for fmt, mode in (("compressed", kernels), ("dense", "off")):
        assert main(["generate", "--model", str(tmp_path / fmt), "--prompt", prompt,
                     "--max-new-tokens", str(new_tokens), "--kernels", mode, "--quiet"]) == 0
        texts[fmt] = capsys.readouterr().out
    return texts


# The longest test files first, so that the two test workers (pytest-xdist, one file per worker at a time) finish
# together instead of one starting the embedded model's minutes last (seconds measured with --durations).
LONGEST_FIRST = ("test_embedded_model.py", "test_embedded_generate.py", "test_distributed.py", "test_bad_input.py",
                 "test_embedded_streamed.py", "test_resume.py", "test_packaging.py", "test_cli.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
