"""Regime sweep: runs train once, the table reads their online probes, and a sweep grows without retraining."""

import json
import shutil

import pytest
import yaml

from conftest import QUICKSTART, REPO
from trajrep.errors import TrajrepError
from trajrep.cli import main as cli_main
from trajrep.regime import load_sweep, main

# The shrunk quickstart with an OnlineProbe appended after ModelCheckpoint (which gets its settings first).
TINY_SWEEP_ARGS = ["--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                   "--trainer.callbacks.init_args.every_n_train_steps=2", "--data.init_args.batch_size=8",
                   "--data.init_args.num_train=64", "--model.init_args.nf=8", "--model.init_args.widen_factor=0.125",
                   "--trainer.callbacks+=OnlineProbe", "--trainer.callbacks.init_args.every_n_steps=2",
                   "--trainer.callbacks.init_args.num_train=40", "--trainer.callbacks.init_args.num_heldout=16",
                   "--trainer.callbacks.init_args.tasks=[3,0]"]  # shape, then background: not the CSV's order


def write_sweep(path, runs):
    path.write_text(yaml.safe_dump({"pretrain_config": str(REPO / QUICKSTART), "args": TINY_SWEEP_ARGS,
                                    "runs": runs}))
    return path


def run_sweep(tmp_path, sweep, capsys):
    main([str(sweep), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    return capsys.readouterr().out


@pytest.mark.slow
def test_a_sweep_tabulates_its_runs_and_grows_without_retraining(tmp_path, capsys):
    runs = [{"name": "l1", "args": ["--model.init_args.reg_weight=0.1"]},
            {"name": "noreg", "args": ["--model.init_args.mode=noreg-drl"]}]
    sweep = write_sweep(tmp_path / "tiny.yaml", runs)
    printed = run_sweep(tmp_path, sweep, capsys)
    assert printed.count("trajrep regime: training") == 2
    out = tmp_path / "results" / "tiny"
    logged = json.loads((out / "runs.json").read_text())
    rows = {row["name"]: row for row in logged["runs"]}
    assert set(rows) == {"l1", "noreg"}
    assert rows["l1"]["reg_weight"] == 0.1 and rows["noreg"]["mode"] == "noreg-drl"
    for row in rows.values():
        assert row["finished"] and row["steps"] == 4 and row["latent_dim"] == 8 and row["wall_minutes"] > 0
        assert [point["step"] for point in row["curve"]] == [2, 4]
        assert list(row["tasks"]) == ["shape", "background"]  # the probe's order
        for task in row["tasks"].values():
            assert set(task["accuracy"]) == {"t0", "t0.25", "t0.5", "t0.75", "t1"}
            assert task["best"] == task["accuracy"][task["best_t"]] == max(task["accuracy"].values())
            assert all(0 <= task[key] <= 1 for key in ("untrained", "pixels", "pixel_pca"))
    table = (out / "table.md").read_text()
    assert "| l1 | reg-drl | 0.125 | 8 | 0.1 |" in table and "| noreg | noreg-drl |" in table
    assert table.count("| l1 | reg-drl |") == 2  # one line per task
    assert "| pixels PCA-d_z (%) | best - PCA-d_z |" in table
    assert (out / "online.png").stat().st_size > 0

    checkpoint = tmp_path / "runs" / "tiny" / "l1" / "checkpoints" / "last.ckpt"
    stamp = checkpoint.stat().st_mtime_ns
    sweep = write_sweep(sweep, [*runs, {"name": "wide", "args": ["--model.init_args.widen_factor=0.25",
                                                                 "--model.init_args.latent_dim=3"]}])
    printed = run_sweep(tmp_path, sweep, capsys)
    assert printed.count("trajrep regime: training") == 1 and "training wide" in printed
    assert checkpoint.stat().st_mtime_ns == stamp
    rows = {row["name"]: row for row in json.loads((out / "runs.json").read_text())["runs"]}
    assert rows["wide"]["latent_dim"] == 3 and rows["wide"]["widen_factor"] == 0.25

    # A fresh clone holds results/ but no checkpoints: the recorded runs are not trained again and keep their rows,
    # even beside a local run of the same name that did not finish (an unreadable checkpoint: resuming would fail).
    shutil.rmtree(tmp_path / "runs")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    printed = run_sweep(tmp_path, sweep, capsys)
    assert "training" not in printed and "resuming" not in printed
    assert printed.count("finished in an earlier checkout") == 3
    assert json.loads((out / "runs.json").read_text())["runs"] == list(rows.values())
    assert (out / "table.md").read_text().count("| wide | reg-drl |") == 2


def test_repeated_run_names_and_unknown_keys_are_clear_errors(tmp_path):
    with pytest.raises(TrajrepError, match="run names must differ"):
        load_sweep(write_sweep(tmp_path / "twice.yaml", [{"name": "a"}, {"name": "a"}]))
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"pretrain_config": "x.yaml", "runs": [], "argz": []}))
    with pytest.raises(TrajrepError, match="not valid"):
        load_sweep(bad)
    with pytest.raises(TrajrepError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "regime").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_loads_and_its_runs_parse(path):
    sweep = load_sweep(path)
    assert sweep.runs
    for run in sweep.runs:  # each run's options are valid pretraining options (parsed, nothing built)
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(REPO / sweep.pretrain_config), *sweep.args, *run.args, "--print_config"])
        assert exit_info.value.code == 0
