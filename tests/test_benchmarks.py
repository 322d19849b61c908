"""The prepared GPU check runs end to end (--dry-run, tiny sizes on the CPU) and rewrites only its own section."""

import importlib
import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.fixture
def gpu(monkeypatch):
    """benchmarks/gpu.py as a module (its folder on the path only for the test: it imports its neighbours)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("gpu")


@pytest.mark.slow
def test_gpu_check_dry_run_replaces_its_section_of_the_results(tmp_path, gpu):
    results = tmp_path / "RESULTS.md"  # as an earlier run left it: its section between figures that stay
    earlier, later = "# Benchmarks\n\nearlier figures stay\n", f"{gpu.END}\nlater ones too\n"
    results.write_text(f"{earlier}\n{gpu.BEGIN}\nan older GPU check\n{later}")
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--results", str(results)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = results.read_text()
    assert text.startswith(earlier) and text.endswith(later)
    assert "an older GPU check" not in text and text.count("## GPU check (dry run, tiny sizes)") == 1
    for line in ("fp32 eager", "device_resident data", "ratio cache / recompute", "mlp          vectorised",
                 "gru          training step", "transformer  vectorised"):
        assert line in text, line


def test_a_first_gpu_check_appends_its_section_and_a_second_replaces_it(tmp_path, gpu):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nearlier figures stay\n")
    gpu.write_section(results, ["first"])
    gpu.write_section(results, ["second"])
    assert results.read_text() == f"# Benchmarks\n\nearlier figures stay\n\n{gpu.BEGIN}\nsecond\n{gpu.END}\n"


def test_gpu_check_refuses_to_run_for_real_without_a_gpu(monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["benchmarks/gpu.py"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu.main()
