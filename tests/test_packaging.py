"""The built wheel, not the editable checkout, carries what the tool needs at run time: built once, installed into a
fresh virtual environment that sees the test environment's dependencies but not its checkout, then run from outside
the checkout: --version (the installed distribution's), --help, the CPU kernel compiled from the wheel's C source
into an empty cache, and a tiny prune. The packaged lm-eval task's files are checked in the wheel itself (running
lm-eval's task index from there would add half a minute; tests/test_zero_shot.py runs the task).

Checked once by hand: with `[tool.setuptools.exclude-package-data] sparse_expansion = ["kernels/*.c",
"evaluation/tasks/*/*"]` added to pyproject.toml, the listing test and the kernel check fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASK = "sparse_expansion_local_mc"

pytestmark = pytest.mark.slow  # builds a wheel and starts several Python processes


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin directory of a fresh venv with the wheel installed, the wheel, a work directory outside the checkout)."""
    base = tmp_path_factory.mktemp("packaging")
    # What the build reads, copied without the checkout's build leftovers: an old egg-info's file list would put
    # files into the wheel that pyproject.toml no longer ships.
    source = base / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    wheels = base / "wheels"
    # The test environment's setuptools (within pyproject's bound) builds it; no download.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("sparse_expansion-*.whl")
    env = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = Path(subprocess.run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies, as a plain path: the test environment's .pth files (its editable checkout) are not read.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True)
    work = base / "work"
    work.mkdir()
    return env / "bin", wheel, work


def _run(installed, *args, program="sparse-expansion") -> subprocess.CompletedProcess:
    bindir, _, work = installed
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(SPARSE_EXPANSION_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([str(bindir / program), *args], cwd=work, env=env, capture_output=True, text=True)


def test_the_wheel_holds_the_kernel_source_the_task_and_the_license(installed):
    _, wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparse_expansion/kernels/csr_kernels.c" in names
    for name in (f"{TASK}.yaml", "local_mc.jsonl", "local_mc_data.py"):
        assert f"sparse_expansion/evaluation/tasks/local_mc/{name}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text


def test_the_installed_wheel_runs_outside_the_checkout(installed, llama_dir, corpus_dir):
    """One Python process for the facts (its version, where the package is, the kernel compiled from the wheel's C
    source into the empty cache), then the entry point: --version, --help and a tiny prune."""
    from sparse_expansion.kernels import native

    kernel = native.available()  # no C compiler on this machine: the wheel's kernel cannot be built either
    found = _run(installed, "-c", "import importlib.metadata as m, sparse_expansion as se; "
                                  "from sparse_expansion.kernels import native; "
                                  f"assert native.available() or not {kernel}, native.unavailable_reason(); "
                                  "print(m.version('sparse-expansion')); print(se.__file__)", program="python")
    assert found.returncode == 0, found.stderr
    version, location = found.stdout.split()
    assert str(installed[0].parent) in location and str(ROOT) not in location  # the wheel's copy, not the checkout
    if kernel:
        assert list((installed[2] / "cache" / "kernels").glob("csr_kernels-*.so"))  # built now, into the empty cache
    result = _run(installed, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sparse-expansion {version}"
    result = _run(installed, "--help")
    assert result.returncode == 0 and "prune" in result.stdout and "expand" in result.stdout
    work = installed[2]
    result = _run(installed, "prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--method", "sparsegpt",
                  "--sparsity", "0.5", "--calib-samples", "4", "--seqlen", "32", "--quiet", "--out", str(work / "p"))
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "p" / "manifest.json").read_text())["method"] == "sparsegpt"
