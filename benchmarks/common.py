"""What every benchmark writes besides its rows: the command, the date and the machine."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys

import torch


def write_results(path: str, rows: list[dict], **extra) -> None:
    """Write {"command", "date", "machine", **extra, "results": rows} to `path` atomically."""
    payload = {
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        **extra,
        "results": rows,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)
