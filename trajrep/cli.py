"""The `trajrep` command: LightningCLI over every trajrep module and datamodule, referred to by short class names."""

import os
import sys
from operator import itemgetter
from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported so that configs can name the classes by short name (class_path: SyntheticShapes).
from trajrep.callbacks import EMA  # noqa: F401
from trajrep.data import CIFAR10, CIFAR100, FashionMNIST, ImageDataModule, ImageFolder, SyntheticShapes  # noqa: F401
from trajrep.data.representations import PixelProbeData, RepresentationDataModule  # noqa: F401
from trajrep.errors import TrajrepError, user_error
from trajrep.extract import extract_representations, load_pretrained_weights
from trajrep.pretrain import PretrainModule
from trajrep.probe import ProbeModule  # noqa: F401
from trajrep.timegrid import build_time_grid

DEBUG_ENV = "TRAJREP_DEBUG"
PROBE_SPEC = ("num_classes", "task_names", "feature_dim", "times", "seeds")


def channels_of(image_shape: tuple[int, int, int]) -> int:
    return image_shape[0]


def size_of(image_shape: tuple[int, int, int]) -> int:
    return image_shape[-1]


def instantiate_directly(class_type: type, *args, **kwargs):
    return class_type(*args, **kwargs)


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
    ) -> Path:
        """Compute E(x0, t) on a time grid for the train and test images once and keep it on disk."""
        if not isinstance(model, PretrainModule) or not isinstance(datamodule, ImageDataModule):
            raise TrajrepError("extract needs a pretraining config: a PretrainModule model and an image datamodule "
                               "(e.g. --config configs/quickstart.yaml)")
        if ckpt_path is None:
            raise TrajrepError("extract needs --ckpt_path, the checkpoint written by `trajrep fit`")
        load_pretrained_weights(model, ckpt_path, ema)
        return extract_representations(self, model, datamodule, build_time_grid(times, granularities), ema, dtype,
                                       cache_dir, batch_size=batch_size, recompute=recompute, checkpoint=ckpt_path)


class TrajrepCLI(LightningCLI):
    """Links sizes from the datamodule to the model at instantiation, so configs never repeat them."""

    def before_instantiate_classes(self) -> None:
        # LightningCLI makes every module built while the datamodule is instantiated record the top-level `data`
        # config as its hyperparameters; RepresentationDataModule builds an image datamodule and a PretrainModule,
        # which must keep their own. Datamodules are therefore built plainly.
        self.parser.add_instantiator(instantiate_directly, LightningDataModule, subclasses=True, prepend=True)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "extract": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
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
    return TrajrepCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      trainer_class=TrajrepTrainer, args=args, run=run, save_config_kwargs={"overwrite": True})


def main(args: ArgsType = None) -> None:
    """Entry point of the console script; `args` lets tests run it in process.

    User-fixable problems (TrajrepError) end with one line on stderr and exit code 2; set TRAJREP_DEBUG=1 for the
    traceback.
    """
    try:
        build_cli(args)
    except Exception as error:
        cause = user_error(error)
        if cause is None or os.environ.get(DEBUG_ENV):
            raise
        print(f"trajrep: error: {cause}", file=sys.stderr)
        sys.exit(2)
