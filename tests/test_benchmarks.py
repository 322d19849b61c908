"""The prepared GPU check runs end to end (--dry-run, tiny sizes on the CPU) and rewrites only its own section."""

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_replaces_its_section_of_the_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nearlier figures stay\n")
    for _ in range(2):
        run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--results", str(results)], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmarks\n\nearlier figures stay\n")
    assert text.count("## GPU check (dry run, tiny sizes)") == 1 and text.rstrip().endswith("<!-- /bench-gpu -->")
    for line in ("fp32 eager", "device_resident data", "ratio cache / recompute", "mlp          vectorised",
                 "gru          training step", "transformer  vectorised"):
        assert line in text, line


def test_gpu_check_refuses_to_run_for_real_without_a_gpu():
    run = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=REPO, capture_output=True, text=True,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""}, timeout=300)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr
