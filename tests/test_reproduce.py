"""The smoke preset end to end (pretrain -> cache -> probes -> report), its resumption, and the report's maths."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import REPO
from trajrep.errors import TrajrepError
from trajrep.report import COLUMNS, difference_interval
from trajrep.reproduce import load_preset

PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_parses(path):
    preset = load_preset(path)
    assert preset.encoders and preset.seeds and set(preset.probes) <= set(COLUMNS)


def test_a_misspelled_preset_key_is_named(tmp_path):
    text = (REPO / "configs" / "presets" / "smoke.yaml").read_text().replace("probe_args:", "probe_argz:")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(TrajrepError, match="probe_argz"):
        load_preset(tmp_path / "bad.yaml")


def test_difference_interval_is_the_paired_t_interval():
    mixer, single = [0.80, 0.84, 0.83], [0.78, 0.80, 0.82]
    mean, half = difference_interval(mixer, single)
    differences = np.subtract(mixer, single)
    assert mean == pytest.approx(differences.mean())
    interval = stats.t.interval(0.95, 2, loc=differences.mean(), scale=stats.sem(differences))
    assert half == pytest.approx(interval[1] - differences.mean())
    assert difference_interval([0.8], [0.7])[1] is None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> pathlib.Path:
    """`python -m trajrep.reproduce configs/presets/smoke.yaml` from nothing, W&B offline, in a subprocess."""
    root = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "trajrep.reproduce", str(REPO / "configs" / "presets" / "smoke.yaml"),
               "--runs", str(root / "runs"), "--results", str(root / "results"), "--wandb-project", "trajrep-smoke"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_smoke_preset_goes_from_nothing_to_a_table(smoke_run):
    out = smoke_run / "results" / "smoke"
    table = (out / "table.md").read_text()
    for column in COLUMNS.values():
        assert column in table
    assert "untrained reg-drl" in table and "pixels" in table and "CKA across t" in table
    for name in ("table.csv", "table.tex", "accuracy_vs_t.png", "attention_over_t.png"):
        assert (out / name).stat().st_size > 0, name
    # Two pretraining seeds per trained row: the cells carry a spread and the differences an interval.
    row = next(line for line in table.splitlines() if "| reg-drl |" in line and "| shape |" in line)
    assert row.count("±") == len(COLUMNS) + 3


@pytest.mark.slow
def test_smoke_preset_logs_the_tables_to_an_offline_wandb_run(smoke_run):
    runs = list((smoke_run / "runs" / "smoke").rglob("offline-run-*"))
    # One W&B run per stage: 2 pretraining runs, 7 probe kinds on 3 encoders (2 seeds, untrained), pixels, report.
    assert len(runs) == 2 + 7 * 3 + 1 + 1
    (report_run,) = [run for run in runs if list(run.rglob("results_table*.table.json"))]
    assert list(report_run.rglob("accuracy_vs_t_table*.table.json"))


@pytest.mark.slow
def test_rerunning_a_finished_preset_redoes_nothing(smoke_run):
    out = smoke_run / "results" / "smoke"
    records = sorted((out / "probes").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "trajrep.reproduce", str(REPO / "configs" / "presets" / "smoke.yaml"),
               "--runs", str(smoke_run / "runs"), "--results", str(smoke_run / "results")]
    done = subprocess.run(command, cwd=smoke_run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in records] == stamps
    assert "Trainer.fit" not in done.stdout + done.stderr  # no pretraining or probe run started
