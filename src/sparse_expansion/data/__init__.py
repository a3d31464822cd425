"""Text corpora (embedded, local files, online wikitext2/c4) and token windows cut from them."""

from .corpus import Corpus, load_corpus
from .windows import calibration_windows, evaluation_windows, tokenize

__all__ = ["Corpus", "calibration_windows", "evaluation_windows", "load_corpus", "tokenize"]
