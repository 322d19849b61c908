"""The stage graph launchers: what is run again, SLURM submission with dependencies, --status and --dry-run."""

import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import submitit

from conftest import REPO
from trajrep.errors import TrajrepError
from trajrep.launch import (Registry, Resources, Stage, check_launch, resources_for, run_local, status, submit_slurm,
                            to_run)
from trajrep.reproduce import main

SMOKE = REPO / "configs" / "presets" / "smoke.yaml"


def chain(done: set[str]) -> list[Stage]:
    """a -> b -> c, and d alone; the names in `done` are done."""
    needs = {"a": [], "b": ["a"], "c": ["a", "b"], "d": []}
    return [Stage(name, wanted, lambda name=name: name in done, lambda: None) for name, wanted in needs.items()]


def test_a_stage_downstream_of_one_to_run_is_run_again_even_if_done():
    # b must be checked again after a reruns (a pretraining run done again removes the records built on it)
    assert [stage.name for stage in to_run(chain(done={"b", "c", "d"}))] == ["a", "b", "c"]
    assert [stage.name for stage in to_run(chain(done={"a", "b", "d"}))] == ["c"]


def test_slurm_without_a_cluster_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(TrajrepError, match="srun"):
        submit_slurm(chain(done=set()), print, tmp_path / "jobs", "smoke", resources_for({}))


def test_jobs_in_parallel_need_the_local_launcher():
    with pytest.raises(TrajrepError, match="needs --launcher local"):
        check_launch("inline", 2)
    with pytest.raises(TrajrepError, match="must be one of"):
        check_launch("kubernetes", 1)


def test_preset_resources_override_the_defaults_field_by_field():
    resources = resources_for({"probe": Resources(partition="gpu", time_min=60, slurm_args={"account": "lab"})})
    probe = resources("probe")
    assert (probe.partition, probe.time_min, probe.gpus, probe.slurm_args) == ("gpu", 60, 1, {"account": "lab"})
    assert resources("pretrain").partition is None
    with pytest.raises(TrajrepError, match="unknown stage kind"):
        resources_for({"pretraining": Resources()})


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Iterator[pathlib.Path]:
    """`sbatch`, `sacct`, `scancel` and `srun` on PATH: sbatch numbers its jobs from 101 and keeps each batch file
    it was given; sacct reports the `id|STATE` lines of the file `states` (a job not there is unknown to it, as
    a real sacct says nothing of a job it has not recorded); scancel logs the ids it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
n=$(( $(ls {tmp_path} | grep -c '^batch') + 101 ))
cp "$1" {tmp_path}/batch$n
echo "Submitted batch job $n"
""")
    (bin_dir / "sacct").write_text(f"""#!/bin/sh
echo "JobID|State|NodeList"
sed 's/$/|node1/' {tmp_path}/states 2>/dev/null
""")
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/cancelled\n')
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for tool in ("sbatch", "sacct", "scancel", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    submitit.SlurmJob.watcher.clear()  # shared by every SlurmJob of the process: no state from another test
    yield tmp_path
    submitit.SlurmJob.watcher.clear()


def test_slurm_jobs_wait_for_the_jobs_they_need_and_live_ones_are_not_submitted_again(fake_slurm):
    resources = resources_for({"report": Resources(partition="cpu")})
    stages = [Stage(name, needs, lambda: False, lambda: None)
              for name, needs in (("probe/a", []), ("probe/b", ["probe/a"]), ("probe/c", ["probe/a", "probe/b"]),
                                  ("report", ["probe/c"]))]
    folder = fake_slurm / "jobs"
    ids = submit_slurm(stages, print, folder, "smoke", resources)
    assert ids == {"probe/a": "101", "probe/b": "102", "probe/c": "103", "report": "104"}
    batch = {n: (fake_slurm / f"batch{n}").read_text() for n in (101, 102, 103, 104)}
    assert "--dependency" not in batch[101]
    assert "#SBATCH --dependency=afterok:101\n" in batch[102]
    assert "#SBATCH --dependency=afterok:101:102\n" in batch[103]
    assert "#SBATCH --kill-on-invalid-dep=yes" in batch[103] and "#SBATCH --gpus-per-node=1" in batch[103]
    assert "#SBATCH --job-name=smoke:probe/c" in batch[103]
    # The report asks for no GPU and its own partition: nothing of the probes' request stays behind.
    assert "--gpus" not in batch[104] and "#SBATCH --partition=cpu" in batch[104]
    assert "--partition" not in batch[103]

    # 101 runs; sacct does not list 102 yet (just submitted, so it may still run); 103 completed without making
    # its output and 104 failed: a rerun submits c and the report again, c waiting on the live 101 and 102.
    (fake_slurm / "states").write_text("101|RUNNING\n103|COMPLETED\n104|FAILED\n")
    again = submit_slurm(stages, print, folder, "smoke", resources)
    assert again == {"probe/a": "101", "probe/b": "102", "probe/c": "105", "report": "106"}
    assert "#SBATCH --dependency=afterok:101:102\n" in (fake_slurm / "batch105").read_text()
    (fake_slurm / "states").write_text("101|RUNNING\n102|PENDING\n105|COMPLETED\n106|CANCELLED by 0\n")
    states = {name: state for name, state, _ in status(stages, folder)}
    assert states == {"probe/a": "running", "probe/b": "queued", "probe/c": "finished", "report": "failed"}

    # 102 was submitted long ago and sacct still has no record of it: gone, so b is submitted again; c and the
    # report, queued behind the old b, are cancelled and submitted behind the new one.
    submitit.SlurmJob.watcher.clear()
    registry = Registry(folder)
    registry.jobs["probe/b"]["submitted"] = 0
    registry.save()
    (fake_slurm / "states").write_text("101|RUNNING\n105|PENDING\n106|PENDING\n")
    third = submit_slurm(stages, print, folder, "smoke", resources)
    assert third == {"probe/a": "101", "probe/b": "107", "probe/c": "108", "report": "109"}
    assert "#SBATCH --dependency=afterok:101:107\n" in (fake_slurm / "batch108").read_text()
    assert (fake_slurm / "cancelled").read_text().split() == ["105", "106"]


def test_status_names_a_failed_local_job_with_the_last_line_of_its_log(tmp_path):
    log = tmp_path / "jobs" / "999_0_log.err"
    log.parent.mkdir()
    log.write_text("Traceback (most recent call last):\n  ...\nTrajrepError: data root /x not found\n\n")
    registry = Registry(tmp_path / "jobs")
    registry.jobs = {"b": {"launcher": "local", "job_id": str(2 ** 22 + 17), "stdout": "", "stderr": str(log)},
                     "c": {"launcher": "local", "job_id": None},
                     "d": {"launcher": "local", "job_id": str(2 ** 22 + 18), "stdout": "", "stderr": str(log),
                           "outcome": "succeeded"}}
    registry.save()
    rows = {name: (state, detail) for name, state, detail in status(chain(done={"a"}), tmp_path / "jobs")}
    assert rows["a"] == ("done", "")
    assert rows["b"][0] == "failed" and rows["b"][1].endswith("TrajrepError: data root /x not found")
    assert rows["c"] == ("to run", "")  # queued by a launcher that is gone
    assert rows["d"][0] == "finished"  # its job succeeded, though its output is not complete


def test_local_stages_that_ask_for_a_gpu_wait_for_one_of_their_own(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("trajrep.launch.torch.cuda.device_count", lambda: 1)
    stages = [Stage(name, [], lambda: False, lambda: None) for name in ("probe/a", "probe/b", "report")]
    assert run_local(stages, print, tmp_path / "jobs", 3, resources_for({})) == []
    lines = capsys.readouterr().out.splitlines()
    order = [next(i for i, line in enumerate(lines) if text in line)
             for text in ("started probe/a", "started report", "probe/a done", "started probe/b")]
    assert order == sorted(order)  # the report (no GPU) starts beside a; b only once a gave its GPU back
    assert all(entry["outcome"] == "succeeded" for entry in Registry(tmp_path / "jobs").jobs.values())


def test_a_stage_still_running_from_a_killed_launcher_is_not_started_twice(tmp_path):
    registry = Registry(tmp_path / "jobs")
    registry.jobs = {"b": {"launcher": "local", "job_id": str(os.getpid()), "stdout": "", "stderr": ""}}
    registry.save()
    with pytest.raises(TrajrepError, match=rf"still run as jobs of an earlier launcher: b \(pid {os.getpid()}\)"):
        run_local(chain(done={"a"}), print, tmp_path / "jobs", 2, resources_for({}))


def test_dry_run_prints_the_graph_with_the_preset_resources_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "smoke.yaml"
    preset.write_text(SMOKE.read_text() + "resources:\n  pretrain: {partition: big, mem_gb: 64}\n")
    main([str(preset), "--dry-run", "--launcher", "slurm"])
    lines = capsys.readouterr().out.splitlines()
    pretrain = next(line for line in lines if line.startswith("pretrain/shapes-reg-drl-seed0"))
    assert "needs: -" in pretrain and "64 GB" in pretrain and "partition big" in pretrain
    cache = next(line for line in lines if line.startswith("cache/shapes-reg-drl-seed0"))
    assert "needs: pretrain/shapes-reg-drl-seed0" in cache
    assert lines[-1].startswith("0 of ") and "nothing started" in lines[-1]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_console_script_runs_reproduce_as_a_subcommand(tmp_path):
    done = subprocess.run([sys.executable, "-m", "trajrep", "reproduce", str(SMOKE), "--status"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrain/shapes-reg-drl-seed0" in done.stdout and done.stdout.splitlines()[-1].endswith("to run")



@pytest.mark.slow
def test_an_installed_wheel_runs_a_shipped_preset_by_name(tmp_path):
    source = tmp_path / "source"  # the wheel is built from a copy: setuptools writes build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "trajrep", source / "trajrep", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("trajrep-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "installed"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    empty = tmp_path / "elsewhere"  # no checkout, no configs/ here: the preset and its configs come from the wheel
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "trajrep", "reproduce", "smoke", "--status"], cwd=empty,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrain/shapes-reg-drl-seed0" in done.stdout and done.stdout.splitlines()[-1].endswith("to run")
    assert str(tmp_path / "installed") in subprocess.run(
        [sys.executable, "-c", "import trajrep; print(trajrep.__file__)"], cwd=empty, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}).stdout  # the wheel's code, not the checkout's
