"""benchmarks/common.py: every benchmark JSON records what moves its rounding and speed beside its rows."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import write_results  # noqa: E402


def test_results_record_the_cpu_flags_threads_and_openmp_wait_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    path = tmp_path / "sub" / "out.json"
    write_results(str(path), [{"x": 1}], settings={"a": 2})
    payload = json.loads(path.read_text())
    environment = payload["environment"]
    assert environment["omp_wait_policy"] == "PASSIVE"
    assert environment["threads"] == torch.get_num_threads()
    assert environment["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    text = Path("/proc/cpuinfo").read_text()
    line = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    listed = set(line.split(":")[1].split())
    assert environment["cpu_flags"] and set(environment["cpu_flags"]) <= listed
    assert payload["results"] == [{"x": 1}] and payload["settings"] == {"a": 2}
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file, then renamed
    monkeypatch.delenv("OMP_WAIT_POLICY")  # unset: not recorded, as in the reports written before it was
    write_results(str(path), [])
    assert "omp_wait_policy" not in json.loads(path.read_text())["environment"]
