"""Build, cache and call the CPU sparse kernels: `csr_kernels.c` (fp32 CSR products and the activation-sparse
product of a thresholded down projection) and `bitmask_kernels.c` (bitmask + values products in fp32, bf16, fp16
and on a 4- or 8-bit grid).

The C files are compiled at first use with the system C compiler (`$CC`, else Python's own, else `cc`)
into the user cache (`~/.cache/sparse-expansion/kernels`, or `$SPARSE_EXPANSION_CACHE/kernels`), keyed
by a hash of the source, the compiler, the flags and the processor, then loaded with ctypes. Without a
compiler the kernels are unavailable and every layer stays dense (one warning says why).
`SPARSE_EXPANSION_KERNELS=off` turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch  # loaded first: the kernels' OpenMP calls then bind to the libgomp that torch ships

from ..runtime import cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("csr_kernels.c", "bitmask_kernels.c"))
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
NATIVE_FLAGS = ("-march=native",)
DISABLE_ENV = "SPARSE_EXPANSION_KERNELS"
UINT16_COLUMNS = 1 << 16  # column indices fit in uint16 up to this many columns


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            executable = shlex.split(candidate)[0]
            if shutil.which(executable):
                return executable
    return None


def _cpu_model() -> str:
    """Model name and instruction-set flags: a -march=native build must never run on another ISA."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part")))


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = [source.read_text() for source in SOURCES]
    digest = hashlib.sha256("\0".join([*sources, compiler, version, " ".join(FLAGS + NATIVE_FLAGS),
                                       platform.machine(), _cpu_model()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"csr_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in (FLAGS + NATIVE_FLAGS, FLAGS):  # some compilers lack -march=native
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, target)  # atomic: a concurrent build never sees a half-written library
            return target
        os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    raise OSError(f"{compiler} failed: {errors[-1]}")


class _Library:
    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self.matvec, self.matmul = {}, {}
        for suffix in ("u16", "i32"):
            matvec = getattr(lib, f"csr_matvec_{suffix}")
            matvec.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr]
            matvec.restype = None
            matmul = getattr(lib, f"csr_matmul_{suffix}")
            matmul.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
            matmul.restype = ctypes.c_int
            self.matvec[suffix], self.matmul[suffix] = matvec, matmul
        self.act_sparse_matmul = lib.act_sparse_matmul
        self.act_sparse_matmul.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
        self.act_sparse_matmul.restype = None
        self.act_sparse_csr_matmul = lib.act_sparse_csr_matmul
        self.act_sparse_csr_matmul.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        self.act_sparse_csr_matmul.restype = ctypes.c_int
        i32 = ctypes.c_int
        grid = [i32, i64, i64, i64]  # value kind, rows, cols, mask words per row
        arrays = [ptr, ptr, ptr, ptr, ptr]  # mask, row offsets, values, scale, zero
        self.bm_matvec = lib.bm_matvec
        self.bm_matvec.argtypes = [*grid, *arrays, ptr, i32, ptr, ptr, i32]
        self.bm_matvec.restype = i32
        self.bm_matmul = lib.bm_matmul
        self.bm_matmul.argtypes = [*grid, i64, *arrays, ptr, i32, ptr, ptr, i32]
        self.bm_matmul.restype = i32
        self.bm_decode = lib.bm_decode
        self.bm_decode.argtypes = [*grid, *arrays, ptr, i32]
        self.bm_decode.restype = None
        self.path = path


@functools.lru_cache(maxsize=1)
def _load() -> tuple[_Library | None, str]:
    if os.environ.get(DISABLE_ENV, "").lower() in ("0", "off", "no", "false"):
        return None, f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC)"
    try:
        return _Library(_build(compiler)), ""
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def available() -> bool:
    library, reason = _load()
    if library is None:
        log.warning("sparse kernels unavailable (%s); pruned layers run dense", reason)
    return library is not None


def unavailable_reason() -> str:
    return _load()[1]


def library() -> _Library:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"sparse kernels unavailable: {reason}")
    return lib


def index_suffix(cols: int) -> str:
    return "u16" if cols <= UINT16_COLUMNS else "i32"


def index_dtype(cols: int) -> torch.dtype:
    # torch has no uint16 arithmetic we need; int16 storage carries the same 16 bits the kernel reads.
    return torch.int16 if cols <= UINT16_COLUMNS else torch.int32
