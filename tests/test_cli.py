"""The `trajrep` command end to end: configs parse, the quickstart trains and resumes, bad input fails clearly."""

import dataclasses
import logging
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, LightningDataModule, LightningModule

from conftest import QUICKSTART, REPO, fake_cifar, tiny_fit_args
import trajrep.lightning_cli
import trajrep.nn.probes
from trajrep.cli import main
from trajrep.errors import TrajrepError
from trajrep.nn.probes import HeadOptions
from trajrep.pretrain.module import PretrainModule
from trajrep.probe.module import ProbeModule
from trajrep.threads import available_cpus

# Every runnable config; configs/**/data/ holds datamodule fragments that the probe configs include,
# configs/presets/ the pipeline presets of trajrep.reproduce (tested in test_reproduce.py) and configs/regime/ the
# sweeps of trajrep.regime (tested in test_regime.py).
CONFIGS = sorted(p for p in pathlib.Path(__file__).parents[1].glob("configs/**/*.yaml")
                 if not {"data", "presets", "regime"} & set(p.parts))


@pytest.fixture(autouse=True)
def run_in_scratch_folder(scratch_cwd):
    """Configs named as in the README; default outputs under tmp_path, not in the checkout."""


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    extra = ["--config", QUICKSTART] if "logger" in config.parts else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *extra, "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def named_in_configs(base: type) -> list[type]:
    """The subclasses of `base` that configs can name by class name alone (those the CLI imports)."""
    found, todo = [], [base]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith("trajrep.") and vars(trajrep.lightning_cli).get(cls.__name__) is cls:
                found.append(cls)
    return found


CONFIGURABLE = [cls for base in (LightningModule, LightningDataModule, Callback) for cls in named_in_configs(base)]
CONFIGURABLE += [cls for cls in vars(trajrep.nn.probes).values()  # the heads' options, inherited ones too
                 if isinstance(cls, type) and issubclass(cls, HeadOptions) and dataclasses.is_dataclass(cls)
                 and dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", CONFIGURABLE, ids=[cls.__name__ for cls in CONFIGURABLE])
def test_every_option_of_a_configurable_class_has_a_help_text(cls):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x")
    options = [action.dest for action in parser._actions if action.dest.startswith("x.")]
    assert options and [dest for dest in options if not parser._option_string_actions[f"--{dest}"].help] == []


def test_probe_head_help_names_the_heads_options_and_options_of_no_kind_are_refused_with_those_of_the_kinds(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "ProbeModule"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--model.head HEAD the head's options (trajrep.nn.probes), which say its kind" in help_text

    @dataclasses.dataclass(frozen=True)
    class LSTMOptions(HeadOptions):
        hidden_dim: int = 8

    with pytest.raises(TrajrepError, match="no probe kind takes head options LSTMOptions; .*: MLPOptions, "
                                           "LinearOptions, ConcatOptions"):
        ProbeModule(LSTMOptions())


def test_print_config_shows_every_option_of_the_head_and_the_head_chosen_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "probe" / "mlp.yaml"), "--model.head=GRUOptions",
              "--model.head.hidden_dim=8", "--print_config"])
    head = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["head"]
    assert head == {"class_path": "trajrep.nn.probes.GRUOptions", "init_args": {"hidden_dim": 8, "dropout": 0.25}}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_paper_config_trains_on_a_cpu_without_compiling(variant, tmp_path, monkeypatch, caplog):
    per_file = {"cifar10": 20, "cifar100": 100}[variant]  # 100 training images in 5 files or in 1
    fake_cifar(pathlib.Path("data") / variant, monkeypatch, variant, per_batch=per_file)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(self))
    # In fp32: a CPU without bf16 instructions emulates the config's bf16-mixed at about 0.12x fp32, and the online
    # probe's pass over the images at the end then took 200 s; bf16 on a CPU is tested in test_fast_paths.
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", f"configs/{variant}.yaml", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false", "--trainer.precision=32-true"])
    checkpoint = torch.load(pathlib.Path("runs") / variant / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and compiled == []
    if available_cpus() < 4:  # the config asks for 4 loader workers
        assert f"num_workers 4 capped at the {available_cpus()} CPUs available" in caplog.text


@pytest.mark.parametrize("device, compiles", [("cpu", False), ("cuda", True)])
def test_compile_auto_is_on_only_on_cuda(device, compiles):
    module = PretrainModule(compile="auto", encoder_depth=10, widen_factor=0.125, nf=8, ch_mult=(1, 2))
    assert module.compiles is False  # without a Trainer the module is on the CPU
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    assert module.compiles is compiles
    assert PretrainModule(compile=True).compiles is True and PretrainModule(compile=False).compiles is False


def test_quickstart_trains_writes_checkpoint_and_resumes(tmp_path):
    main(tiny_fit_args(tmp_path, max_steps=3))
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3
    # Only the model's own arguments are recorded (links meant for probes must not leak into a pretraining model).
    assert "num_classes" not in checkpoint["hyper_parameters"]
    assert checkpoint["hyper_parameters"]["image_channels"] == 3
    # EMAWeightAveraging keeps both: EMA weights in state_dict, raw weights beside them.
    assert set(checkpoint["current_model_state"]) == set(checkpoint["state_dict"])
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())

    main(tiny_fit_args(tmp_path, max_steps=5) + ["--ckpt_path", str(last)])
    assert torch.load(last, weights_only=True)["global_step"] == 5


def test_mode_switch_on_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--model.mode", "probabilistic-drl", "--print_config"])
    assert "mode: probabilistic-drl" in capsys.readouterr().out


def expect_cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_unknown_dataset_is_a_clear_error(capsys):
    err = expect_cli_error(["fit", "--config", QUICKSTART, "--data", "ImageNet22k"], capsys)
    assert "ImageNet22k" in err


def test_unknown_mode_is_a_clear_error(capsys):
    err = expect_cli_error(["fit", "--config", QUICKSTART, "--model.mode", "vae-drl"], capsys)
    assert "vae-drl" in err and "reg-drl" in err


def test_missing_data_root_is_one_line_without_traceback(tmp_path, capsys):
    err = expect_cli_error(["fit", "--config", "configs/cifar10.yaml", f"--data.root={tmp_path / 'nowhere'}",
                            "--trainer.max_steps=1"], capsys)
    assert "Traceback" not in err
    assert "download: true" in err and "nowhere" in err


def test_negative_widen_factor_is_a_clear_error(capsys):
    err = expect_cli_error(["fit", "--config", QUICKSTART, "--model.widen_factor=-1", "--trainer.max_steps=1"], capsys)
    assert "widen_factor must be >= 0" in err and "Traceback" not in err


def test_python_dash_m_trajrep_runs():
    result = subprocess.run([sys.executable, "-m", "trajrep", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fit" in result.stdout


@pytest.mark.parametrize("tool", ["reproduce", "report", "analyse"])
def test_the_preset_report_and_analysis_tools_are_subcommands_with_their_own_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([tool, "--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: trajrep {tool} ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"trajrep {tool} " in " ".join(capsys.readouterr().out.split())  # named in the top-level help


def test_a_strategy_given_as_a_class_is_built_for_the_extraction_trainer():
    from jsonargparse import Namespace
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from trajrep.lightning_cli import built

    given = Namespace(class_path="lightning.pytorch.strategies.SingleDeviceStrategy", init_args={"device": "cpu"})
    strategy = built(given)
    assert isinstance(strategy, SingleDeviceStrategy) and strategy.root_device == torch.device("cpu")
    assert built("ddp_spawn") == "ddp_spawn" and built(2) == 2
