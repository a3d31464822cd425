"""Small shared facts of the running process: version, cache directory, dtype and device parsing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import literal
from .settings import SettingError

__version__ = "0.1.0"
CACHE_ENV = "SPARSE_EXPANSION_CACHE"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    """User cache directory; `$SPARSE_EXPANSION_CACHE` overrides it."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse-expansion"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise SettingError("dtype", f"unknown {{dtype}} {literal(repr(name))}; choose one of float32, float16, "
                                    "bfloat16") from None


def resolve_device(name: str | torch.device) -> torch.device:
    name = str(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", f"{{device}} {literal(name)} requested but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SettingError("device", f"unknown {{device}} {literal(repr(name))}; use cpu or cuda") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name as Linux lists it (else what the platform says)."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them ("flags" on x86, "Features" on Arm); None where unreadable."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None



@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def free_bytes(device: torch.device | str) -> int:
    """Free memory of `device`: the GPU's (torch.cuda.mem_get_info) or the host's available memory (psutil)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere).

    Loops that allocate and free many multi-MB tensors between small Python objects leave glibc's heap
    holding freed memory. Measured: converting the experts of a 16-expert SmolLM2 model left 3 to 6 GB
    there; the neuron analysis of the embedded model grew by about 70 MB per block without a trim per
    layer and stayed flat with it (docs/BENCHMARKS.md, issue 9).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


def blas_threads(count: int):
    """A context that holds the BLAS libraries loaded beside torch (scipy's and numpy's OpenBLAS) to `count`
    threads: their own pools would otherwise start one thread per core beside torch's."""
    return _blas_controller().limit(limits=count, user_api="blas")


def one_thread_each(function: Callable, items: Iterable, workers: int | None = None) -> list:
    """`function(item)` for every item, in order, on as many Python threads as torch has intra-op threads, each
    running torch's and the BLAS libraries' kernels on one thread.

    For many independent small LAPACK and column-loop calls (one Hessian, a few experts): there one thread per
    call wastes less than two threads sharing every call (a layer's 16 factorizations: 6.3x faster at 576 x 576
    and 2.1x at 1,536 x 1,536 on two cores, docs/BENCHMARKS.md, issue 18). Each call's arithmetic is then that of
    one thread, whatever the thread count: the same numbers on 1, 2 or 16 threads. CPU work only; torch's thread
    count is restored afterwards (the workers are new threads, which take torch's count, one, at their first
    parallel kernel).
    `workers`: at most this many at once (e.g. what memory allows).
    """
    items = list(items)
    threads = torch.get_num_threads()
    workers = min(threads, len(items), workers or threads)
    with blas_threads(1):
        torch.set_num_threads(1)
        try:
            if workers <= 1:
                return [function(item) for item in items]
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(function, items))
        finally:
            torch.set_num_threads(threads)
