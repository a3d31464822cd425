"""Text corpora (embedded, local files, online wikitext2/c4) and token windows cut from them."""

from .corpus import Corpus, load_corpus
from .windows import BOS_MODES, calibration_windows, evaluation_windows, resolve_bos, tokenize

__all__ = ["BOS_MODES", "Corpus", "calibration_windows", "evaluation_windows", "load_corpus", "resolve_bos",
           "tokenize"]
