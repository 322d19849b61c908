"""What a representation cache is of: the identity whose hash is the cache's key.

It is computed from weights and settings alone. The extraction stage computes it from the model it runs, the probe
side from the checkpoint file (or diffusers folder) it is given, with the same functions, so a probe finds its
cache without building a model.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trajrep.checkpoint import hyperparameters, pretrained_state, read_checkpoint, submodule_state
from trajrep.data.base import ImageDataModule
from trajrep.data.cache import file_sha256, tensor_digest
from trajrep.diffusion import VESDE
from trajrep.errors import TrajrepError

# What load_backbone builds from a diffusers folder, and DDPMScheduler's defaults for what a config leaves out.
DIFFUSERS_MODEL, DIFFUSERS_SCHEDULER = "UNet2DModel", "DDPMScheduler"
DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


def encoder_identity(encoder_state: dict[str, torch.Tensor], mode: str, sigma_bounds: tuple[float, float],
                     ema: bool, times: list[float], dtype: str, splits: tuple[str, ...], dataset: dict) -> dict:
    """Everything that determines the content of a cache of E(x0, t)."""
    return {
        "weights_sha256": tensor_digest(encoder_state),
        "weights": "ema" if ema else "raw",
        "representation": "posterior-mean" if mode == "probabilistic-drl" else "feature",
        "sde": {"sigma_min": sigma_bounds[0], "sigma_max": sigma_bounds[1]},
        "times": times,
        "dtype": dtype,
        "splits": list(splits),
        "dataset": dataset,
    }


def denoiser_identity(backbone: dict, blocks: list[str], draws: int, noise_seed: int, times: list[float],
                      dtype: str, splits: tuple[str, ...], dataset: dict) -> dict:
    """Everything that determines the content of a denoiser-feature cache; `backbone` is its description, `noise`
    how each x_t's noise is seeded (denoiser.noise_seed_of)."""
    return {"source": "denoiser", "backbone": backbone, "blocks": list(blocks), "draws": draws,
            "noise_seed": noise_seed, "noise": "per (split, image, t, draw)", "times": times, "dtype": dtype,
            "splits": list(splits), "dataset": dataset}


def trajrep_backbone(score_state: dict[str, torch.Tensor], mode: str, sigma_bounds: tuple[float, float],
                     times: list[float]) -> dict:
    """A trajrep score U-Net as a backbone: its weights, its VE SDE and the sigma(t) of `times`."""
    sde = VESDE(*sigma_bounds)
    return {"backbone": "trajrep", "mode": mode, "latent": None if mode == "score-only" else "zero",
            "weights_sha256": tensor_digest(score_state),
            "sde": {"sigma_min": sde.sigma_min, "sigma_max": sde.sigma_max},
            "sigmas": sde.log_sigma(torch.tensor(times)).exp().tolist()}


def ddpm_timesteps(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """trajrep's t in [0, 1] as a DDPM scheduler's integer timestep: round(t * (num_train_timesteps - 1))."""
    return torch.round(t.float() * (num_train_timesteps - 1)).long()


def diffusers_folders(path: Path) -> tuple[Path, Path]:
    """The model and scheduler folders of a diffusers save (config.json at the top or in unet/,
    scheduler_config.json at the top or in scheduler/), or a clear error."""
    model_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    scheduler_dir = path / "scheduler" if (path / "scheduler" / "scheduler_config.json").is_file() else path
    if not (model_dir / "config.json").is_file() or not (scheduler_dir / "scheduler_config.json").is_file():
        raise TrajrepError(f"{path} is not a diffusers model folder: it needs config.json (or unet/config.json) and "
                           "scheduler_config.json (or scheduler/scheduler_config.json)")
    return model_dir, scheduler_dir


def refuse_ema_of_a_folder(ema: bool) -> None:
    """A diffusers folder holds one set of weights."""
    if ema:
        raise TrajrepError("ema: true reads a trajrep checkpoint's EMA weights; a diffusers folder holds one set")


def diffusers_backbone(path: Path, times: list[float]) -> dict:
    """A diffusers UNet2DModel folder as a backbone: the bytes of its model files, its scheduler's settings and
    the timesteps of `times`."""
    model_dir, scheduler_dir = diffusers_folders(path)
    saved = json.loads((scheduler_dir / "scheduler_config.json").read_text())
    scheduler = {name: saved.get(name, default) for name, default in DDPM_DEFAULTS.items()}
    return {"backbone": "diffusers", "source": str(path), "class": DIFFUSERS_MODEL,
            "files_sha256": {file.name: file_sha256(file) for file in sorted(model_dir.iterdir()) if file.is_file()},
            "scheduler": {"class": DIFFUSERS_SCHEDULER, **scheduler},
            "timesteps": ddpm_timesteps(torch.tensor(times), scheduler["num_train_timesteps"]).tolist()}


@dataclass
class CheckpointSource:
    """A cache's identity as read from a checkpoint or diffusers folder, what the records say of it, and the
    image shape its model was built for."""

    identity: dict
    described: dict
    image_shape: tuple[int, int, int]


def checkpoint_source(checkpoint: str, source: str, ema: bool, images: ImageDataModule, times: list[float],
                      dtype: str, splits: tuple[str, ...], blocks: list[str] | None = None, draws: int = 1,
                      noise_seed: int = 0) -> CheckpointSource:
    """The identity of the cache of `checkpoint`'s encoder (source encoder) or of its denoiser's `blocks`
    (source denoiser; `checkpoint` may also be a diffusers folder), computed from the file alone."""
    dataset = images.identity()
    if source == "denoiser" and Path(checkpoint).is_dir():
        refuse_ema_of_a_folder(ema)
        backbone = diffusers_backbone(Path(checkpoint), times)
        config = json.loads((diffusers_folders(Path(checkpoint))[0] / "config.json").read_text())
        size = config["sample_size"] if isinstance(config["sample_size"], int) else config["sample_size"][0]
        return CheckpointSource(denoiser_identity(backbone, blocks or [], draws, noise_seed, times, dtype, splits,
                                                  dataset),
                                {"encoder_mode": "denoiser (diffusers)", "pretrain_seed": None,
                                 "pretrain_steps": None, "blocks": list(blocks or []), "backbone": backbone},
                                (config["in_channels"], size, size))
    saved = read_checkpoint(checkpoint)
    settings = hyperparameters(saved, checkpoint, ("mode", "sigma_min", "sigma_max", "image_channels", "image_size"))
    # as a model built in full precision holds them once loaded: the weights that extraction hashes
    state = {name: value.float() if value.is_floating_point() else value
             for name, value in pretrained_state(saved, ema, checkpoint).items()}
    mode = settings["mode"]
    bounds = (settings["sigma_min"], settings["sigma_max"])
    image_shape = (settings["image_channels"], settings["image_size"], settings["image_size"])
    trained = {"pretrain_seed": saved.get("pretrain_seed"), "pretrain_steps": saved.get("global_step")}
    if source == "denoiser":
        backbone = trajrep_backbone(submodule_state(state, "score_net"), mode, bounds, times)
        return CheckpointSource(denoiser_identity(backbone, blocks or [], draws, noise_seed, times, dtype, splits,
                                                  dataset),
                                {"encoder_mode": f"denoiser ({mode})", **trained, "blocks": list(blocks or []),
                                 "backbone": backbone,
                                 **({"untrained_init": saved["untrained_init"]} if "untrained_init" in saved else {})},
                                image_shape)
    if mode == "score-only":
        raise TrajrepError("source: encoder reads E(x0, t), and this model is score-only (it has no encoder): probe "
                           "its denoiser features (--data.source=denoiser)")
    identity = encoder_identity(submodule_state(state, "encoder"), mode, bounds, ema, times, dtype, splits, dataset)
    calibration = saved.get("batchnorm_calibration")
    return CheckpointSource(identity, {"encoder_mode": mode, **trained,
                                       **({"batchnorm_calibration": calibration} if calibration else {})},
                            image_shape)
