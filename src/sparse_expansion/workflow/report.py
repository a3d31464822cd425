"""What a command writes about itself: the manifest of a model directory, the compare table and report."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform

import torch

from ..evaluation import spread
from ..runtime import __version__, cpu_flags, cpu_model
from .jobs import calibration_warning
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
        "environment": environment(session),
    }
    if report is not None:
        data.update(report.describe(options))
        data["calib_tokens"] = int(session.calib.numel()) if session.calib is not None else 0
        if session.calib is not None:
            data["calibration_warning"] = calibration_warning(session, data.get("scope") or "ffn")
    if extra:
        data.update(extra)
    return data


def format_table(rows: list[dict]) -> str:
    header = ["method", "sparsity", "experts", "seed", "ppl", "FFN MFLOP/token", "eval_tokens", "calib_tokens",
              "build s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.get("repeated"):
            continue  # a data-free method's one run, repeated at each seed for the pairing: shown once
        sparsity = r["nm"] or f"{r['sparsity']:.2f}"
        if r.get("bits"):
            sparsity += f" + {r['bits']}-bit"
        seed = "-" if not r["calib_tokens"] else r["seed"]
        lines.append(f"| {r['method']} | {sparsity} | {r.get('experts') or '-'} | {seed} | {r['ppl']:.3f} | "
                     f"{r['ffn_flops_per_token'] / 1e6:.1f} | {r['eval_tokens']} | {r['calib_tokens']} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


# CPU features that decide which kernels (and so which rounding) a run gets.
ROUNDING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile",
                  "asimd", "sve")


def machine_environment() -> dict:
    """What of this process changes rounding (and speed) between runs: versions, threads, CPU and its flags, ATen's
    kernels, and the OpenMP wait policy where one is set (PASSIVE made a 2-thread build ~20% slower; absent when
    unset, so that runs at the default compare equal to those recorded before it was kept)."""
    flags = cpu_flags()
    policy = os.environ.get("OMP_WAIT_POLICY")
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cpu_flags": None if flags is None else sorted(f for f in ROUNDING_FLAGS if f in flags),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **({"omp_wait_policy": policy} if policy else {})}


def environment(session: Session) -> dict:
    """What changes rounding between runs of the same command: the machine's environment, device, dtype, batches."""
    s = session.settings
    return {**machine_environment(), "device": s.device, "dtype": s.dtype, "batch_size": s.batch_size}


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of a window tensor's token ids (int64, row-major): equal digests, equal windows."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _ratio_text(entry: dict) -> tuple[str, str]:
    vs = entry.get("vs_reference")
    if vs is None:
        return "-", "reference" if entry.get("is_reference") else "-"
    ci = "" if vs["ci_low"] is None else f" [{vs['ci_low']:.3f}, {vs['ci_high']:.3f}]"
    return f"{vs['mean']:.3f}{ci}", vs["verdict"]


def format_summary(summary: dict) -> str:
    """The spread table: mean ± 95% half-width over the seeds, the paired ratio to the reference and its verdict."""
    reference = summary["reference"] or "-"
    header = ["method", "sparsity", "experts", "seeds", "ppl (mean ± 95% CI)", f"/ {reference} [95% CI]", "verdict",
              "FFN MFLOP/token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in summary["groups"]:
        sparsity = g["nm"] or f"{g['sparsity']:.2f}"
        if g.get("bits"):
            sparsity += f" + {g['bits']}-bit"
        ratio, words = _ratio_text({**g, "is_reference": g["method"] == summary["reference"]})
        lines.append(f"| {g['method']} | {sparsity} | {g.get('experts') or '-'} | {g['ppl']['n']} | "
                     f"{spread.describe(g['ppl'])} | {ratio} | {words} | {g['ffn_flops_per_token'] / 1e6:.1f} |")
    return "\n".join(lines)


def markdown_report(session: Session, summary: dict, rows: list[dict], command_line: str) -> str:
    s = session.settings
    corpus = session.data_summary() or {}
    first = rows[0] if rows else {}
    env = environment(session)
    warnings = {json.dumps(r["calibration_warning"], sort_keys=True) for r in rows if r.get("calibration_warning")}
    lines = [
        "# sparse-expansion compare",
        "",
        f"- command: `{command_line}`",
        f"- model: {session.loaded.source} ({type(session.model).__name__})",
        f"- data: {corpus.get('description', '')}",
        f"- scope: {s.scope}; seqlen {s.seqlen}; calibration windows {s.calib_samples}; seeds "
        f"{', '.join(str(seed) for seed in sorted({r['seed'] for r in rows}))}",
        f"- windows: BOS {s.bos} (token id {corpus.get('bos_token_id')}); evaluated {first.get('eval_windows')} "
        f"windows = {first.get('eval_tokens')} tokens ({first.get('text_tokens')} text tokens, "
        f"{first.get('predicted_tokens')} predicted), the same for every run",
        f"- environment: torch {env['torch']}, {env['threads']} threads, {env['cpu']} "
        f"({', '.join(env['cpu_flags'] or [])}; ATen {env['aten_cpu_capability']}), device {env['device']}, dtype "
        f"{env['dtype']}, batch size {env['batch_size']}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; machine: {platform.machine()}",
        *[f"- calibration warning: {w['calib_tokens']:,} tokens are fewer than the {w['inputs']:,} inputs of "
          f"{w['layer']} (rank-deficient Hessian)" for w in map(json.loads, sorted(warnings))],
        "",
        f"Over the calibration seeds (95% intervals, Student t; ratios paired by seed against {summary['reference']}):",
        "",
        format_summary(summary),
        "",
        "Every run:",
        "",
        format_table(rows),
        "",
    ]
    return "\n".join(lines)


def compare_figure(summary: dict, path: str, title: str) -> None:
    """Perplexity against sparsity and against FFN FLOPs per token, one line per method (and expert count), with
    95% error bars over the seeds; written through a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[str, list[dict]] = {}
    for g in summary["groups"]:
        label = g["method"] + (f" x{g['experts']}" if g.get("experts") else "")
        lines.setdefault(label, []).append(g)
    for label, groups in lines.items():
        groups = sorted(groups, key=lambda g: (g["sparsity"], g["ffn_flops_per_token"]))
        means = [g["ppl"]["mean"] for g in groups]
        errors = [g["ppl"]["half_width"] or 0.0 for g in groups]
        for ax, xs in ((axes[0], [g["sparsity"] for g in groups]),
                       (axes[1], [g["ffn_flops_per_token"] / 1e6 for g in groups])):
            ax.errorbar(xs, means, yerr=errors, marker="o", ms=4, capsize=3, label=label)
    axes[0].set(xlabel="FFN sparsity", ylabel="perplexity (mean, 95% CI)", yscale="log", title=title)
    axes[1].set(xlabel="FFN MFLOP per token (routers counted)", yscale="log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
