"""The bad-input matrix: every mistake below ends the `trajrep` command with a non-zero exit and ONE line on stderr
that says what is wrong (and how to fix it), with no traceback."""

import json
import pathlib
import re
import tempfile
import warnings

import pytest
import torch
import yaml
from PIL import Image

from conftest import QUICKSTART, REPO, tiny_fit_args
from trajrep.cli import main
from trajrep.lightning_cli import build_cli
from trajrep.data import ImageFolder
from trajrep.data.cache import FORMAT_VERSION
from trajrep.data.representations import ProbeData
from trajrep.errors import TrajrepError
from trajrep.analysis.report import main as report_main
from trajrep.reproduce import load_preset
from trajrep.threads import available_cpus


@pytest.fixture(autouse=True)
def run_in_scratch_folder(scratch_cwd):
    """Configs named as in the README; default outputs under tmp_path, not in the checkout."""


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


def test_relative_checkpoint_of_a_config_is_read_from_the_working_directory(capsys):
    # configs/probe/data/quickstart.yaml names runs/quickstart/checkpoints/last.ckpt, absent in this scratch folder
    error = one_line_error(["fit", "--config", "configs/probe/mlp.yaml"], capsys)
    assert f"runs/quickstart/checkpoints/last.ckpt does not exist (a relative path, in a config file too, is read " \
           f"from the working directory {pathlib.Path.cwd()})" in error


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
    ("--data.granularities=[0]", "granularity must be a positive integer, got 0"),
    ('--data.times=["a","b"]', "data.times: Expected a <class 'float'>"),
    ("--data.val_fraction=0.999", "leaves 0 to train on"),
], ids=["t-outside-unit-interval", "unsorted-grid", "empty-grid", "granularity-0", "times-as-strings",
        "no-training-images-left"])
def test_bad_time_grid(grid, expected, tiny_checkpoint, tmp_path, capsys):
    assert expected in one_line_error(probe(tiny_checkpoint, tmp_path, grid), capsys)


@pytest.mark.parametrize("option, instead", [
    ("--model.seeds=[7]", "--data.init_args.seeds"),
    ("--model.times=[0.25]", "--data.init_args.probe_times"),
    ("--model.feature_dim=3", "the cache"),
], ids=["seeds", "times", "feature-dim"])
def test_probe_options_set_from_the_data_are_refused_when_given(option, instead, tiny_checkpoint, tmp_path, capsys):
    error = one_line_error(probe(tiny_checkpoint, tmp_path, "--data.granularities=[2]", option), capsys)
    assert option.split("=")[0].replace("--model.", "--model.init_args.") in error and instead in error


def test_image_size_set_on_the_model_is_refused(capsys):
    error = one_line_error(fit("--model.init_args.image_size=64"), capsys)
    assert "image_size=64 is set from the data (32 here)" in error


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


# --- what users hit next (#20): more configurations, data trees and presets ------------------------------------

def image_tree(root: pathlib.Path, per_class: int = 4) -> pathlib.Path:
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(root / split / name / f"{i}.png")
    return root


def folder_fit(root: pathlib.Path, *extra: str) -> list[str]:
    return fit("--data=ImageFolder", f"--data.root={root}", "--data.batch_size=4", "--data.num_workers=0",
               f"--trainer.default_root_dir={root / 'run'}", "--trainer.limit_val_batches=0", *extra)


@pytest.mark.parametrize("args, expected", [
    (fit("--data.init_args.batch_size=0"), "batch_size must be >= 1, got 0"),
    (["fit", "--config", "configs"], "Path is not a file"),
    (fit(f"--trainer.devices={available_cpus() + 1}", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"),
     "needs a CPU per process"),
], ids=["batch-size-0", "config-is-a-folder", "more-cpu-processes-than-cpus"])
def test_more_bad_configurations_are_one_line(args, expected, capsys):
    assert expected in one_line_error(args, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_on_a_machine_without_one_is_one_line(capsys):
    assert "No supported gpu backend" in one_line_error(fit("--trainer.accelerator=gpu"), capsys)


def test_fp16_mixed_precision_on_cpu_runs_as_bf16(tmp_path):
    cli = build_cli(tiny_fit_args(tmp_path, 1, "--trainer.precision=16-mixed", "--trainer.accelerator=cpu")[1:],
                    run=False)
    assert cli.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_is_a_warning(tmp_path, monkeypatch, native):
    monkeypatch.setattr("trajrep.checks.cpu_has_bf16", lambda: native)
    args = tiny_fit_args(tmp_path, 1, "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu")[1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli(args, run=False)
    emulated = [w for w in caught if "without bf16 instructions" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
    assert native or "--trainer.precision=32-true" in str(emulated[0].message)


def test_image_size_the_score_net_cannot_halve_is_one_line(tmp_path, capsys):
    error = one_line_error(folder_fit(image_tree(tmp_path), "--data.image_size=30"), capsys)
    assert "image size must be a multiple of 4; got 30" in error


def test_zero_byte_image_file_is_named(tmp_path, capsys):
    root = image_tree(tmp_path)
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    assert "cat/empty.png" in one_line_error(folder_fit(root, "--trainer.max_steps=2"), capsys)


def test_image_folder_ignores_other_files_converts_grey_and_keeps_empty_classes():
    # Not errors: a README beside the images is skipped, a grey image is converted to RGB like the others, and an
    # empty class folder keeps the numbering of the classes after it.
    with tempfile.TemporaryDirectory() as folder:
        root = image_tree(pathlib.Path(folder))
        (root / "train" / "cat" / "README.txt").write_text("notes")
        Image.new("L", (20, 20), 128).save(root / "train" / "dog" / "grey.png")
        for split in ("train", "test"):
            (root / split / "ant").mkdir()
        data = ImageFolder(root=str(root), num_workers=0)
        images, labels = map(torch.stack, zip(*(data.dataset("train")[i] for i in range(len(data.dataset("train"))))))
        assert data.num_classes == [3] and len(labels) == 9  # ant, cat, dog; 4 + 5 images, no README
        assert labels.tolist() == [1] * 4 + [2] * 5 and images.shape[1] == 3


def test_misspelled_head_option_is_one_line_with_the_options(tiny_checkpoint, tmp_path, capsys):
    args = probe(tiny_checkpoint, tmp_path, "--config", str(REPO / "configs" / "probe" / "transformer.yaml"),
                 f"--data.checkpoint={tiny_checkpoint}", "--model.head.d_modle=8")
    error = one_line_error(args, capsys)
    assert "model.head: Option 'd_modle' is not accepted" in error
    assert "the options of TransformerOptions: d_model, num_heads, ffn_dim, num_applications, dropout" in error


def test_probing_a_checkpoint_on_images_of_another_shape_is_one_line(tiny_checkpoint, tmp_path, capsys):
    error = one_line_error(probe(tiny_checkpoint, tmp_path, "--data.images=FashionMNIST",
                                 "--data.images.init_args.num_train=64", "--data.images.init_args.num_test=48"), capsys)
    assert "pretrained on 3-channel 32 px images but FashionMNIST serves 1-channel" in error


def smoke_preset_with(tmp_path: pathlib.Path, change) -> pathlib.Path:
    preset = yaml.safe_load((REPO / "configs" / "presets" / "smoke.yaml").read_text())
    change(preset)
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.mark.parametrize("change, expected", [
    (lambda p: p.update(probes=["mlp", "transfomer"]), "unknown probe kind(s) 'transfomer'"),
    (lambda p: p.update(probe_kind_args={"transfomer": ["--x"]}), "probe_kind_args has options for 'transfomer'"),
    (lambda p: p.update(pixel_probe_args={"gru": ["--x"]}), "pixel_probe_args has options for 'gru'"),
    (lambda p: p.update(datasets=p["datasets"] * 2), "dataset names must differ"),
    (lambda p: p.update(encoders=p["encoders"][:1] * 2), "encoder names must differ"),
    (lambda p: p["encoders"][0]["args"].append("--model.init_args.widht=3"), "Option 'widht' is not accepted"),
    (lambda p: p["datasets"][0].update(images="Shapes"), "'Shapes' is not a trajrep image datamodule"),
    (lambda p: p["datasets"][0].update(pretrain_config="configs/nope.yaml"), "configs/nope.yaml is not a file"),
], ids=["unknown-kind", "stray-kind-args", "stray-pixel-args", "repeated-dataset", "repeated-encoder",
        "encoder-option-typo", "unknown-images", "missing-pretrain-config"])
def test_a_bad_preset_fails_before_any_stage(change, expected, tmp_path):
    with pytest.raises(TrajrepError, match=re.escape(expected)):
        load_preset(smoke_preset_with(tmp_path, change))


def test_a_hand_edited_result_file_is_refused_by_the_report(tiny_checkpoint, tmp_path, capsys):
    main(probe(tiny_checkpoint, tmp_path))
    (record,) = (tmp_path / "results").rglob("*.json")
    record.write_text(record.read_text().replace('"test_acc_mean": 0.', '"test_acc_mean": 0.9', 1))
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path / "results"), "--out", str(tmp_path / "report")])
    assert exit_info.value.code == 2
    assert "was modified or truncated (checksum mismatch); delete it and rerun the probe" in capsys.readouterr().err
