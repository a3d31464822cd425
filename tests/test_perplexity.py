"""Perplexity protocol, checked against a hand computation on a toy bigram model."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_model
from sparse_expansion.data import Corpus, evaluation_windows, load_corpus, resolve_bos
from sparse_expansion.evaluation import perplexity
from test_data import make_bos_tokenizer


class Bigram(nn.Module):
    """logits[t] = table[token_t]: the next-token distribution depends on the current token only."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_matches_a_hand_computation():
    table = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 1.0, 3.0]])
    windows = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]])
    # Hand computation: mean over the 3 predicted tokens of each window, mean over windows, exp.
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in table.tolist()]
    window_losses = []
    for window in windows.tolist():
        nll = [-math.log(probs[a][b]) for a, b in zip(window[:-1], window[1:])]
        window_losses.append(sum(nll) / len(nll))
    expected = math.exp(sum(window_losses) / len(window_losses))
    for batch_size in (1, 2):
        result = perplexity(Bigram(table), windows, batch_size=batch_size, progress=False)
        assert result.ppl == pytest.approx(expected, rel=1e-6)
    assert result.eval_tokens == 8
    assert result.text_tokens == 8
    assert result.predicted_tokens == 6


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    result = perplexity(Bigram(torch.zeros(7, 7)), torch.randint(0, 7, (3, 10)), progress=False)
    assert result.ppl == pytest.approx(7.0, rel=1e-6)


class CharTokenizer:
    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 50 for c in text]]))


def test_evaluation_windows_are_non_overlapping_and_drop_the_tail():
    corpus = Corpus(name="toy", train_text="", test_text="abcdefghij" * 2 + "xyz")  # 23 tokens
    windows = evaluation_windows(corpus, CharTokenizer(), seqlen=5)
    assert windows.shape == (4, 5)
    flat = CharTokenizer()("abcdefghij" * 2 + "xyz").input_ids[0][:20]
    assert torch.equal(windows.flatten(), flat)
    assert evaluation_windows(corpus, CharTokenizer(), seqlen=5, limit=2).shape == (2, 5)


def test_perplexity_on_bos_windows_scores_every_text_token_and_never_the_bos(corpus_dir):
    tokenizer = make_bos_tokenizer()
    bos, seqlen = resolve_bos(tokenizer, "auto"), 16
    windows = evaluation_windows(load_corpus(str(corpus_dir)), tokenizer, seqlen, limit=5, bos=bos)
    model = make_model("llama")
    result = perplexity(model, windows, batch_size=2, progress=False, bos=bos)
    # Hand computation: targets are positions 1..L-1 (all text, never the BOS), mean per window, mean of windows.
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = windows[:, 1:]
    assert not bool((targets == bos).any())
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    expected = nll.double().mean(dim=1).mean().item()
    assert result.mean_nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.windows == 5
    assert result.predicted_tokens == 5 * (seqlen - 1)
    assert result.text_tokens == 5 * (seqlen - 1)
    assert result.eval_tokens == 5 * seqlen
    with pytest.raises(ValueError, match="start with BOS"):
        perplexity(model, windows[:, 1:], progress=False, bos=bos)
