"""The LightningCLI that `trajrep fit / validate / test / predict / extract` runs: every trajrep module and datamodule,
referred to by short class names, with sizes linked from the data to the model."""

import importlib
import inspect
import os
import re
import sys
from operator import itemgetter
from pathlib import Path
from typing import Literal, NoReturn, Optional

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Imported so that configs can name the classes by short name (class_path: SyntheticShapes).
from trajrep.pretrain.ema import EMA  # noqa: F401
from trajrep.pretrain.online_probe import OnlineProbe  # noqa: F401
from trajrep.data import (CIFAR10, CIFAR100, CelebA, Coloured, FashionMNIST, ImageDataModule,  # noqa: F401
                          ImageFolder, SyntheticShapes)
from trajrep.data.representations import PixelProbeData, RepresentationDataModule  # noqa: F401
from trajrep.checkpoint import existing_checkpoint, read_checkpoint
from trajrep.checks import ensure_trainer_fits_machine, ensure_wandb_ready, ensure_writable
from trajrep.denoiser import TrajrepBackbone, extract_denoiser_features, list_layers as layers_of, load_backbone
from trajrep.disk import AtomicCheckpointIO
from trajrep.errors import DEBUG_ENV, TrajrepError, errors_as_one_line
from trajrep.extract import build_cache, extract_representations, load_pretrained_weights
from trajrep.pretrain.module import PretrainModule
from trajrep.progress import with_progress
from trajrep.quiet import silence_known_noise
from trajrep.threads import use_threads
from trajrep.probe.knn import KNNProbe  # noqa: F401
from trajrep.probe.module import ProbeModule  # noqa: F401
from trajrep.timegrid import build_time_grid

PROBE_SPEC = ("num_classes", "task_names", "feature_dim", "times", "seeds")
# Model options the CLI sets from the data, and what a user sets instead.
LINKED_FROM_DATA = {
    "image_channels": "the images (nothing to set)", "image_size": "the images (nothing to set)",
    "num_classes": "the data's labels (nothing to set)", "task_names": "the data's tasks (nothing to set)",
    "feature_dim": "the cache (nothing to set)", "times": "--data.init_args.probe_times (or the data's time grid)",
    "seeds": "--data.init_args.seeds",
}


def channels_of(image_shape: tuple[int, int, int]) -> int:
    return image_shape[0]


def size_of(image_shape: tuple[int, int, int]) -> int:
    return image_shape[-1]


def plain(value):
    """Sequences as lists, so that a parsed option and a stored hyperparameter compare equal."""
    return list(value) if isinstance(value, (list, tuple)) else value


# The Trainer settings that decide how a missing cache is extracted: those of the command that needs it. Not its
# precision: a cache holds full-precision features, the content its key stands for (trajrep.extract.write_cache).
EXTRACTION_SETTINGS = ("accelerator", "strategy", "devices", "num_nodes", "enable_progress_bar")


def built(value):
    """A class given in a config (class_path and init_args) built, any other value as it is."""
    if isinstance(value, Namespace) and "class_path" in value:
        module, name = value.class_path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**dict(value.get("init_args") or {}))
    return value


# Lines of a jsonargparse error that frame the problem rather than state it.
FRAMING = ("Parser key", "Key ", "Does not validate", "Subtypes", "Errors:", "Given value", "Problem with given class_path",
           "Expected a <class 'NoneType'>", "Expected a path but")


def summarise_parser_error(message: str) -> str:
    """One line from jsonargparse's multi-line error: the option at fault and what is wrong with it."""
    keys = re.findall(r'(?:Parser key|Key) "([^"]+)"', message)
    where = ".".join(dict.fromkeys(keys))
    unknown_class = re.search(r"Expected a dot import path string: (\S+)", message)
    if unknown_class:
        detail = (f"unknown class {unknown_class.group(1)!r}; name a trajrep class (e.g. FashionMNIST, "
                  "PretrainModule) or give a full import path")
    else:
        lines = [re.sub(r'^(Parser key|Key) "[^"]+":\s*', "", line.strip(" -")) for line in message.splitlines()]
        detail = next((line for line in lines if line and not line.startswith(FRAMING)), message.strip())
    chosen = re.findall(r"Problem with given class_path '([^']+)'", message)
    if chosen and "is not accepted" in detail:  # a misspelled option of a class (a head's options): list them
        detail += options_of(chosen[-1])  # the innermost class
    return f"{where}: {detail}" if where else detail


def options_of(class_path: str) -> str:
    """"; the options of <class>: ..." for an error message, or nothing if the class cannot be read (the error
    it explains must still come out)."""
    module, _, name = class_path.rpartition(".")
    try:
        options = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""
    return f"; the options of {name}: {', '.join(options) or 'none'}"


class OneLineErrorParser(LightningArgumentParser):
    """Parse errors end as one TrajrepError line instead of the usage text and a nested report
    (TRAJREP_DEBUG=1 keeps jsonargparse's full message)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get(DEBUG_ENV):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self  # jsonargparse names the subcommand at fault
        command = parser.prog.replace(" [options]", "").replace("__main__.py", "python -m trajrep")
        raise TrajrepError(f"{summarise_parser_error(message)} (see `{command} --help`)") from None


class TrajrepTrainer(Trainer):
    """Lightning's Trainer plus `extract`, so the representation cache is one more CLI subcommand."""

    def extract(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        times: list[float] | None = None,
        granularities: list[int] | None = None,
        ema: bool = False,
        dtype: Literal["float16", "float32"] = "float32",
        cache_dir: str = "cache",
        batch_size: int = 64,
        recompute: bool = False,
        source: Literal["encoder", "denoiser"] = "encoder",
        blocks: list[str] | None = None,
        draws: int = 1,
        noise_seed: int = 0,
        backbone: str | None = None,
        list_layers: bool = False,
    ) -> Path | None:
        """Compute E(x0, t) on a time grid for the train and test images once and keep it on disk; with
        `source: denoiser`, the pooled outputs of the score network's `blocks` at x_t instead (of `backbone`, a
        trajrep checkpoint or a diffusers model folder, when given; `draws` noise draws per image and t).
        `list_layers` prints the blocks of the backbone with their output shapes and extracts nothing."""
        if not isinstance(model, PretrainModule) or not isinstance(datamodule, ImageDataModule):
            raise TrajrepError("extract needs a pretraining config: a PretrainModule model and an image datamodule "
                               "(e.g. --config configs/quickstart.yaml)")
        if backbone is None and ckpt_path is not None:
            load_pretrained_weights(model, ckpt_path, ema)
        if list_layers or source == "denoiser":
            network = load_backbone(backbone, ema, datamodule) if backbone else TrajrepBackbone(model, datamodule)
            if list_layers:
                for name, shape in layers_of(network):
                    print(f"{name:<24} {' x '.join(map(str, shape))}")
                return None
        if ckpt_path is None and backbone is None:
            raise TrajrepError("extract needs --ckpt_path, the checkpoint written by `trajrep fit` (or, with "
                               "--source denoiser, --backbone: a checkpoint or a diffusers model folder)")
        grid = build_time_grid(times, granularities)
        if source == "denoiser":
            if not blocks:
                raise TrajrepError("--source denoiser needs --blocks, the blocks to cache; --list_layers lists them")
            return extract_denoiser_features(self, network, datamodule, grid, blocks, dtype, cache_dir, draws=draws,
                                             noise_seed=noise_seed, batch_size=batch_size, recompute=recompute,
                                             checkpoint=backbone or ckpt_path)
        return extract_representations(self, model, datamodule, grid, ema, dtype, cache_dir, batch_size=batch_size,
                                       recompute=recompute, checkpoint=ckpt_path)


SUBCOMMANDS = {**LightningCLI.subcommands(), "extract": {"model", "datamodule"}}
# The subcommands that are not the LightningCLI's (trajrep.cli dispatches them).
TOOLS_HELP = ("also: trajrep reproduce PRESET (a preset's whole pipeline), trajrep report RESULTS_DIR (tables and "
              "figures from probe records), trajrep analyse PROBES_DIR (per-task analyses); each takes --help")


class TrajrepCLI(LightningCLI):
    """Links sizes from the datamodule to the model at instantiation, so configs never repeat them."""

    def __init__(self, *classes, args: ArgsType = None, **kwargs) -> None:
        # Each subcommand's parser walks every signature of trainer, model and data (a third of a second for all of
        # them, once per stage of a preset): only the one asked for is built; `trajrep --help` builds every one.
        command = sys.argv[1:] if args is None else args
        self.asked = command[0] if isinstance(command, list) and command and command[0] in SUBCOMMANDS else None
        super().__init__(*classes, args=args, **kwargs)

    def before_instantiate_classes(self) -> None:
        # LightningCLI makes every module built while the datamodule is instantiated record the top-level `data`
        # config as its hyperparameters; RepresentationDataModule holds an image datamodule, which must keep its
        # own. Datamodules are therefore built plainly (and a missing cache is built right after its datamodule).
        self.parser.add_instantiator(self.instantiate_data, LightningDataModule, subclasses=True, prepend=True)
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        use_threads(config.get("threads"))

    def instantiate_data(self, class_type: type, *args, **kwargs) -> LightningDataModule:
        """A datamodule; a RepresentationDataModule's missing cache is extracted at once, before the model that
        reads its width is built, with the accelerator, devices and strategy this command trains with."""
        data = class_type(*args, **kwargs)
        if isinstance(data, RepresentationDataModule) and not data.cache_ready:
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            settings = {name: built(config.trainer[name]) for name in EXTRACTION_SETTINGS if name in config.trainer}
            trainer = with_progress(Trainer(**settings, logger=False, enable_checkpointing=False,
                                            enable_model_summary=False))
            ensure_trainer_fits_machine(trainer)
            build_cache(data, trainer)
        return data

    def instantiate_classes(self) -> None:
        """Lightning's, then a refusal of any model option the user set that a link from the data replaced (it
        would otherwise be accepted and silently ignored)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        given = dict(config.get("model", {}).get("init_args") or {})
        super().instantiate_classes()
        defaults = inspect.signature(type(self.model).__init__).parameters
        for name, instead in LINKED_FROM_DATA.items():
            if name not in given or name not in defaults or name not in self.model.hparams:
                continue
            value, linked = plain(given[name]), plain(self.model.hparams[name])
            if value != plain(defaults[name].default) and value != linked:
                raise TrajrepError(f"--model.init_args.{name}={value} is set from the data ({linked} here); "
                                   f"leave it out and set {instead}")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Also check, before anything runs, the output folder, a W&B login when W&B logs online, and a local
        --ckpt_path: missing or unreadable is one clear error. Checkpoints load with weights_only=True (no pickle
        code runs) unless --weights_only=false is given for a trusted file."""
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is None or "ckpt_path" not in config:
            return
        if config.trainer.get("default_root_dir"):
            ensure_writable(config.trainer.default_root_dir, "trainer.default_root_dir")
        logger = str(config.trainer.get("logger"))
        if "WandbLogger" in logger and not re.search(r"offline=True|mode='(offline|disabled|dryrun)'", logger):
            ensure_wandb_ready()
        if "weights_only" in config and config.weights_only is None:
            config["weights_only"] = True
        path = config.get("ckpt_path")
        local = path is not None and path not in ("last", "best", "hpc") and not re.match(r"\w+:", str(path))
        if local and config.get("weights_only", True):
            read_checkpoint(path)
        elif local:
            existing_checkpoint(path)

    def before_fit(self) -> None:
        """A new run into a checkpoint folder that holds an earlier run's last.ckpt is refused (Lightning would
        write last-v1.ckpt beside it, and every later stage would read the old one) unless --overwrite removes the
        earlier checkpoints first; --ckpt_path resumes it instead."""
        config = self.config[self.subcommand]
        if config.get("ckpt_path") is not None:
            return
        for callback in self.trainer.checkpoint_callbacks:
            folder = Path(callback.dirpath) if getattr(callback, "dirpath", None) else None
            if folder is None or not (folder / "last.ckpt").exists():
                continue
            if not config.get("overwrite"):
                raise TrajrepError(f"{folder} already holds the checkpoints of an earlier run; resume it with "
                                   f"--ckpt_path={folder / 'last.ckpt'}, write this run elsewhere (another "
                                   "--trainer.default_root_dir and checkpoint dirpath), or replace it with --overwrite")
            if self.trainer.is_global_zero:
                for old in folder.glob("*.ckpt"):
                    old.unlink()
                print(f"trajrep: removed the earlier checkpoints in {folder} (--overwrite)", flush=True)

    def after_fit(self) -> None:
        """Say where the run's checkpoint is: the path every later stage (extract, probes) needs."""
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "last_model_path", "") and self.trainer.is_global_zero:
                print(f"trajrep: checkpoint of step {self.trainer.global_step}: {callback.last_model_path}",
                      flush=True)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's, checked against the machine, writing checkpoints atomically, plus a progress line every
        minute when the bar is off."""
        trainer = super().instantiate_trainer(**kwargs)
        ensure_trainer_fits_machine(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return with_progress(trainer)

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's and `extract`; only the one named on the command line when one is."""
        return {self.asked: SUBCOMMANDS[self.asked]} if self.asked else SUBCOMMANDS

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--threads", type=Optional[int], default=None,
                            help="torch CPU threads (default: the CPUs this process may use, from its affinity "
                                 "mask and cgroup quota; on a shared machine 1 can be many times faster)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: remove an earlier run's checkpoints in the checkpoint folder first (without "
                                 "it, a folder holding last.ckpt is refused; --ckpt_path resumes that run)")
        # A link whose source attribute the datamodule lacks is skipped, so one CLI serves pretraining (image
        # datamodules have `image_shape`) and probing (representation datamodules have `probe_spec`).
        parser.link_arguments("data.image_shape", "model.init_args.image_channels", compute_fn=channels_of,
                              apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.init_args.image_size", compute_fn=size_of,
                              apply_on="instantiate")
        for name in PROBE_SPEC:
            parser.link_arguments("data.probe_spec", f"model.init_args.{name}", compute_fn=itemgetter(name),
                                  apply_on="instantiate")


def build_cli(args: ArgsType = None, run: bool = True) -> TrajrepCLI:
    """The trajrep CLI on `args`; with run=False only parsed and instantiated (model, data, trainer)."""
    silence_known_noise()
    return TrajrepCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      trainer_class=TrajrepTrainer, args=args, run=run, save_config_kwargs={"overwrite": True},
                      parser_class=OneLineErrorParser, parser_kwargs={"epilog": TOOLS_HELP})


def run(args: ArgsType = None) -> None:
    """The LightningCLI on `args` (default: the command line); user-fixable problems (TrajrepError) end with one
    line on stderr and exit code 2 (TRAJREP_DEBUG=1 shows the traceback). `trajrep.cli.main` and the preset
    runners call it."""
    with errors_as_one_line():
        build_cli(args)
