"""Multi-process training through Lightning's DDP on CPU: in-process ddp_spawn and the real launcher via the script."""

import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import tiny_fit_args
from trajrep.cli import main

REPO = pathlib.Path(__file__).parents[1]
DDP_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=2"]


@pytest.mark.slow
def test_ddp_spawn_two_processes_in_process(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    main(tiny_fit_args(tmp_path, max_steps=2) + DDP_CPU + ["--trainer.strategy=ddp_spawn"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_console_script_with_ddp_launcher(tmp_path):
    script = pathlib.Path(sys.executable).parent / "trajrep"
    args = tiny_fit_args(tmp_path, max_steps=2) + DDP_CPU + ["--trainer.strategy=ddp"]
    result = subprocess.run([str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
