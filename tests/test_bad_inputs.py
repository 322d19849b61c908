"""The bad-input matrix: every mistake below ends the `trajrep` command with a non-zero exit and ONE line on stderr
that says what is wrong (and how to fix it), with no traceback."""

import json
import pathlib

import pytest
import torch
from PIL import Image

from conftest import QUICKSTART, REPO, tiny_fit_args
from trajrep.cli import main
from trajrep.data.cache import FORMAT_VERSION
from trajrep.data.representations import ProbeData
from trajrep.errors import TrajrepError


@pytest.fixture(autouse=True)
def run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def one_line_error(args: list[str], capsys) -> str:
    """Run the CLI on `args`; return its single stderr line after checking the exit code and the format."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trajrep: error: "), lines
    return lines[0]


def fit(*extra: str) -> list[str]:
    return ["fit", "--config", QUICKSTART, "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", *extra]


def probe(checkpoint: pathlib.Path, tmp_path: pathlib.Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "probe" / "mean.yaml"), f"--data.checkpoint={checkpoint}",
            f"--data.cache_dir={tmp_path / 'cache'}", "--data.images.init_args.num_train=64",
            "--data.images.init_args.num_test=48", "--data.seeds=[0]", "--model.learning_rates=[0.001]",
            f"--model.results_dir={tmp_path / 'results'}", "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}", *extra]


# --- parsing and configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (fit("--data=ImageNet22k"), "unknown class 'ImageNet22k'"),
    (fit("--trainer.max_stepz=3"), "unrecognized arguments: --trainer.max_stepz=3"),
    (fit("--model.init_args.lr=fast"), "lr"),
    (fit("--model.init_args.lr=-1"), "learning rate must be positive"),
    (fit("--model.init_args.mode=vae-drl"), "vae-drl"),
    (fit("--model.init_args.widen_factor=-1"), "widen_factor must be >= 0"),
    (["fitt"], "invalid choice: 'fitt'"),
    (["fit", "--config", "configs/no-such-config.yaml"], "no-such-config.yaml"),
    (fit("--trainer.precision=bf16-mixed", "--model.init_args.adam_impl=fused"),
     "adam_impl 'fused' cannot be combined with gradient clipping"),
], ids=["unknown-class", "misspelled-option", "wrong-type", "negative-lr", "unknown-mode", "negative-width",
        "unknown-subcommand", "missing-config", "fused-adam-with-clipping"])
def test_bad_configuration_is_one_line(args, expected, capsys):
    assert expected in one_line_error(args, capsys)


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [max_steps: 3\n")
    assert "Problems parsing config" in one_line_error(["fit", "--config", str(bad)], capsys)


# --- data --------------------------------------------------------------------------------------------------------

def test_missing_data_root(tmp_path, capsys):
    error = one_line_error(fit("--data=CIFAR10", f"--data.root={tmp_path / 'nowhere'}"), capsys)
    assert "nowhere" in error and "download: true" in error


def test_wrong_file_layout(tmp_path, capsys):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    error = one_line_error(fit("--data=FashionMNIST", f"--data.root={tmp_path}"), capsys)
    assert "lacks" in error and "t10k-images-idx3-ubyte.gz" in error


def test_corrupted_image_file_is_named(tmp_path, capsys):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(tmp_path / split / name / f"{i}.png")
    broken = tmp_path / "train" / "dog" / "2.png"
    broken.write_bytes(broken.read_bytes()[:20])
    error = one_line_error(fit("--data=ImageFolder", f"--data.root={tmp_path}", "--data.batch_size=4",
                               f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.limit_val_batches=0",
                               "--trainer.max_steps=2"),  # one epoch: every image is read
                           capsys)
    assert "dog/2.png" in error


def test_batch_larger_than_dataset_with_drop_last(tmp_path, capsys):
    error = one_line_error(tiny_fit_args(tmp_path, 1, "--data.init_args.num_train=4"), capsys)
    assert "drop_last" in error


# --- checkpoints -----------------------------------------------------------------------------------------------

def test_missing_checkpoint(tmp_path, capsys):
    assert "does not exist" in one_line_error(fit("--ckpt_path", str(tmp_path / "gone.ckpt")), capsys)


def test_truncated_checkpoint(tiny_checkpoint, tmp_path, capsys):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:4096])
    assert "truncated, corrupted" in one_line_error(fit("--ckpt_path", str(truncated)), capsys)


def test_checkpoint_of_another_model_given_to_fit(tmp_path, capsys):
    other = tmp_path / "probe.ckpt"
    torch.save({"state_dict": {"heads.0.weight": torch.zeros(2, 2)},
                "hyper_parameters": {"kind": "mlp", "learning_rates": [0.001]}}, other)
    assert "kind" in one_line_error(fit("--ckpt_path", str(other)), capsys)


def test_checkpoint_of_another_architecture_given_to_a_probe(tiny_checkpoint, tmp_path, capsys):
    saved = torch.load(tiny_checkpoint, weights_only=True)
    saved["hyper_parameters"]["widen_factor"] = 0.5  # weights of a 0.125-wide encoder, described as 0.5-wide
    other = tmp_path / "other.ckpt"
    torch.save(saved, other)
    error = one_line_error(probe(other, tmp_path, "--data.granularities=[2]"), capsys)
    assert "does not match the model" in error


# --- time grids and probes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, expected", [
    ("--data.times=[0.5,1.5]", "outside [0, 1]"),
    ("--data.times=[0.5,0.2]", "strictly increasing"),
    ("--data.granularities=null", "time grid is empty"),
], ids=["t-outside-unit-interval", "unsorted-grid", "empty-grid"])
def test_bad_time_grid(grid, expected, tiny_checkpoint, tmp_path, capsys):
    assert expected in one_line_error(probe(tiny_checkpoint, tmp_path, grid), capsys)


def test_negative_probe_learning_rate(tiny_checkpoint, tmp_path, capsys):
    error = one_line_error(probe(tiny_checkpoint, tmp_path, "--data.granularities=[2]",
                                 "--model.learning_rates=[-0.001]"), capsys)
    assert "learning rates must be positive" in error


def test_cache_of_another_format_version(tiny_checkpoint, tmp_path, capsys):
    main(probe(tiny_checkpoint, tmp_path, "--data.granularities=[2]"))  # builds the cache
    (manifest_path,) = (tmp_path / "cache").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert "format version" in one_line_error(probe(tiny_checkpoint, tmp_path, "--data.granularities=[2]"), capsys)


def test_labels_that_do_not_fit_the_probe_are_refused():
    x = torch.zeros(8, 2, 4)
    data = ProbeData.from_tensors({stage: (x, torch.zeros(8, 2, dtype=torch.long)) for stage in ("train", "val", "test")},
                                  times=[0.0, 1.0], num_classes=[10], seeds=[0])
    with pytest.raises(TrajrepError, match="2 task"):
        data.train_dataloader()
    data = ProbeData.from_tensors({stage: (x, torch.full((8,), 12)) for stage in ("train", "val", "test")},
                                  times=[0.0, 1.0], num_classes=[10], seeds=[0])
    with pytest.raises(TrajrepError, match="outside 0..classes-1"):
        data.train_dataloader()


# --- the environment -------------------------------------------------------------------------------------------

def test_output_folder_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = one_line_error(fit(f"--trainer.default_root_dir={blocker / 'run'}"), capsys)
    assert "not a writable folder" in error and "default_root_dir" in error


def test_probe_results_folder_not_writable(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = one_line_error(probe(tiny_checkpoint, tmp_path, "--data.granularities=[2]",
                                 f"--model.results_dir={blocker / 'results'}"), capsys)
    assert "results_dir" in error and "not a writable folder" in error


def test_wandb_without_login_or_offline_mode(tmp_path, monkeypatch, capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    error = one_line_error(fit("--trainer.logger=WandbLogger", f"--trainer.default_root_dir={tmp_path}"), capsys)
    assert "wandb login" in error and "WANDB_MODE=offline" in error
