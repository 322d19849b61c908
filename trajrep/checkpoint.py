"""Training checkpoints read safely and without building a model: the extraction stage loads its weights through
here, and the probe side finds the cache of a checkpoint by the same weights."""

import pickle  # only for the exception type that torch.load(weights_only=True) raises
from pathlib import Path

import torch

from trajrep.errors import TrajrepError


def existing_checkpoint(ckpt_path: str | Path) -> Path:
    """The path of a checkpoint file, or a clear error when there is none."""
    path = Path(ckpt_path)
    if not path.is_file():
        read_from = "" if path.is_absolute() else (f" (a relative path, in a config file too, is read from the "
                                                   f"working directory {Path.cwd()})")
        raise TrajrepError(f"checkpoint {path} does not exist{read_from}; give the .ckpt written by `trajrep fit` "
                           "(e.g. runs/quickstart/checkpoints/last.ckpt)")
    return path


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A training checkpoint, loaded safely (weights_only: no pickle code runs)."""
    path = existing_checkpoint(ckpt_path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrajrepError(f"checkpoint {path} cannot be read safely ({first}); it is truncated, corrupted or not a "
                           "trajrep checkpoint: use another one or rerun the training that wrote it (for a trusted "
                           "file that needs full unpickling, pass --weights_only=false)") from None


def pretrained_state(checkpoint: dict, ema: bool, ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """The raw weights of a checkpoint (the paper's choice), or its EMA weights."""
    has_raw = "current_model_state" in checkpoint
    if ema and not has_raw:
        raise TrajrepError(f"checkpoint {ckpt_path} was written without EMAWeightAveraging, so it has no EMA "
                           "weights; use ema: false")
    return checkpoint["state_dict"] if ema or not has_raw else checkpoint["current_model_state"]


def submodule_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of the submodule `name` in a model's state dict, as that submodule's own state dict names them."""
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def hyperparameters(checkpoint: dict, ckpt_path: str | Path, names: tuple[str, ...]) -> dict:
    """The named hyperparameters the checkpoint's model was built with, or a clear error when one is missing."""
    saved = checkpoint.get("hyper_parameters", {})
    missing = [name for name in names if name not in saved]
    if missing:
        raise TrajrepError(f"checkpoint {ckpt_path} does not record {', '.join(missing)} among its hyperparameters; "
                           "it was not written by `trajrep fit`: give a trajrep checkpoint")
    return {name: saved[name] for name in names}
