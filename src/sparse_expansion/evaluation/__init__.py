"""Evaluation: perplexity by the SparseGPT/Wanda protocol; zero-shot tasks through lm-eval (optional extra)."""

from .perplexity import PerplexityResult, perplexity
from .zero_shot import run_lm_eval

__all__ = ["PerplexityResult", "perplexity", "run_lm_eval"]
