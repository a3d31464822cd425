"""What a command writes about itself: the manifest of a model directory, the compare table and report."""

from __future__ import annotations

import datetime as _dt
import platform

import torch

from ..runtime import __version__
from .session import Session


def manifest(session: Session, command: str, report=None, options=None, extra: dict | None = None) -> dict:
    """The job's record for manifest.json: tool, settings, data, and what the report describes."""
    data = {
        "tool": "sparse-expansion",
        "version": __version__,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_source": session.loaded.source,
        "architecture": type(session.model).__name__,
        "blocks_path": session.layout.blocks_path,
        "settings": session.settings.describe(),
        "data": session.data_summary(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if report is not None:
        data.update(report.describe(options))
        data["calib_tokens"] = int(session.calib.numel()) if session.calib is not None else 0
    if extra:
        data.update(extra)
    return data


def format_table(rows: list[dict]) -> str:
    header = ["method", "sparsity", "experts", "ppl", "FFN MFLOP/token", "eval_tokens", "calib_tokens", "build s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        sparsity = r["nm"] or f"{r['sparsity']:.2f}"
        if r.get("bits"):
            sparsity += f" + {r['bits']}-bit"
        lines.append(f"| {r['method']} | {sparsity} | {r.get('experts') or '-'} | {r['ppl']:.3f} | "
                     f"{r['ffn_flops_per_token'] / 1e6:.1f} | {r['eval_tokens']} | {r['calib_tokens']} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def markdown_report(session: Session, rows: list[dict], command_line: str) -> str:
    s = session.settings
    corpus = session.data_summary() or {}
    first = rows[0] if rows else {}
    return "\n".join([
        "# sparse-expansion compare",
        "",
        f"- command: `{command_line}`",
        f"- model: {session.loaded.source} ({type(session.model).__name__})",
        f"- data: {corpus.get('description', '')}",
        f"- scope: {s.scope}; seqlen {s.seqlen}; calibration windows {s.calib_samples}; seed {s.seed}; "
        f"device {s.device}; dtype {s.dtype}",
        f"- windows: BOS {s.bos} (token id {corpus.get('bos_token_id')}); evaluated {first.get('eval_windows')} "
        f"windows = {first.get('eval_tokens')} tokens ({first.get('text_tokens')} text tokens, "
        f"{first.get('predicted_tokens')} predicted); calibration {corpus.get('calib_tokens', 0)} tokens",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}",
        "",
        format_table(rows),
        "",
    ])
