"""Zero-shot tasks through EleutherAI's lm-evaluation-harness, on a model already loaded in memory.

The model (dense, pruned or expanded: expanded models hold `ExpertLinear` modules that only this package
can build) is wrapped as it is with lm-eval's `HFLM(pretrained=<model>, tokenizer=<tokenizer>)`, so
lm-eval never loads anything from disk itself. Tasks come from lm-eval's registry, from the tasks
shipped in this package (`sparse_expansion_local_mc`, offline) and from `include_path` directories of
user task YAML files.

lm-eval is an optional dependency (`pip install 'sparse-expansion[lm-eval]'`), imported lazily.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import UsageError, literal
from ..settings import AtLeast, SettingError

#: The zero-shot suite that SparseGPT and Wanda report (datasets come from the Hugging Face hub).
DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: Task directories shipped in this package; always on the include path.
PACKAGED_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
#: A small multiple-choice task read from files shipped in this package: works offline.
LOCAL_TASK = "sparse_expansion_local_mc"
INSTALL_HINT = "pip install 'sparse-expansion[lm-eval]'"
# The checks of the run options (LmEvalSettings states them with these, so each is written once).
LIMIT = AtLeast(1)  # examples per task
BATCH_SIZE = AtLeast(1)  # requests per forward pass
NUM_FEWSHOT = AtLeast(0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError(f"zero-shot tasks need lm-evaluation-harness, which could not be imported "
                         f"({_first_line(exc)}): {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


class _DropExpectedWarnings(logging.Filter):
    """lm-eval warns about what this module does on purpose (an in-memory model, a Python dataset loader)."""

    EXPECTED = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model",
                f"{LOCAL_TASK}: Custom kwargs can be passed")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


_FILTERED_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task")


def parse_tasks(text: str | Iterable[str]) -> list[str]:
    """`"boolq, rte,boolq"` -> `["boolq", "rte"]` (order kept, duplicates dropped)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(item.strip() for item in items if item and item.strip()))
    if not names:
        raise SettingError("tasks", "{tasks} is empty; name some lm-eval tasks, e.g. " + ",".join(DEFAULT_TASKS))
    return names


def _paths(include_path) -> list[str] | None:
    if include_path is None:
        return None
    if isinstance(include_path, (str, os.PathLike)):
        return [str(include_path)]
    return [str(item) for item in include_path]


def task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None):
    """lm-eval's task registry with this package's tasks and the user's task directories added.

    Scanning lm-eval's thousands of task files takes seconds, so registries are kept for the process,
    one per set of include paths (`task_manager.cache_clear()` rescans after task files were added).
    """
    _import_lm_eval()
    paths = [str(PACKAGED_TASKS_DIR)]
    for item in _paths(include_path) or []:
        path = Path(item).expanduser()
        if not path.is_dir():
            raise SettingError("include_path", f"{{include_path}} {literal(item)}: not a directory of lm-eval task "
                                               "YAML files")
        paths.append(str(path.resolve()))
    return _cached_manager(tuple(paths))


@functools.lru_cache(maxsize=4)
def _cached_manager(paths: tuple[str, ...]):
    _, _, TaskManager = _import_lm_eval()
    return TaskManager(include_path=list(paths))


task_manager.cache_clear = _cached_manager.cache_clear


def check_tasks(manager, tasks: Iterable[str]) -> list[str]:
    """The task names, or a one-line UsageError naming the unknown ones (with close matches)."""
    names = parse_tasks(tasks)
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3)
            hints.append(literal(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")))
        raise SettingError("tasks", f"unknown lm-eval task {'; '.join(hints)}; tasks in your own YAML files need "
                                    f"{{include_path}} DIR, and {LOCAL_TASK} is the offline task shipped with this "
                                    "package")
    return names


def check_options(limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = 0) -> None:
    """`run_lm_eval`'s options, by the checks LmEvalSettings states (None: off)."""
    for name, value, check in (("limit", limit, LIMIT), ("batch_size", batch_size, BATCH_SIZE),
                               ("num_fewshot", num_fewshot, NUM_FEWSHOT)):
        if value is not None:
            check(name, value)


def _is_download_error(exc: BaseException) -> bool:
    """True when `exc` (or an exception it chains) says a dataset could not be fetched from the hub."""
    download_types: list[type] = [ConnectionError, TimeoutError]
    for module, name in (("huggingface_hub.errors", "OfflineModeIsEnabled"),
                         ("huggingface_hub.errors", "LocalEntryNotFoundError"),
                         ("datasets.exceptions", "DatasetNotFoundError"),
                         ("requests.exceptions", "ConnectionError"),
                         ("httpx", "TransportError")):
        try:
            download_types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, tuple(download_types)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _number(value):
    if isinstance(value, bool) or value is None:
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where it computed no standard error
    return None if math.isnan(value) else value


def _compact_metrics(raw: dict) -> dict:
    """`{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}` -> `{"acc": 0.5, "acc_stderr": 0.1}`."""
    metrics = {}
    for key, value in raw.items():
        if "," not in key:
            continue  # alias, name, sample_len, ...
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else key] = _number(value)
    return metrics


def _compact_samples(records: list[dict]) -> list[dict]:
    """Per-document log-likelihoods of each choice (multiple-choice tasks), as lm-eval scored them."""
    out = []
    for record in sorted(records, key=lambda r: r["doc_id"]):
        row = {"doc_id": record["doc_id"], "target": record.get("target")}
        responses = record.get("filtered_resps") or []
        if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
            row["loglikelihoods"] = [float(r[0]) for r in responses]
        for metric in ("acc", "acc_norm"):
            if metric in record:
                row[metric] = _number(record[metric])
        out.append(row)
    return out


def run_lm_eval(loaded, tasks: str | Iterable[str], include_path=None, limit: int | None = None,
                batch_size: int = 8, num_fewshot: int | None = 0, device: str = "cpu", manager=None,
                log_samples: bool = False, quiet: bool = False) -> dict:
    """Evaluate an in-memory model on lm-eval tasks; returns a compact, JSON-ready summary.

    `loaded` is a `LoadedModel` (from `sparse_expansion.load`) or anything with `.model` and `.tokenizer`.
    `tasks` are lm-eval task (or group) names, as a list or a comma-separated string. `manager` is a
    prebuilt `task_manager(include_path)` (building one scans lm-eval's registry, a few seconds).
    `num_fewshot=None` keeps each task's own default; a task whose YAML fixes `num_fewshot: 0` stays
    zero-shot. `limit` caps the examples per task (quick checks; not comparable with published numbers).

    The result: `{"results": {task: {metric: value, metric_stderr: value, "samples": n,
    "num_fewshot": k, ...}}, "config": {...}}`, plus `"samples"` (per-document log-likelihoods) when
    `log_samples` is true.
    """
    from ..models.loading import resolve_device

    lm_eval, HFLM, _ = _import_lm_eval()
    check_options(limit, batch_size, num_fewshot)
    torch_device = resolve_device(device)
    if manager is None:
        manager = task_manager(include_path)
    names = check_tasks(manager, tasks)

    model = loaded.model
    model.eval()
    model.to(torch_device)
    lm_logger = logging.getLogger("lm_eval")
    previous_level = lm_logger.level
    if quiet:
        lm_logger.setLevel(logging.ERROR)
    drop = _DropExpectedWarnings()
    for name in _FILTERED_LOGGERS:
        logging.getLogger(name).addFilter(drop)
    try:
        lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, backend="causal", batch_size=batch_size)
        raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      batch_size=batch_size, device=str(torch_device), task_manager=manager,
                                      log_samples=log_samples)
    except UsageError:
        raise
    except Exception as exc:
        if _is_download_error(exc):
            raise UsageError(f"could not download a task's dataset from the Hugging Face hub (offline?): "
                             f"{_first_line(exc)}; the standard tasks need the internet, {LOCAL_TASK} "
                             f"works offline") from None
        raise
    finally:
        lm_logger.setLevel(previous_level)
        for name in _FILTERED_LOGGERS:
            logging.getLogger(name).removeFilter(drop)
    if raw is None:  # only non-zero ranks of a distributed run get None
        raise UsageError("lm-eval returned no results (distributed launch?)")

    n_samples = raw.get("n-samples", {})
    n_shot = raw.get("n-shot", {})
    versions = raw.get("versions", {})
    results = {}
    for name, metrics in raw["results"].items():
        entry = _compact_metrics(metrics)
        counts = n_samples.get(name)
        if counts:
            entry["samples"] = counts.get("effective")
            entry["samples_total"] = counts.get("original")
        if name in n_shot:
            entry["num_fewshot"] = n_shot[name]
        if name in versions:
            entry["version"] = versions[name]
        results[name] = entry
    config = raw.get("config", {})
    summary = {
        "results": results,
        "config": {
            "tasks": names,
            "include_path": _paths(include_path),
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "device": str(torch_device),
            "model_dtype": str(config.get("model_dtype", "")) or None,
            "model_num_parameters": config.get("model_num_parameters"),
            "random_seed": config.get("random_seed"),
            "numpy_seed": config.get("numpy_seed"),
            "torch_seed": config.get("torch_seed"),
            "fewshot_seed": config.get("fewshot_seed"),
            "lm_eval_version": getattr(lm_eval, "__version__", None),
        },
    }
    if log_samples:
        summary["samples"] = {name: _compact_samples(records) for name, records in raw.get("samples", {}).items()}
    return summary


def format_results(summary: dict) -> str:
    """A plain table: task, metric, value, stderr."""
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, metrics in summary["results"].items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr," in metric or metric in (
                    "samples", "samples_total", "num_fewshot", "version") or not isinstance(value, float):
                continue
            stderr = metrics.get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
            rows.append((task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}",
                         str(metrics.get("samples", ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
