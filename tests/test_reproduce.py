"""The smoke preset end to end (pretrain -> cache -> probes -> report), its resumption, and the report's maths."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from scipy import stats

from conftest import REPO, kill_when
from trajrep.analysis.collect import columns, difference_interval, differences
from trajrep.analysis.per_task import js_divergence_bits, task_divergence
from trajrep.analysis.per_task import main as analysis_main
from trajrep.analysis.plots import plt, time_axes
from trajrep.analysis.report import report
from trajrep.errors import TrajrepError
import trajrep.reproduce
from trajrep.launch import run_inline
from trajrep.reproduce import Encoder, Reproduction, load_preset
from trajrep.reproduce import main as reproduce_main
from trajrep.probe.module import ProbeModule
from trajrep.probe.records import read_results

PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))
# What an encoder's row of the smoke preset has: every kind, and the replicated controls it runs.
SMOKE_PROBES = [probe for probe in columns() if "-" not in probe or probe in ("transformer-replicated",
                                                                              "concat-replicated")]
ENCODER_COLUMNS = [columns()[probe] for probe in SMOKE_PROBES]
ENCODER_DIFFERENCES = [label for column, baseline, label in differences()
                       if column in SMOKE_PROBES and baseline in SMOKE_PROBES]


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_parses(path):
    preset = load_preset(path)
    assert preset.encoders and preset.seeds and set(preset.probes) <= set(columns())


@pytest.mark.parametrize("key", ["\nprobe_args:", "    probe_args:"], ids=["preset", "dataset"])
def test_a_misspelled_preset_key_is_named(key, tmp_path):
    text = (REPO / "configs" / "presets" / "smoke.yaml").read_text().replace(key, key.replace("args", "argz"))
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(TrajrepError, match="probe_argz"):
        load_preset(tmp_path / "bad.yaml")


def test_replicated_controls_without_the_mlp_probe_fail_before_any_stage(tmp_path):
    text = (REPO / "configs" / "presets" / "smoke.yaml").read_text() + "probes: [linear, transformer]\n"
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(TrajrepError, match="add mlp to probes"):
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
    """`python -m trajrep.reproduce configs/presets/smoke.yaml` from nothing, in a subprocess (a preset's W&B
    logging: tests/test_kinds.py)."""
    root = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "trajrep.reproduce", str(REPO / "configs" / "presets" / "smoke.yaml"),
               "--runs", str(root / "runs"), "--results", str(root / "results")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_smoke_preset_goes_from_nothing_to_a_table(smoke_run):
    out = smoke_run / "results" / "smoke"
    table = (out / "table.md").read_text()
    for column in ENCODER_COLUMNS:
        assert column in table
    assert "untrained reg-drl" in table and "pixels" in table and "CKA across t" in table
    assert "| shapes | reg-drl |" in table and "SyntheticShapes" not in table  # the preset's dataset name
    # The untrained control has one seed: its differences say so instead of showing a bare number. (Rows of the
    # first task, background: the replicated controls repeat its best t, and count for another task only where its
    # best t is the same.)
    untrained = next(line for line in table.splitlines()
                     if "| untrained reg-drl |" in line and "| background |" in line)
    assert untrained.count("(n = 1, no interval)") == len(ENCODER_DIFFERENCES)
    assert [p.name for p in (smoke_run / "cache").iterdir()] == ["smoke"]  # the preset's cache_dir, verbatim
    for name in ("table.csv", "table.tex", "accuracy_vs_t.png", "attention_over_t.png"):
        assert (out / name).stat().st_size > 0, name
    # Two pretraining seeds per trained row: the cells carry a spread and the differences an interval.
    row = next(line for line in table.splitlines() if "| reg-drl |" in line and "| background |" in line)
    assert row.count("±") == len(ENCODER_COLUMNS) + len(ENCODER_DIFFERENCES)
    # The dataset's probe_args (2 epochs) come after the preset's (1 epoch); the kNN probe has no epochs.
    epochs = {path.name.split("-")[0]: read_results(path)["context"]["epochs"]
              for path in (out / "probes").rglob("*.json")}
    assert epochs.pop("knn") is None and set(epochs.values()) == {2}
    # Encoder records name their noise process (the figures' sigma(t) axis); the pixel control has none.
    for path in (out / "probes").rglob("*.json"):
        sde = read_results(path)["context"].get("sde")
        assert sde == (None if path.parent.name == "shapes-pixels" else {"sigma_min": 0.01, "sigma_max": 50.0}), path
    # The pixel control's own lr grid replaces the preset's for its mlp only.
    grids = {path.name.split("-")[0]: read_results(path)["context"]["config"]["model"]["learning_rates"]
             for path in (out / "probes" / "shapes-pixels").glob("*.json") if not path.name.startswith("knn")}
    assert grids == {"mlp": [0.003, 0.0003], "linear": [0.001, 0.0001]}
    # The preset's threads reach every stage.
    saved = [path for path in (smoke_run / "runs" / "smoke").rglob("config.yaml")
             if not any(part.startswith("offline-run") for part in path.parts)]  # LightningCLI's, not W&B's
    assert saved and all(yaml.safe_load(path.read_text())["threads"] == 2 for path in saved)
    # The replicated controls read the MLP's validation-selected best t.
    replicated = sorted((out / "probes").rglob("replicated/*.json"))
    assert len(replicated) == 2 * 3  # transformer and concat on 2 seeds and the untrained encoder
    for path in replicated:
        mlp = next(path.parent.parent.glob("mlp-*.json"))
        best = next(iter(read_results(mlp)["summary"].values()))["time"]
        assert read_results(path)["context"]["replicated_time"] == best


@pytest.mark.slow
def test_rerunning_a_finished_preset_redoes_nothing(smoke_run, monkeypatch, capsys):
    out = smoke_run / "results" / "smoke"
    records = sorted((out / "probes").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    no_stage_runs(monkeypatch)
    reproduce_in(smoke_run, smoke_run, monkeypatch)
    assert [p.stat().st_mtime_ns for p in records] == stamps
    counts = re.search(r"\b(\d+) of (\d+) stages are done; 1 to check and run", capsys.readouterr().out)
    assert counts and int(counts[1]) == int(counts[2]) - 1  # every stage but the report, which is always redone


def no_stage_runs(monkeypatch) -> None:
    """Fail the test if a pretraining, untrained control, cache or probe stage starts."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a stage ran: {args}")

    monkeypatch.setattr(trajrep.reproduce, "cli_main", refuse)
    for name in ("build_cache", "untrained"):
        monkeypatch.setattr(Reproduction, name, refuse)


def reproduce_in(folder: pathlib.Path, root: pathlib.Path, monkeypatch,
                 preset: pathlib.Path = REPO / "configs" / "presets" / "smoke.yaml") -> None:
    """`python -m trajrep.reproduce <preset>` in this process, from `folder` (where the preset's cache_dir is), with
    runs/ and results/ under `root`; W&B off."""
    monkeypatch.chdir(folder)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    reproduce_main([str(preset), "--runs", str(root / "runs"), "--results", str(root / "results")])


def cut_smoke(folder: pathlib.Path) -> pathlib.Path:
    """The smoke preset cut to one seed and the MLP, written to `folder`: its records must be those of the same runs
    in the inline smoke run."""
    preset = yaml.safe_load((REPO / "configs" / "presets" / "smoke.yaml").read_text())
    preset.update(seeds=[1], probes=["mlp"], replicated=[], probe_kind_args={})
    preset["encoders"][0]["untrained"] = False
    (folder / "smoke.yaml").write_text(yaml.safe_dump(preset))
    return folder / "smoke.yaml"


def assert_records_and_table_as_inline(smoke_run: pathlib.Path, root: pathlib.Path) -> None:
    """The cut preset's records under `root` are the inline smoke run's (the same configuration, as the names'
    hashes say, and the same accuracies), and its table is the one the inline records of these runs make."""
    probes, inline_probes = root / "results" / "smoke" / "probes", root / "inline" / "probes"
    made = sorted(probes.rglob("*.json"))
    assert len(made) == 1 + 1 and (root / "results" / "smoke" / "table.md").exists()  # pixels and the encoder
    for path in made:
        inline = smoke_run / "results" / "smoke" / "probes" / path.relative_to(probes)
        assert read_results(path)["summary"] == read_results(inline)["summary"], path.name
        (inline_probes / path.relative_to(probes)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(inline, inline_probes / path.relative_to(probes))
    report(inline_probes, root / "inline")
    assert (root / "inline" / "table.md").read_text() == (root / "results" / "smoke" / "table.md").read_text()


@pytest.mark.slow
def test_a_fresh_clone_with_the_committed_records_pretrains_nothing(smoke_run, tmp_path, monkeypatch, capsys):
    # What git holds of a finished preset: results/ (records, tables), no runs/ and no cache.
    shutil.copytree(smoke_run / "results", tmp_path / "results")
    records = {path: path.read_bytes() for path in (tmp_path / "results" / "smoke" / "probes").rglob("*.json")}
    no_stage_runs(monkeypatch)
    reproduce_in(tmp_path, tmp_path, monkeypatch)
    counts = re.search(r"\b(\d+) of (\d+) stages are done; 1 to check and run", capsys.readouterr().out)
    assert counts and int(counts[1]) == int(counts[2]) - 1  # every stage but the report, which is always redone
    assert {path: path.read_bytes() for path in records} == records
    assert not (tmp_path / "cache").exists()  # nothing extracted either
    expected = (smoke_run / "results" / "smoke" / "table.md").read_text()
    assert (tmp_path / "results" / "smoke" / "table.md").read_text() == expected


@pytest.mark.slow
def test_killed_preset_keeps_finished_records_and_ends_with_the_same_table(smoke_run, tmp_path, monkeypatch):
    preset = cut_smoke(tmp_path)
    command = [sys.executable, "-m", "trajrep.reproduce", str(preset), "--runs", str(tmp_path / "runs"),
               "--results", str(tmp_path / "results")]
    probes = tmp_path / "results" / "smoke" / "probes"
    kill_when(command, lambda: any(probes.rglob("*.json")), cwd=tmp_path, timeout=900)  # after the run's MLP
    finished = {path: path.stat().st_mtime_ns for path in probes.rglob("*.json")}
    assert not (tmp_path / "results" / "smoke" / "table.md").exists()

    reproduce_in(tmp_path, tmp_path, monkeypatch, preset)  # the rerun, in this process: it starts sooner
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # kept, not redone
    assert_records_and_table_as_inline(smoke_run, tmp_path)


@pytest.mark.slow
def test_a_probe_grid_killed_after_an_epoch_resumes_there_and_records_what_a_straight_one_does(
        smoke_run, tmp_path, monkeypatch):
    preset, probe_runs = cut_smoke(tmp_path), tmp_path / "runs" / "smoke" / "probe"
    killed = []

    def killed_after_its_first_epoch(module: ProbeModule) -> None:  # as the second starts: the first's checkpoint
        if module.current_epoch == 1 and not killed:
            killed.extend(probe_runs.rglob("last.ckpt"))
            raise RuntimeError("killed")

    monkeypatch.setattr(ProbeModule, "on_train_epoch_start", killed_after_its_first_epoch)
    with pytest.raises((RuntimeError, SystemExit)):
        reproduce_in(tmp_path, tmp_path, monkeypatch, preset)
    assert len(killed) == 1 and not list((tmp_path / "results" / "smoke" / "probes").rglob("*.json"))
    stale = killed[0].parent.parent / "digest-of-other-settings" / "last.ckpt"  # e.g. from an earlier preset file
    stale.parent.mkdir()
    stale.touch()

    stages = []
    run_stage = Reproduction._run_stage
    monkeypatch.setattr(Reproduction, "_run_stage", lambda self, subcommand, args: (stages.append(args),
                                                                                    run_stage(self, subcommand, args)))
    reproduce_in(tmp_path, tmp_path, monkeypatch, preset)
    assert [args for args in stages if f"--ckpt_path={killed[0]}" in args]  # resumed, not started again
    assert not list(probe_runs.rglob("*.ckpt"))  # removed once their records were written, the stale one at the start
    assert_records_and_table_as_inline(smoke_run, tmp_path)


def test_a_run_to_pretrain_again_while_it_has_records_stops_the_preset_before_any_stage_and_removes_nothing(
        tmp_path, monkeypatch, capsys):
    """Its checkpoint gone and a probe missing (a fresh clone of a preset that gained a kind): new weights would not
    match the records. Once the records are removed, pretraining goes on and drops its killed probes' checkpoints."""
    preset_path = cut_smoke(tmp_path)
    run = "shapes-reg-drl-seed1"
    record = tmp_path / "results" / "smoke" / "probes" / run / "g2" / "linear-old.json"
    killed = tmp_path / "runs" / "smoke" / "probe" / run / "g2" / "mlp" / "checkpoints" / "digest" / "last.ckpt"
    for path in (record, killed):
        path.parent.mkdir(parents=True)
        path.touch()
    no_stage_runs(monkeypatch)
    with pytest.raises(SystemExit):
        reproduce_in(tmp_path, tmp_path, monkeypatch, preset_path)
    message = capsys.readouterr().err
    assert f"{run} would be pretrained again" in message and f"rm -r {record.parent.parent}" in message
    assert record.exists() and killed.exists()

    preset = load_preset(preset_path, check=False)
    reproduction = Reproduction(preset, "smoke", tmp_path / "runs", tmp_path / "results")
    monkeypatch.setattr(reproduction, "_run_stage", lambda subcommand, args: None)
    shutil.rmtree(record.parent.parent)
    (tmp_path / "runs" / "smoke" / run).mkdir()  # where the (here skipped) fit would write
    reproduction.pretrain(preset.datasets[0], preset.encoders[0], 1)
    assert not killed.exists()  # it read the weights about to be trained


@pytest.mark.slow
def test_local_launcher_runs_two_stages_at_once_goes_on_after_a_killed_job_and_records_what_inline_does(
        smoke_run, tmp_path, monkeypatch, capsys):
    # The cut smoke preset: each stage is a process of its own
    command = [sys.executable, "-m", "trajrep.reproduce", str(cut_smoke(tmp_path)), "--runs",
               str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--launcher", "local", "--jobs", "2"]
    env = {**os.environ, "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}  # no stage waits for a GPU
    jobs, target = tmp_path / "runs" / "smoke" / "jobs", "pretrain/shapes-reg-drl-seed1"

    def task_of(stage: str) -> int | None:  # the pid of the job's task (the controller's child), once it runs
        try:
            job = json.loads((jobs / "jobs.json").read_text())["jobs"].get(stage, {}).get("job_id")
            children = pathlib.Path(f"/proc/{job}/task/{job}/children").read_text().split() if job else []
        except (OSError, ValueError):  # not written yet, or the controller is gone
            return None
        return int(children[0]) if children else None

    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not task_of(target):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.02)
        os.kill(task_of(target), signal.SIGKILL)  # the stage dies mid-way: its job ends without a result
        assert first.wait(timeout=600) != 0
    output = (tmp_path / "first.log").read_text()
    assert f"{target} failed" in output and ", 2 running" in output  # the pixel probe ran beside it
    records = {path: path.stat().st_mtime_ns for path in (tmp_path / "results").rglob("*.json")}
    assert records and all("pixels" in str(path) for path in records)

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    reproduce_main([*command[3:], "--status"])  # in this process: it only reads
    unfinished = {line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1] if line.split()[1] != "done"}
    assert target in unfinished and "report" in unfinished and len(unfinished) == 1 + 1 + 1 + 1
    for name, value in env.items():  # the rerun's controller in this process (it starts sooner); its jobs as before
        monkeypatch.setenv(name, value)
    reproduce_main(command[3:])
    again = capsys.readouterr().out
    assert set(re.findall(r"started (\S+) \(job", again)) == unfinished  # only what had not finished
    assert {path: path.stat().st_mtime_ns for path in records} == records
    assert_records_and_table_as_inline(smoke_run, tmp_path)


def test_a_variant_can_be_probed_at_intermediate_steps_with_its_own_seeds(tmp_path):
    preset = load_preset(REPO / "configs" / "presets" / "cpu.yaml")
    long = Encoder(name="reg-d8-long", args=["--trainer.max_steps=1200"], seeds=[2], probe_steps=[400, 800],
                   untrained=False)
    preset.encoders = [long]
    reproduction = Reproduction(preset, "cpu", tmp_path / "runs", tmp_path / "results")
    dataset = preset.datasets[0].name
    caches = [stage.name for stage in reproduction.stages() if stage.kind == "cache"]
    run = f"{dataset}-reg-d8-long-seed2"
    assert caches == [f"cache/{run}", f"cache/{run}-step400", f"cache/{run}-step800"]  # its own seed, no untrained
    folder = tmp_path / "runs" / "cpu" / run / "checkpoints"
    folder.mkdir(parents=True)
    for step in (400, 800, 1200):
        (folder / f"epoch=0-step={step}.ckpt").touch()
    assert reproduction.at_step(folder / "last.ckpt", 800).name == "epoch=0-step=800.ckpt"
    with pytest.raises(TrajrepError, match="no checkpoint of step 600"):
        reproduction.at_step(folder / "last.ckpt", 600)


def test_each_run_is_probed_before_the_next_one_pretrains_and_recorded_runs_are_not_pretrained(tmp_path,
                                                                                                monkeypatch):
    preset = load_preset(REPO / "configs" / "presets" / "smoke.yaml")
    reproduction = Reproduction(preset, "smoke", tmp_path / "runs", tmp_path / "results")
    dataset, encoder = preset.datasets[0], preset.encoders[0]
    seeds = encoder.seeds or preset.seeds
    assert len(seeds) >= 2
    events = []
    monkeypatch.setattr(reproduction, "pretrain", lambda d, e, seed: events.append(("pretrain", seed)))
    monkeypatch.setattr(reproduction, "untrained", lambda d, e: events.append(("untrained",)))
    monkeypatch.setattr(reproduction, "build_cache", lambda d, e, checkpoint: None)
    monkeypatch.setattr(reproduction, "probe_grid", lambda run, probing, *args, **kw: events.append(("probe", run)))
    monkeypatch.setattr(reproduction, "probe", lambda run, *args, **kw: None)  # the raw-pixel control
    monkeypatch.setattr(reproduction, "report", lambda: None)
    recorded = f"{dataset.name}-{encoder.name}-seed{seeds[0]}"
    monkeypatch.setattr(trajrep.reproduce, "_has_record", lambda folder, kind: recorded in str(folder))
    run_inline(reproduction.stages())
    per_run = [None] * len(preset.grids) * (len(preset.probes) + len(preset.replicated))
    expected = [event for seed in seeds[1:] for event in (("pretrain", seed),
                                                           *[("probe", f"{dataset.name}-{encoder.name}-seed{seed}")
                                                             for _ in per_run])]
    if encoder.untrained:
        expected += [("untrained",), *[("probe", f"{dataset.name}-{encoder.name}-untrained") for _ in per_run]]
    assert events == expected  # the first seed is recorded in full: neither pretrained nor probed


def test_time_axes_label_sigma_at_the_t_positions_where_the_noise_process_is_known():
    figure, (known, unknown) = plt.subplots(1, 2)
    time_axes(known, {"sigma_min": 0.01, "sigma_max": 50.0})
    time_axes(unknown, None)
    figure.canvas.draw()
    top = next(child for child in known.get_children() if child.__class__.__name__ == "SecondaryAxis")
    assert [label.get_text() for label in top.get_xticklabels()] == ["0.01", "0.084", "0.71", "5.9", "50"]
    assert list(top.get_xticks()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert not any(child.__class__.__name__ == "SecondaryAxis" for child in unknown.get_children())
    plt.close(figure)


def test_js_divergence_is_in_bits():
    assert js_divergence_bits([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert js_divergence_bits([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
    assert js_divergence_bits(p, q) == pytest.approx(expected)


def test_task_divergence_leaves_out_single_task_encoders():
    profiles = {"a": {"mean": [0.5, 0.5]}, "b": {"mean": [1.0, 0.0]}}
    found = task_divergence({("two tasks",): profiles, ("one task",): {"a": profiles["a"]}})
    assert list(found) == [("two tasks",)] and found[("two tasks",)]["tasks"] == ["a", "b"]


@pytest.mark.slow
def test_analysis_of_the_smoke_preset_writes_every_file(smoke_run, monkeypatch):
    probes = smoke_run / "results" / "smoke" / "probes"
    monkeypatch.chdir(smoke_run)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    analysis_main([str(probes), "--mine-steps=200", "--mine-seeds", "0", "--wandb-project", "trajrep-smoke",
                   "--wandb-dir", "wandb-analysis"])
    out = smoke_run / "results" / "smoke" / "analysis"
    (run,) = (smoke_run / "wandb-analysis").rglob("offline-run-*")
    for name in ("attention_per_task_table", "accuracy_over_t_table"):
        assert list(run.rglob(f"{name}*.table.json")), name
    assert len(list(run.rglob("*.png"))) == len(list(out.glob("*.png"))) == 6  # every figure as a W&B image
    for name in ("accuracy_over_t.json", "accuracy_over_t.png", "attention_per_task.json", "attention_per_task.png",
                 "task_divergence.json", "task_divergence.png", "masking.json", "masking.md", "masking.png",
                 "nmi.json", "nmi.png", "attention_per_class.json", "attention_per_class.png", "analysis.md"):
        assert (out / name).stat().st_size > 0, name
    tasks = {"background", "foreground", "location", "shape"}
    for encoder in json.loads((out / "accuracy_over_t.json").read_text()):
        assert set(encoder) - {"encoder"} == tasks
        assert all(len(entry["val_mean"]) == len(entry["times"]) == 3 for name, entry in encoder.items()
                   if name in tasks)
    for encoder in json.loads((out / "attention_per_task.json").read_text()):
        assert all(sum(encoder[task]["mean"]) == pytest.approx(1.0) for task in tasks)
    for encoder in json.loads((out / "attention_per_class.json").read_text()):
        assert len(encoder["background"]["mean"]) == 9 and len(encoder["shape"]["mean"]) == 5  # classes per task
        assert all(sum(row) == pytest.approx(1.0) for row in encoder["location"]["mean"])
    for encoder in json.loads((out / "masking.json").read_text()):
        assert all(len(encoder[task]["drop"]) == 4 and len(encoder[task]["keep_only"]) == 3 for task in tasks)
    for encoder in json.loads((out / "nmi.json").read_text()):
        nmi = np.array(encoder["nmi"])
        assert nmi.shape == (3, 3) and np.allclose(nmi, nmi.T) and (nmi >= 0).all()
    for encoder in json.loads((out / "task_divergence.json").read_text()):
        bits = np.array(encoder["bits"])
        assert np.allclose(bits, bits.T) and np.allclose(np.diag(bits), 0) and (bits >= 0).all()
