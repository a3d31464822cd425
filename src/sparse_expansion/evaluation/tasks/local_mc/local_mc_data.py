"""Rows of the packaged `sparse_expansion_local_mc` task, read from the JSON-lines file next to this module.

lm-evaluation-harness imports this file by path (`custom_dataset: !function local_mc_data.load_local_mc`)
and calls the function with the task's metadata as keyword arguments, which are not needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "local_mc.jsonl"


def read_rows(path: Path = DATA_FILE) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_local_mc(**_metadata):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_rows())})
