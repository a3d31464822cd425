"""benchmarks/gpu_suite.sh --dry-run on the CPU: every step's command line parses, the carried inputs are prepared."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # starts Python processes; reads the embedded model's tokenizer
def test_the_gpu_suite_dry_run_checks_its_steps(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "TOKENIZER": str(tmp_path / "tokenizer"), "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "every step parses" in result.stdout
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()  # what a GPU call carries
    assert (tmp_path / "work" / "text" / "test.txt").stat().st_size > 100_000
