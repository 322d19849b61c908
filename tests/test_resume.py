"""Kill -9 (or Ctrl+C) and resume: a real subprocess is stopped mid-way and rerun; the outcome equals an
uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, kill_when, tiny_fit_args
from trajrep.cli import main
from trajrep.data.cache import RepresentationCache


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=True)
    return {**checkpoint["state_dict"], **{f"raw.{k}": v for k, v in checkpoint["current_model_state"].items()}}


def test_a_new_run_into_a_finished_runs_folder_is_refused_unless_it_resumes_or_overwrites(tmp_path, capsys):
    main(tiny_fit_args(tmp_path, 2))
    folder = tmp_path / "checkpoints"
    assert f"trajrep: checkpoint of step 2: {folder / 'last.ckpt'}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(tiny_fit_args(tmp_path, 3))
    error = capsys.readouterr().err
    assert "already holds the checkpoints of an earlier run" in error and "--ckpt_path" in error
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    main(tiny_fit_args(tmp_path, 3) + ["--ckpt_path", str(folder / "last.ckpt")])  # resumes: steps 3 of 3
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3
    main(tiny_fit_args(tmp_path, 1) + ["--overwrite=true"])  # a fresh run of 1 step replaces the old files
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_weights(tmp_path):
    steps = 20  # 2.5 epochs of 8 batches: the kill lands mid-epoch, the resumed run crosses epoch boundaries
    # Validation every 3 batches (the tiny args turn it off): evaluating must not shift the training RNG stream.
    # Every step's checkpoint is kept, so the file the kill waits for cannot vanish before it is seen.
    extra = ("--trainer.limit_val_batches=2", "--trainer.val_check_interval=3",
             "--trainer.callbacks.init_args.save_top_k=-1")
    main(tiny_fit_args(tmp_path / "straight", steps, *extra))
    straight = weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")

    killed = tmp_path / "killed"
    args = tiny_fit_args(killed, steps, *extra)
    kill_when([sys.executable, "-m", "trajrep", *args],
              lambda: any((killed / "checkpoints").glob("*step=3.ckpt")), cwd=REPO)
    last = killed / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < stopped_at < steps and stopped_at % 8 != 0, stopped_at  # killed mid-way, inside an epoch

    main(args + ["--ckpt_path", str(last)])
    resumed = weights(last)
    assert torch.load(last, weights_only=True)["global_step"] == steps
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def extract_args(checkpoint: Path, cache_dir: Path) -> list[str]:
    """`trajrep extract` of the tiny checkpoint on 64 + 48 shapes at 51 times: long enough to be killed."""
    return ["extract", "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.init_args.num_train=64",
            "--data.init_args.num_test=48", "--model.init_args.nf=8", "--model.init_args.widen_factor=0.125",
            "--ckpt_path", str(checkpoint), "--granularities=[50]", f"--cache_dir={cache_dir}", "--batch_size=4",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={cache_dir}"]


def extract_command(checkpoint: Path, cache_dir: Path) -> list[str]:
    """The same extraction as a process of its own, to be killed or run beside another."""
    return [sys.executable, "-m", "trajrep", *extract_args(checkpoint, cache_dir)]


def caches_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.exists() else []


def arrays_of(cache: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(cache)): np.load(p) for p in sorted(cache.rglob("*.npy"))}


@pytest.mark.slow
def test_killed_extraction_leaves_no_cache_and_the_rerun_equals_a_straight_one(tiny_checkpoint, tmp_path):
    straight = tmp_path / "straight"
    main(extract_args(tiny_checkpoint, straight))
    (expected,) = caches_in(straight)

    killed = tmp_path / "killed"
    partial = killed / f".{expected.name}.partial"
    kill_when(extract_command(tiny_checkpoint, killed), lambda: (partial / "manifest.json").exists()
              or any(partial.glob("test/*.npy")), cwd=REPO)
    assert not caches_in(killed)  # only the hidden partial folder, which no reader takes for a cache

    main(extract_args(tiny_checkpoint, killed))
    (rebuilt,) = caches_in(killed)
    assert rebuilt.name == expected.name
    RepresentationCache(rebuilt)  # checksums hold
    straight_arrays, rebuilt_arrays = arrays_of(expected), arrays_of(rebuilt)
    assert straight_arrays.keys() == rebuilt_arrays.keys()
    for name, values in straight_arrays.items():
        np.testing.assert_array_equal(rebuilt_arrays[name], values, err_msg=name)


@pytest.mark.slow
def test_interrupted_extraction_exits_with_an_error_and_leaves_no_cache(tiny_checkpoint, tmp_path):
    def writing() -> bool:
        return any(tmp_path.glob(".*.partial/test/*.npy")) or any(tmp_path.glob(".*.partial/manifest.json"))

    code = kill_when(extract_command(tiny_checkpoint, tmp_path), writing, cwd=REPO, sig=signal.SIGINT)
    assert code != 0 and not caches_in(tmp_path)
    main(extract_args(tiny_checkpoint, tmp_path))
    (cache,) = caches_in(tmp_path)
    RepresentationCache(cache)


@pytest.mark.slow
def test_two_extractions_of_different_grids_into_one_folder_at_once(tiny_checkpoint, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    commands = [[*extract_command(tiny_checkpoint, tmp_path), f"--granularities=[{g}]"] for g in (50, 40)]
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for command in commands]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    caches = [RepresentationCache(path) for path in caches_in(tmp_path)]
    assert sorted(len(cache.times) for cache in caches) == [41, 51]


@pytest.mark.slow
def test_two_processes_asking_for_one_cache_build_it_once(tiny_checkpoint, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    processes = [subprocess.Popen(extract_command(tiny_checkpoint, tmp_path), cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    logs = "\n".join(outputs)
    assert logs.count("Extracted ") == 1 and logs.count("Reusing representation cache") == 1, logs[-3000:]
    (cache,) = caches_in(tmp_path)
    RepresentationCache(cache)  # complete, checksums hold
