"""Multi-process training through Lightning's DDP on CPU: the real launcher via the script, pretraining and a chunked
probe grid (in-process ddp_spawn pretraining: tests/test_online_probe.py)."""

import json
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
def test_console_script_with_ddp_launcher(tmp_path):
    script = pathlib.Path(sys.executable).parent / "trajrep"
    args = tiny_fit_args(tmp_path, max_steps=2) + DDP_CPU + ["--trainer.strategy=ddp"]
    result = subprocess.run([str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_chunked_probe_grid_under_ddp_ends_as_in_one_process(tiny_checkpoint, tmp_path, monkeypatch):
    """Chunks of 2 GRU members on 2 CPU processes take one backward per step, as DDP's reducer expects, and end
    with the weights and records of one process (every rank trains on the same batches)."""
    def run(name: str, *trainer: str, in_process: bool = False) -> tuple[dict, list[dict]]:
        args = ["fit", "--config", str(REPO / "configs" / "probe" / "gru.yaml"), f"--data.checkpoint={tiny_checkpoint}",
                f"--data.cache_dir={tmp_path / 'cache'}", "--data.images.init_args.num_train=320",
                "--data.images.init_args.num_test=160", "--data.granularities=[2]", "--data.seeds=[0,1]",
                "--data.batch_size=64", "--model.learning_rates=[0.01,0.001,0.0001]", "--model.member_chunk=2",
                "--model.head.hidden_dim=16", "--model.head.dropout=0.0", f"--model.results_dir={tmp_path / name}",
                "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true",
                f"--trainer.default_root_dir={tmp_path / name}", "--trainer.accelerator=cpu", *trainer]
        if in_process:  # it starts sooner; the DDP launcher needs a script to start again on each rank
            monkeypatch.chdir(tmp_path)
            main(args)
        else:
            result = subprocess.run([sys.executable, "-m", "trajrep", *args], cwd=tmp_path, capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
        (checkpoint,) = (tmp_path / name / "checkpoints").glob("*.ckpt")
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        (path,) = (tmp_path / name).glob("gru-*.json")
        return {k: v for k, v in state.items() if k.startswith("heads.")}, json.loads(path.read_text())["records"]

    one_weights, one_records = run("one", "--trainer.devices=1", in_process=True)
    two_weights, two_records = run("two", "--trainer.devices=2", "--trainer.strategy=ddp")
    assert len(one_weights) > 3 * 4  # three chunks of a GRU cell and a classifier each
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, rtol=1e-6, atol=1e-7, msg=name)
    fields = ("task", "lr", "seed", "best_epoch", "val_acc", "test_acc")
    assert [{k: r[k] for k in fields} for r in two_records] == [{k: r[k] for k in fields} for r in one_records]
